"""The core: loading a model, the family and hook-point tables, the site grammar, hooks,
interventions and the :class:`Model`. Nothing here imports from another lmscope subpackage."""

from __future__ import annotations

import torch

from lmscope.core.cache import ActivationCache
from lmscope.core.errors import LmscopeError
from lmscope.core.interventions import Intervention, add, apply, mean, patch, zero
from lmscope.core.loading import DEFAULT_MODEL
from lmscope.core.model import GenerateResult, Model, RunResult
from lmscope.core.sites import Site, parse_site


def load(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    device_map=None,
) -> Model:
    """Load a causal LM with no network access.

    ``spec`` is a built-in alias (``smollm2-135m``, the default), a local Hugging Face
    model directory, a ``.gguf`` file (dequantised once, then cached), or a hub id
    already in the local Hugging Face cache. ``dtype`` defaults to float32.
    """
    from lmscope.core.loading import load_hf

    hf, tokenizer, source = load_hf(spec, device=device, dtype=dtype, device_map=device_map)
    return Model(hf, tokenizer, source=source, name=spec)


__all__ = [
    "DEFAULT_MODEL",
    "ActivationCache",
    "GenerateResult",
    "Intervention",
    "LmscopeError",
    "Model",
    "RunResult",
    "Site",
    "add",
    "apply",
    "load",
    "mean",
    "parse_site",
    "patch",
    "zero",
]

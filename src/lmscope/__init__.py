"""lmscope: look inside Hugging Face causal language models and change what they do.

>>> import lmscope
>>> model = lmscope.load()                      # SmolLM2-135M, offline
>>> run = model.run("The capital of France is", capture=["blocks.10.attn.z"])
>>> run.cache["blocks.10.attn.z"].shape         # [batch, pos, n_heads, d_head]
"""

from __future__ import annotations

import torch

from lmscope.cache import ActivationCache
from lmscope.errors import LmscopeError
from lmscope.interventions import Intervention, add, apply, mean, patch, zero
from lmscope.loading import DEFAULT_MODEL
from lmscope.model import GenerateResult, Model, RunResult
from lmscope.sites import Site, parse_site

__version__ = "0.1.0"

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
    from lmscope.loading import load_hf

    hf, tokenizer, source = load_hf(spec, device=device, dtype=dtype, device_map=device_map)
    return Model(hf, tokenizer, source=source, name=spec)

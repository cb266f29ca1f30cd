"""The core: loading a model, the family and hook-point tables, the site grammar and its kinds'
providers (dense, mixture-of-experts, Monet; :func:`register_site_kind` adds one), hooks,
interventions and the :class:`Model`. Nothing here imports from another lmscope subpackage."""

from __future__ import annotations

import torch

# The built-in site providers register themselves on import, in this order (that of site_shapes);
# no other module of core imports them.
from lmscope.core import dense, moe, monet  # noqa: F401
from lmscope.core.cache import ActivationCache
from lmscope.core.errors import LmscopeError
from lmscope.core.interventions import Intervention, add, apply, mean, patch, subspace_patch, zero
from lmscope.core.loading import DEFAULT_MODEL
from lmscope.core.model import GenerateResult, Model, RunResult
from lmscope.core.sites import Site, SiteKind, SiteProvider, parse_site, register_site_kind, unregister_site_kind


def load(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str | None = None,
    device_map=None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    derive: bool = False,
    trust_remote_code: bool = False,
) -> Model:
    """Load a causal LM with no network access.

    ``spec`` is a built-in alias (``smollm2-135m``, the default), a local Hugging Face
    model directory, a ``.gguf`` file (dequantised once, then cached), or a hub id
    already in the local Hugging Face cache. ``device``: ``"auto"`` (CUDA when available, else
    the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``; ``dtype``: float32 (default), bfloat16 or
    float16, the weights' and activations' dtype (statistics still accumulate in float32 or
    float64); ``device_map``: spread the model over devices (accelerate's ``device_map``, e.g.
    ``"auto"``), within ``max_memory`` per device (``{"cpu": "300MB", 0: "20GB"}``), layers that
    do not fit offloaded to ``offload_folder`` on disk. ``derive``: a model whose family has no
    entry gets one derived from its module tree (:mod:`lmscope.core.derive`; ``Model.derived`` is
    then True: certify it with :func:`lmscope.verify.certify` before trusting its results).
    ``trust_remote_code``: run a model's own modeling code shipped with it (``auto_map`` in its
    config, e.g. Monet); without it such a model is a one-line error. Its family needs an entry
    (:func:`lmscope.core.families.load_families`) unless ``derive``.

    Under torchrun (several processes) the first call joins the process group
    (:mod:`lmscope.core.distributed`); rank 0 loads first (a GGUF file is converted once, by
    it), then the others; on CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    from lmscope.core import distributed
    from lmscope.core.loading import load_hf, resolve_device

    if distributed.requested():
        distributed.init("cuda" if device_map is None and resolve_device(device).type == "cuda" else "cpu")
        if not distributed.is_main():
            distributed.barrier()
    hf, tokenizer, source = load_hf(
        spec,
        device=device,
        dtype=dtype,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
        trust_remote_code=trust_remote_code,
    )
    if distributed.is_main():
        distributed.barrier()
    from lmscope.core.derive import derive_family
    from lmscope.core.errors import UnknownFamily
    from lmscope.core.families import family_for

    try:
        family, derived = family_for(hf.config.model_type), False
    except UnknownFamily:
        if not derive:
            raise
        family, derived = derive_family(hf), True
    model = Model(hf, tokenizer, source=source, name=spec, family=family)
    model.derived = derived
    return model


__all__ = [
    "DEFAULT_MODEL",
    "ActivationCache",
    "GenerateResult",
    "Intervention",
    "LmscopeError",
    "Model",
    "RunResult",
    "Site",
    "SiteKind",
    "SiteProvider",
    "add",
    "apply",
    "load",
    "mean",
    "parse_site",
    "patch",
    "register_site_kind",
    "subspace_patch",
    "unregister_site_kind",
    "zero",
]

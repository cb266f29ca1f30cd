"""Features read through the vocabulary: token texts, and the logit effect of a direction.

**Logit effects** (:func:`logit_effects`): what adding a direction ``v`` at a site does to the
logits, to first order, as SAELens / Neuronpedia dashboards show it (``W_dec @ W_U`` of a
TransformerLens model loaded with ``fold_ln``)::

    effect = logit_scale * W_U @ (g * v)

with ``g`` the final norm's effective gain (an RMS norm's ``weight``, Gemma's ``1 + weight``: the
norm applied to a vector of ones; a LayerNorm's ``weight``, ``v`` first centred as the LayerNorm
centres its input) and ``logit_scale`` the family's (1 for most). The norm's division by the
residual stream's scale is left out: it scales every token's effect alike. A direction at
``mlp.post`` (the MLP's hidden space) is first mapped through the layer's down-projection
(without its bias); one at ``attn.z`` through the output projection. Gemma 2/3's norm after the
MLP or attention and a final logit soft-cap are not applied (they are not linear).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmscope.core.errors import LmscopeError
from lmscope.core.sites import Site
from lmscope.core.weights import parameter
from lmscope.features.sites import _norm_affine

RESIDUAL_KINDS = ("resid_pre", "resid_mid", "resid_post", "mlp.out", "attn.out")


def token_texts(model, ids: Tensor | list[int]) -> list[str]:
    """The text of each token id (decoded alone; ``<id>`` without a tokenizer)."""
    ids = [int(i) for i in (ids.flatten().tolist() if isinstance(ids, Tensor) else ids)]
    if model.tokenizer is None:
        return [f"<{i}>" for i in ids]
    unique = sorted(set(ids))
    texts = dict(zip(unique, model.tokenizer.batch_decode([[i] for i in unique]), strict=True))
    return [texts[i] for i in ids]


def _linear_part(module: nn.Module, v: Tensor) -> Tensor:
    """``module(v) - module(0)``: a linear layer's weight applied without its bias."""
    ref = parameter(module)
    v = v.to(ref.device, ref.dtype)
    return (module(v) - module(torch.zeros_like(v[:1]))).float()


def to_residual(model, site: Site, vectors: Tensor) -> Tensor:
    """``vectors`` [n, width] at ``site`` as residual-stream directions [n, d_model] (module docstring)."""
    with torch.no_grad():
        if site.kind in RESIDUAL_KINDS:
            return vectors.float()
        if site.kind == "mlp.post":
            return _linear_part(model.layer_module(site.layer, model.family.mlp_down), vectors)
        if site.kind == "attn.z":
            return _linear_part(model.layer_module(site.layer, model.family.o_proj), vectors)
    raise LmscopeError(f"no logit effects for directions at {site.kind} (known: {', '.join(RESIDUAL_KINDS)}, "
                       "mlp.post, attn.z)")  # fmt: skip


def logit_effects(model, site: Site, vectors: Tensor) -> Tensor:
    """The logit effect [n, vocab] of each direction in ``vectors`` [n, width] at ``site``:
    ``logit_scale * W_U @ (g * v)`` (module docstring)."""
    v = to_residual(model, site, vectors)
    norm = model.module(model.family.final_norm)
    gain, _ = _norm_affine(norm, model.d_model)
    if isinstance(norm, nn.LayerNorm):
        v = v - v.mean(-1, keepdim=True)
    weight = parameter(model.module(model.family.unembed))
    with torch.no_grad():
        effects = (v.to(gain.device) * gain) @ weight.float().T.to(gain.device)
    return effects * model.logit_scale

"""Independent references: hand computations from weights, for checking captured sites."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import lmscope


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding (Su et al. 2021, half-split convention) on the first ``cos.shape[-1]``
    dims of x [batch, pos, heads, d_head]; cos/sin [batch, pos, d_rot]."""
    d = cos.shape[-1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)


def linear(module: nn.Module, x: Tensor, conv1d: bool) -> Tensor:
    w = module.weight if conv1d else module.weight.T
    y = x @ w
    return y if module.bias is None else y + module.bias


def hand_qkv(model: lmscope.Model, layer: int, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [batch, pos, heads, d_head] of one layer, computed by hand from the
    projection weights, the attention module's input and the model's rotary cos/sin."""
    fam = model.family
    attn = model.layer_module(layer, fam.attn)
    seen = {}

    def grab(mod, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["pe"] = kwargs.get("position_embeddings")

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.hf(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    x = seen["x"]
    H, K, D = model.n_heads, model.n_kv_heads, model.d_head
    at = lambda p: model.layer_module(layer, p)
    with torch.no_grad():
        if fam.qkv_proj is None:
            q, k, v = (linear(at(p), x, fam.conv1d) for p in (fam.q_proj, fam.k_proj, fam.v_proj))
        elif fam.qkv_layout == "per_head":
            qkv = linear(at(fam.qkv_proj), x, fam.conv1d).unflatten(-1, (H, 3 * D))
            q, k, v = (t.flatten(-2) for t in qkv.chunk(3, dim=-1))
        else:
            q, k, v = linear(at(fam.qkv_proj), x, fam.conv1d).split([H * D, K * D, K * D], dim=-1)
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        if q_norm is not None and q_norm.weight.numel() == H * D:  # OLMo 2: norm over all heads
            q, k = q_norm(q), k_norm(k)
            q_norm = k_norm = None
        q, k, v = q.unflatten(-1, (H, D)), k.unflatten(-1, (-1, D)), v.unflatten(-1, (-1, D))
        if q_norm is not None:  # Qwen 3, Gemma 3: norm per head
            q, k = q_norm(q), k_norm(k)
        if seen["pe"] is not None:
            cos, sin = seen["pe"]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k, v

"""The model's anatomy as the circuit algorithms see it: what each attention head reads and
writes, and what each MLP writes, in terms of the model's own modules and weights.

- **Per-head weights**: the rows of the q/k/v projection each query head reads
  (:func:`head_params`), for separate or fused projections (``Family.qkv_layout``), with grouped
  key/value heads repeated within their group.
- **Head contributions**: what head h adds to the residual stream, ``z_h W_O[h]``, times the
  post-attention norm's scale where the model has one (Gemma 2/3, OLMo 2):
  :func:`head_contributions`. **MLP contributions**: the output of ``Family.mlp_contrib``
  (:func:`mlp_contributions`).
- **Keys and values per query head** (grouped-query attention): :func:`per_query_heads` makes the
  attention modules treat k and v as having one head per query head, so each query head can
  read (and be given) its own keys and values; :func:`joint_k_norm` is the key norm that
  normalises all key heads together (OLMo 2), which sits between the projection and the heads.
- **q/k/v layout**: :func:`qkv_points` names the hook points of a layer's projection outputs,
  :func:`split_qkv` / :func:`join_qkv` convert between those outputs and per-head tensors.

Whether attention and the MLP read the same residual stream is :attr:`Model.parallel_residual`.
Every hook here goes through :func:`lmscope.core.hooks.hooked`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lmscope.core.errors import LmscopeError
from lmscope.core.hookpoints import point_modules
from lmscope.core.hooks import Hook, hooked
from lmscope.core.weights import parameter

if TYPE_CHECKING:
    from lmscope.core.model import Model

QKV = ("q", "k", "v")


# -- per-head weights ------------------------------------------------------------------------


def _head_index(model: Model, layer: int, t: str) -> Tensor:
    """Rows of ``layer``'s projection output (of ``t``'s own projection, or the fused one) that
    query head h uses for input ``t``: [n_heads, d_head]. Grouped k/v heads repeat within a group."""
    fam, H, K, D = model.family, model.n_heads, model.n_kv_heads_of(layer), model.d_head_of(layer)
    if fam.qkv_layout == "per_head" and fam.qkv_proj is not None:
        return torch.arange(H * 3 * D).view(H, 3, D)[:, QKV.index(t)]
    if fam.q_gate and t == "q":  # per head: the query, then the output gate (Qwen 3.5)
        return torch.arange(H * 2 * D).view(H, 2 * D)[:, :D]
    n = H if t == "q" else K
    offset = 0 if fam.qkv_proj is None else {"q": 0, "k": H * D, "v": H * D + K * D}[t]
    index = offset + torch.arange(n * D).view(n, D)
    return index.repeat_interleave(H // n, dim=0)


def _attention_layer(model: Model, layer: int) -> None:
    """A clear error for a hybrid's layer without attention heads (its token mixer is ``Family.mixer``)."""
    if model.family.mixer and layer not in model.layers_with("attn"):
        raise LmscopeError(
            f"layer {layer} has no attention heads (its token mixer is {model.family.mixer}); "
            f"attention layers: {model.layers_with('attn')}"
        )


def _projection(model: Model, layer: int, t: str) -> nn.Module:
    """The linear layer that computes input ``t`` (q, k or v) of ``layer``: its own, the fused
    one, or for values the key projection (``Family.v_from_k``, on a layer without ``v_proj``). A
    clear error for keys and values a layer reuses from an earlier one (``Family.kv_reuse``)."""
    _attention_layer(model, layer)
    fam = model.family
    if t != "q" and model.kv_source(layer) != layer:
        raise LmscopeError(
            f"layer {layer} has no key/value projection: it attends with the keys and values of "
            f"layer {model.kv_source(layer)}, computed from that layer's input"
        )
    if t == "v" and fam.v_from_k and not model.has_module(layer, fam.v_proj):
        t = "k"
    path = fam.qkv_proj or {"q": fam.q_proj, "k": fam.k_proj, "v": fam.v_proj}[t]
    return model.layer_module(layer, path)


def head_params(model: Model, layer: int, t: str) -> tuple[Tensor, Tensor | None]:
    """Weight rows [n_heads, d_head, d_model] and bias [n_heads, d_head] (or None) that each
    query head of ``layer`` reads for input ``t`` (``"q"``, ``"k"`` or ``"v"``)."""
    proj = _projection(model, layer, t)
    weight, bias = parameter(proj), parameter(proj, "bias")
    weight = weight.T if model.family.conv1d else weight  # [out, d_model]
    index = _head_index(model, layer, t)
    return weight[index], (None if bias is None else bias[index])


def kv_head_of(model: Model, layer: int) -> Tensor:
    """The key/value head each query head of ``layer`` reads: [n_heads] (grouped-query
    attention: h // group size)."""
    return torch.arange(model.n_heads) // (model.n_heads // model.n_kv_heads_of(layer))


# -- what heads and MLPs write ---------------------------------------------------------------


def head_contributions(model: Model, layer: int, z: Tensor) -> Tensor:
    """What each head writes to the residual stream, [n_heads, ..., pos, d_model], from z
    [..., pos, n_heads, d_head]: ``z_h W_O[h]``, times the post-attention norm's scale (computed
    from the whole attention output, then held fixed) in Gemma 2/3 and OLMo 2, so the heads'
    contributions sum to what the layer adds."""
    _attention_layer(model, layer)
    _require_sum_of_writes(model, "head contributions")
    fam, H, D = model.family, model.n_heads, model.d_head_of(layer)
    o = model.layer_module(layer, fam.o_proj)
    weight, bias = parameter(o), parameter(o, "bias")
    w_o = (weight if fam.conv1d else weight.T).unflatten(0, (H, D))  # [H, D, d]
    per_head = torch.einsum("...hd,hde->h...e", z, w_o)
    if "norm" not in fam.attn_contrib:
        return per_head * model.residual_scale if model.residual_scale != 1 else per_head
    total = per_head.sum(0) + (bias if bias is not None else 0)
    per_head = per_head * _norm_scale(model.layer_module(layer, fam.attn_contrib), total)
    return per_head * model.residual_scale if model.residual_scale != 1 else per_head  # HyperCLOVA X


def _require_sum_of_writes(model: Model, what: str) -> None:
    """A clear error where the residual stream is not the embedding plus what attention and the
    MLPs add (``Family.extra_contrib``, ``Family.layer_scale``), as decompositions into them assume."""
    fam, why = model.family, []
    if fam.extra_contrib:
        why.append(f"each layer adds a third branch ({fam.extra_contrib})")
    if fam.layer_scale:
        why.append(f"each layer scales its whole output ({fam.layer_scale})")
    if why:
        raise LmscopeError(
            f"{what}: in {model.hf.config.model_type} the residual stream is not the sum of what attention "
            f"and the MLPs write: {' and '.join(why)}"
        )


def _norm_scale(norm: nn.Module, x: Tensor) -> Tensor:
    """The elementwise factor an RMS norm multiplies ``x`` by: gain / rms(x)."""
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
    gain = norm(torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)) * (1 + eps) ** 0.5
    return gain * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


@contextlib.contextmanager
def mlp_contributions(model: Model) -> Iterator[list[Tensor | None]]:
    """Records what each MLP adds to the residual stream (hook point ``mlp.contrib``: the output
    of ``family.mlp_contrib``) during the forwards run inside; yields the list, one tensor per
    layer (the latest forward's)."""
    _require_sum_of_writes(model, "MLP contributions")
    outputs: list[Tensor | None] = [None] * model.n_layers

    def keep(layer: int):
        def fn(x: Tensor) -> None:
            outputs[layer] = x * model.residual_scale if model.residual_scale != 1 else x

        return fn

    with hooked(model, [Hook("mlp.contrib", layer, keep(layer)) for layer in range(model.n_layers)]):
        yield outputs


# -- keys and values per query head ----------------------------------------------------------


def joint_k_norm(model: Model, layer: int) -> nn.Module | None:
    """The key norm of a grouped-query attention layer that normalises all key heads together
    (OLMo 2), or None. Such a norm sits between k_proj and the heads, so a query head's keys are
    computed from its own input copy through the whole projection and norm."""
    K = model.n_kv_heads_of(layer)
    if K == model.n_heads:
        return None
    norms = point_modules(model, "attn.k_norm", layer)
    if not norms:
        return None
    return norms[0] if norms[0].weight.numel() == K * model.d_head_of(layer) else None


def qkv_points(model: Model, layer: int) -> dict[str, str]:
    """The hook points whose outputs are ``layer``'s keys, queries and values before the heads
    split: ``{"q": "attn.q_proj", "k": ..., "v": ...}`` (the key norm's output ``attn.k_norm``
    for k where it is joint), or ``{"qkv": "attn.qkv_proj"}`` for a fused projection. A clear error
    where q_proj's output also holds an output gate (``Family.q_gate``): per-head q/k/v paths would
    miss the gate's; where the layer reuses an earlier layer's keys and values
    (``Family.kv_reuse``); and where its values are its key projection's output (``Family.v_from_k``),
    which would carry both inputs' paths."""
    _attention_layer(model, layer)
    fam = model.family
    if fam.q_gate:
        raise LmscopeError(
            f"{model.hf.config.model_type}: each head's output is gated by a projection of its input "
            "(q_proj holds the query and the gate), so q/k/v are not the heads' only inputs"
        )
    if model.kv_source(layer) != layer:
        raise LmscopeError(
            f"layer {layer} attends with the keys and values of layer {model.kv_source(layer)}, "
            "so its heads' key and value inputs are that layer's residual stream"
        )
    if fam.v_from_k and not model.has_module(layer, fam.v_proj):
        raise LmscopeError(f"layer {layer}: its values are its key projection's output (no v_proj of their own)")
    if fam.qkv_proj:
        return {"qkv": "attn.qkv_proj"}
    k = "attn.k_norm" if joint_k_norm(model, layer) is not None else "attn.k_proj"
    return {"q": "attn.q_proj", "k": k, "v": "attn.v_proj"}


def split_qkv(model: Model, layer: int, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-head tensors ``t -> [..., n_heads, d_head]`` from the tensors at ``layer``'s
    :func:`qkv_points` (e.g. their gradients), with keys and values per query head (as
    :func:`per_query_heads` with ``expand`` makes them)."""
    fam, H, D = model.family, model.n_heads, model.d_head_of(layer)
    if fam.qkv_proj is None:
        return {t: outputs[t].unflatten(-1, (H, D)) for t in QKV}
    x = outputs["qkv"]
    if fam.qkv_layout == "per_head":
        per = x.unflatten(-1, (H, 3, D))
        return {t: per[..., i, :] for i, t in enumerate(QKV)}
    return {t: p.unflatten(-1, (H, D)) for t, p in zip(QKV, x.split(H * D, dim=-1))}


def join_qkv(model: Model, parts: dict[str, Tensor]) -> Tensor:
    """The fused projection's output from per-head ``t -> [..., n_heads, d_head]`` (keys and
    values per query head): q | k | v, or per head (q, k, v) for ``qkv_layout="per_head"``."""
    tensors = [parts[t] for t in QKV]
    if model.family.qkv_layout == "per_head":
        return torch.stack(tensors, dim=-2).flatten(-3)
    return torch.cat([p.flatten(-2) for p in tensors], dim=-1)


@contextlib.contextmanager
def per_query_heads(model: Model, expand: bool) -> Iterator[None]:
    """Keys and values per query head (grouped-query attention only): the attention modules
    treat k and v as having ``n_heads`` heads; with ``expand``, the k/v projection outputs (or
    the joint key norm's) are repeated within each group (otherwise the caller's own hooks on
    :func:`qkv_points` must produce them). Restores the modules on exit."""
    H = model.n_heads
    layers = model.layers_with("attn") if model.family.mixer else range(model.n_layers)
    layers = [layer for layer in layers if model.n_kv_heads_of(layer) != H]
    if not layers:
        yield
        return
    hooks = []
    if expand:
        for layer in layers:
            repeat, fused = _expanders(H, model.n_kv_heads_of(layer), model.d_head_of(layer))
            points = qkv_points(model, layer)
            if "qkv" in points:
                hooks.append(Hook(points["qkv"], layer, fused))
            else:
                hooks += [Hook(points["k"], layer, repeat), Hook(points["v"], layer, repeat)]
    saved = []
    try:
        for layer in layers:
            attn = model.layer_module(layer, model.family.attn)
            for name, value in (("num_key_value_groups", 1), ("num_key_value_heads", H)):
                if hasattr(attn, name):
                    saved.append((attn, name, getattr(attn, name)))
                    setattr(attn, name, value)
        with hooked(model, hooks):
            yield
    finally:
        for attn, name, value in saved:
            setattr(attn, name, value)


def _expanders(H: int, K: int, D: int) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """Functions repeating ``K`` key/value heads of size ``D`` within their groups to ``H``: on a
    k or v projection output [..., K * D], and on a fused q|k|v output."""

    def repeat(x: Tensor) -> Tensor:
        return x.unflatten(-1, (K, D)).repeat_interleave(H // K, dim=-2).flatten(-2)

    def fused(x: Tensor) -> Tensor:
        q, k, v = x.split([H * D, K * D, K * D], dim=-1)
        return torch.cat([q, repeat(k), repeat(v)], dim=-1)

    return repeat, fused

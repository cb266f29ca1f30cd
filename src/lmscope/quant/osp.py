"""The 4-bit setting of Outlier-Safe Pre-Training's evaluation (Park et al. 2025, arXiv 2506.19697),
W4A4KV4, as its code runs it (dmis-lab/Outlier-Safe-Pre-Training ``scripts/1_eval_ppl_rtn.sh``:
``--w_bits 4 --a_bits 4 --k_bits 4 --v_bits 4 --w_clip --w_rtn --a_asym --k_asym --v_asym
--k_groupsize 128 --v_groupsize 128``; its quantisers are QuaRot's, spcl/QuaRot ``fake_quant``):

- **weights**: every linear layer of the blocks (not the embedding, not the unembedding),
  symmetric round-to-nearest per output channel, the clipping range chosen by GPTQ's MSE search
  (:func:`fake_quant_sym_mse`);
- **activations**: the inputs of those layers, asymmetric per token (QuaRot's ``ActQuantizer``,
  :func:`fake_quant_zero_point`); the attention output projection's input in groups of one head
  (``o_proj``: ``groupsize = head_dim``); the unembedding's input in full precision;
- **keys**, after the rotary embedding: queries and keys both rotated per head by the Hadamard
  matrix of order d_head (``QKRotationWrapper``, applied whenever keys are quantised, with or
  without :mod:`lmscope.quant.rotation`), then asymmetric per token in groups of 128 channels of
  the token's concatenated heads (``--k_groupsize 128``: one head at OSP's d_head = 128);
- **values**: asymmetric per token per head (the value projection's output quantiser with
  ``groupsize = head_dim``).

Inside :func:`osp_quantized` every forward of the model runs so. With a rotation of
:mod:`lmscope.quant.rotation` fused first (``QuantConfig.osp(rotation=...)``) it is the setting
"with Hadamard rotation". OSP's README evaluates two: "+ FFN Had", the Hadamard on the MLP's
hidden states only (``scripts/2_eval_ppl_rtn_had.sh``, ``--rotate_down_proj``: rotation
``"ffn"``), and "+ QuaRot", the full rotation (``scripts/4_eval_ppl_quarot.sh``, ``--rotate``,
with GPTQ weights there: rotation ``"quarot"``, with round-to-nearest weights here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.hookpoints import point_modules
from lmscope.core.hooks import Hook, hooked
from lmscope.core.model import Model
from lmscope.quant.fake import _grouped, quantized_weights
from lmscope.quant.hadamard import hadamard

# GPTQ's ``Quantizer.configure`` defaults for the MSE clipping search (IST-DASLab/gptq ``quant.py``),
# which QuaRot's and OSP's ``WeightQuantizer`` keep.
GRID, MAX_SHRINK, NORM = 100, 0.8, 2.4
K_GROUP = 128  # OSP's --k_groupsize


# -- quantisers -----------------------------------------------------------------------------


def fake_quant_sym_mse(
    x: Tensor,
    bits: int,
    dim: int = -1,
    group_size: int | None = None,
    *,
    grid: int = GRID,
    max_shrink: float = MAX_SHRINK,
    norm: float = NORM,
) -> Tensor:
    """Symmetric round-to-nearest fake quantisation with GPTQ's MSE clipping search over groups
    along ``dim`` (the whole axis if None; weights per output channel: ``dim`` = the input axis).

    GPTQ ``Quantizer.find_params(x)`` with ``sym=True, mse=True`` (IST-DASLab/gptq ``quant.py``;
    QuaRot's and OSP's ``WeightQuantizer``): ``xmax = max(|x|)`` (at least 1e-5); for
    ``i = 0 .. int(max_shrink * grid) - 1`` the candidate ``scale = (1 - i / grid) * xmax / qmax``
    gives ``q = scale * clamp(round(x / scale), -qmax - 1, qmax)`` and the error
    ``sum |q - x|^norm``; the first candidate with the smallest error wins (``qmax = 2^(b-1) - 1``)."""
    if bits < 2:
        raise LmscopeError("symmetric quantisation needs at least 2 bits")
    return _grouped(x, dim, group_size, lambda g: _sym_mse(g, bits, grid, max_shrink, norm))


def _sym_mse(g: Tensor, bits: int, grid: int, max_shrink: float, norm: float) -> Tensor:
    """GPTQ's search, the candidates evaluated a chunk at a time ([..., chunk, group_size])."""
    qmax = 2 ** (bits - 1) - 1
    xmax = g.abs().amax(-1, keepdim=True).clamp(min=1e-5)  # [..., 1]
    shrink = torch.tensor([1 - i / grid for i in range(int(max_shrink * grid))], dtype=g.dtype, device=g.device)
    chunk = max(1, 2**22 // max(g.numel(), 1))
    best = torch.full_like(xmax, float("inf"))
    best_scale = xmax / qmax
    for part in shrink.split(chunk):
        scale = (part * xmax / qmax)[..., None]  # [..., chunk, 1]
        q = (g[..., None, :] / scale).round().clamp(-qmax - 1, qmax) * scale
        err, idx = (q - g[..., None, :]).abs().pow(norm).sum(-1).min(-1, keepdim=True)  # first smallest
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, scale.squeeze(-1).gather(-1, idx), best_scale)
    return (g / best_scale).round().clamp(-qmax - 1, qmax) * best_scale


def fake_quant_zero_point(
    x: Tensor, bits: int, dim: int = -1, group_size: int | None = None, *, include_zero: bool = True
) -> Tensor:
    """Asymmetric fake quantisation with an integer zero point over groups along ``dim``:
    QuaRot's ``ActQuantizer`` (``sym=False``, clip ratio 1). With ``lo, hi`` the group's min and
    max (widened to include 0 when ``include_zero``: QuaRot's per-token path, ``groupsize=-1``;
    its grouped path ``find_params_per_token_groupwise`` does not widen), ``lo = -1, hi = 1``
    where both are 0; ``scale = (hi - lo) / (2^b - 1)``, ``zero = round(-lo / scale)``,
    ``x' = scale * (clamp(round(x / scale) + zero, 0, 2^b - 1) - zero)``. (A constant nonzero
    group, ``hi = lo``, which QuaRot's grouped path divides by zero on, keeps a tiny scale.)"""
    return _grouped(x, dim, group_size, lambda g: _zero_point(g, bits, include_zero))


def _zero_point(g: Tensor, bits: int, include_zero: bool) -> Tensor:
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    if include_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    both = (lo == 0) & (hi == 0)
    lo, hi = torch.where(both, -1.0, lo), torch.where(both, 1.0, hi)
    maxq = 2**bits - 1
    scale = ((hi - lo) / maxq).clamp(min=torch.finfo(g.dtype).tiny)
    zero = (-lo / scale).round()
    return scale * (((g / scale).round() + zero).clamp(0, maxq) - zero)


# -- the setting ----------------------------------------------------------------------------


def osp_activations(model: Model, bits: int) -> contextlib.AbstractContextManager:
    """Block linear inputs per token (0 in range), the output projection's per head (groups of
    d_head, QuaRot's grouped path), asymmetric."""
    per_token = lambda x: fake_quant_zero_point(x, bits, -1)
    hooks = []
    for layer in range(model.n_layers):
        o_proj = point_modules(model, "attn.z", layer)
        d_head = model.d_head_of(layer)
        per_head = lambda x, d=d_head: fake_quant_zero_point(x, bits, -1, d, include_zero=False)
        for linear in point_modules(model, "linears.in", layer):
            fn = per_head if any(linear is o for o in o_proj) else per_token
            hooks.append(Hook("linears.in", layer, fn, modules=(linear,)))
    return hooked(model, hooks)


def osp_kv_attention(k_bits: int | None, v_bits: int | None, k_group: int | None = K_GROUP) -> Callable:
    """An attention replacement (for :meth:`Model.hooks`): queries and keys [batch, heads, pos,
    d_head] rotated by the Hadamard matrix of order d_head, keys quantised per token in groups
    of ``k_group`` channels of the concatenated heads (0 in range), values per token per head."""
    cast: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}

    def rotate(x: Tensor) -> Tensor:
        key = (x.shape[-1], x.dtype, x.device)
        if key not in cast:
            cast[key] = hadamard(x.shape[-1]).to(dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        h = cast[key]
        return (x.to(h.dtype) @ h).to(x.dtype)

    def attention(module, base, query, key, value, attention_mask, **kwargs):
        if k_bits is not None:
            query, key = rotate(query), rotate(key)
            flat = key.transpose(1, 2).flatten(2)  # [batch, pos, kv_heads * d_head]
            flat = fake_quant_zero_point(flat, k_bits, -1, k_group)
            key = flat.unflatten(-1, key.shape[1:2] + key.shape[3:]).transpose(1, 2)
        if v_bits is not None:
            value = fake_quant_zero_point(value, v_bits, -1, include_zero=False)
        return base(module, query, key, value, attention_mask, **kwargs)

    return attention


@contextlib.contextmanager
def osp_quantized(
    model: Model,
    weight_bits: int | None = 4,
    act_bits: int | None = 4,
    k_bits: int | None = 4,
    v_bits: int | None = 4,
    k_group: int | None = K_GROUP,
) -> Iterator[None]:
    """Run forwards of ``model`` in OSP's W/A/KV setting (module docstring; None bits: full
    precision) inside this context; everything is undone on exit."""
    for bits in (weight_bits, act_bits, k_bits, v_bits):
        if bits is not None and not 2 <= bits <= 8:
            raise LmscopeError(f"OSP quantisation bits must be between 2 and 8, got {bits}")
    with contextlib.ExitStack() as stack:
        if weight_bits is not None:  # per output channel, MSE-clipped
            stack.enter_context(quantized_weights(model, weight_bits, quantiser=fake_quant_sym_mse))
        if act_bits is not None:
            stack.enter_context(osp_activations(model, act_bits))
        if k_bits is not None or v_bits is not None:
            stack.enter_context(model.hooks(attention=osp_kv_attention(k_bits, v_bits, k_group)))
        yield

"""Fake-quantisation kernels: round a tensor to a b-bit grid and map it straight back to floats,
with statistics over groups of ``g`` consecutive elements along one axis (the whole axis if None).

- **asymmetric min/max** (:func:`fake_quant_asym`; KV cache, activations):
  ``scale = (max - min) / (2^b - 1)``, ``q = clamp(round((x - min) / scale), 0, 2^b - 1)``,
  ``x' = q * scale + min``;
- **symmetric round-to-nearest** (:func:`fake_quant_sym`; weights, per output channel):
  ``scale = max|w| / (2^(b-1) - 1)``, ``q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1)``,
  ``w' = q * scale``;
- **symmetric with GPTQ's MSE clipping search** (:func:`fake_quant_sym_mse`) and **asymmetric with
  an integer zero point** (:func:`fake_quant_zero_point`): the quantisers of QuaRot's and
  Outlier-Safe Pre-Training's evaluation (:mod:`lmscope.quant.osp`).

The arithmetic runs in float32 (at least) whatever the input's dtype; results keep the input's
dtype and shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lmscope.core.errors import LmscopeError

# GPTQ's ``Quantizer.configure`` defaults for the MSE clipping search (IST-DASLab/gptq ``quant.py``),
# which QuaRot's and OSP's ``WeightQuantizer`` keep.
GRID, MAX_SHRINK, NORM = 100, 0.8, 2.4

# -- min/max and round-to-nearest -------------------------------------------------------------


def fake_quant_asym(x: Tensor, bits: int, dim: int = -1, group_size: int | None = None) -> Tensor:
    """Asymmetric min/max fake quantisation of ``x`` (any shape) with statistics over groups of
    ``group_size`` consecutive elements along ``dim`` (the whole axis if None)."""
    return _grouped(x, dim, group_size, lambda g: _asym(g, bits))


def fake_quant_sym(x: Tensor, bits: int, dim: int = -1, group_size: int | None = None) -> Tensor:
    """Symmetric round-to-nearest fake quantisation over groups along ``dim`` (as above)."""
    if bits < 2:
        raise LmscopeError("symmetric quantisation needs at least 2 bits")
    return _grouped(x, dim, group_size, lambda g: _sym(g, bits))


def _asym(g: Tensor, bits: int) -> Tensor:
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp(min=torch.finfo(g.dtype).tiny)
    return ((g - lo) / scale).round().clamp(0, levels) * scale + lo


def _sym(g: Tensor, bits: int) -> Tensor:
    qmax = 2 ** (bits - 1) - 1
    scale = (g.abs().amax(-1, keepdim=True) / qmax).clamp(min=torch.finfo(g.dtype).tiny)
    return (g / scale).round().clamp(-qmax - 1, qmax) * scale


def _grouped(x: Tensor, dim: int, group_size: int | None, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``fn`` to groups [..., n_groups, group_size] along ``dim``; a last partial group is
    padded by repeating its last element (which changes neither min nor max). The arithmetic
    runs in float32 (at least) whatever ``x``'s dtype; the result has ``x``'s dtype."""
    moved = x.movedim(dim, -1).to(torch.promote_types(x.dtype, torch.float32))
    n = moved.shape[-1]
    g = group_size or n
    pad = (-n) % g
    if pad:
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], -1)
    out = fn(moved.unflatten(-1, (-1, g))).flatten(-2)[..., :n]
    return out.movedim(-1, dim).to(x.dtype)


# -- QuaRot's and OSP's quantisers (GPTQ's MSE clipping, integer zero point) ----------------


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

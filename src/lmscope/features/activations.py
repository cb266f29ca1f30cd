"""The sparsifying nonlinearities of dictionaries, and the straight-through estimators that train
JumpReLU thresholds.

- :func:`topk` keeps each token's ``k`` largest ReLU'd pre-activations (Gao et al. 2024, "Scaling
  and evaluating sparse autoencoders"); :func:`groupmax` keeps the largest of each of ``k`` equal
  groups (sparsify's ``groupmax``); :func:`batch_topk` keeps the ``k * tokens`` largest over a whole
  batch (Bussmann et al. 2024, "BatchTopK sparse autoencoders").
- :func:`jumprelu` is ``relu(x) * (x > threshold)`` (Rajamanoharan et al. 2024, "Jumping ahead:
  improving reconstruction fidelity with JumpReLU sparse autoencoders"). Its gradient reaches the
  threshold through the rectangle-kernel pseudo-derivative of that paper (eq. 11), and so does the
  gradient of :func:`step`, ``(x > threshold)``, whose sum over features is the L0 the paper
  penalises directly. SAELens's ``JumpReLU`` / ``Step`` autograd functions compute the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def rectangle(x: Tensor) -> Tensor:
    """The rectangle kernel: 1 on (-1/2, 1/2), 0 elsewhere."""
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


def _kernel(x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """``K((x - threshold) / bandwidth) / bandwidth``: the pseudo-derivative of the step at ``threshold``."""
    return rectangle((x - threshold) / bandwidth) / bandwidth


def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` summed over the leading axes that ``like`` (the threshold) broadcasts over."""
    return grad.sum_to_size(like.shape) if grad.shape != like.shape else grad


class _JumpReLU(torch.autograd.Function):
    """``relu(x) * (x > threshold)``; d/dx is where the output is x, d/dthreshold is
    ``-threshold * K((x - threshold) / bandwidth) / bandwidth``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return torch.relu(x) * (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, threshold = ctx.saved_tensors
        d_x = grad * ((x > threshold) & (x > 0)).to(grad.dtype)
        d_threshold = -threshold * _kernel(x, threshold, ctx.bandwidth) * grad
        return d_x, _sum_to(d_threshold, threshold), None


class _Step(torch.autograd.Function):
    """``(x > threshold)``; no gradient to x, d/dthreshold is ``-K / bandwidth``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        x, threshold = ctx.saved_tensors
        return None, _sum_to(-_kernel(x, threshold, ctx.bandwidth) * grad, threshold), None


def jumprelu(x: Tensor, threshold: Tensor, bandwidth: float = 0.001) -> Tensor:
    """``relu(x) * (x > threshold)`` [..., d_sae] (threshold [d_sae]), with the straight-through
    estimator of the threshold's gradient of Rajamanoharan et al. (2024) where it requires grad."""
    if not threshold.requires_grad:
        return torch.relu(x) * (x > threshold).to(x.dtype)
    return _JumpReLU.apply(x, threshold, bandwidth)


def step(x: Tensor, threshold: Tensor, bandwidth: float = 0.001) -> Tensor:
    """``(x > threshold)`` as x's dtype, with the straight-through estimator of the threshold's
    gradient; ``step(...).sum(-1)`` is the differentiable L0 of a JumpReLU dictionary."""
    return _Step.apply(x, threshold, bandwidth)


def topk(x: Tensor, k: int) -> Tensor:
    """``relu(x)`` with all but the ``k`` largest entries of the last axis set to 0."""
    values, indices = torch.relu(x).topk(k, dim=-1, sorted=False)
    return torch.zeros_like(x).scatter(-1, indices, values)


def groupmax(x: Tensor, k: int) -> Tensor:
    """``relu(x)`` with the last axis cut into ``k`` equal groups and all but each group's largest
    entry set to 0 (sparsify's ``groupmax`` activation)."""
    acts = torch.relu(x).unflatten(-1, (k, -1))
    values, indices = acts.max(dim=-1, keepdim=True)
    return torch.zeros_like(acts).scatter(-1, indices, values).flatten(-2)


def batch_topk(x: Tensor, k: float) -> Tensor:
    """``relu(x)`` with all but the ``k * tokens`` largest entries of the whole batch set to 0
    (``tokens``: the product of the leading axes; k may be fractional)."""
    acts = torch.relu(x)
    flat = acts.flatten()
    keep = flat.topk(int(k * acts.shape[:-1].numel()), sorted=False)
    return torch.zeros_like(flat).scatter(-1, keep.indices, keep.values).view_as(acts)

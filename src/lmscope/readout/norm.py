"""The final norm, linearised: its divisor computed from one residual stream and held fixed, so
that it passes every component of that stream on linearly (the basis of direct logit
attribution, Elhage et al. 2021, and of the ``norm="final"`` logit lens)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmscope.core.model import Model
from lmscope.core.weights import parameter


@dataclass
class FinalNorm:
    """The final norm as ``norm(x) = (x - mean(x) [LayerNorm]) * gain / scale(x) + bias``:
    ``gain`` [d_model] (float32; RMSNorm's effective weight, ``1 + w`` in Gemma), ``bias``
    [d_model] or None, ``eps``."""

    layer_norm: bool
    gain: Tensor
    bias: Tensor | None
    eps: float

    @classmethod
    def of(cls, model: Model) -> FinalNorm:
        """The final norm of ``model`` (``nn.LayerNorm``, or an RMS norm of any family)."""
        norm = model.module(model.family.final_norm)
        if isinstance(norm, nn.LayerNorm):
            d = norm.normalized_shape[-1]
            weight, bias = parameter(norm), parameter(norm, "bias")
            gain = weight.float() if weight is not None else torch.ones(d, device=model.device)
            bias = bias.float() if bias is not None else None
            return cls(True, gain.detach(), None if bias is None else bias.detach(), float(norm.eps))
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-6
        ones = torch.ones(model.d_model, dtype=torch.float32, device=model.device)
        with torch.no_grad():  # norm(1) = gain / sqrt(1 + eps), whatever the family's formula for the gain
            gain = norm(ones).float() * (1 + eps) ** 0.5
        return cls(False, gain, None, float(eps))

    def scale(self, x: Tensor) -> Tensor:
        """The norm's divisor for residual ``x`` [..., d_model]: [..., 1] (float32)."""
        x = x.float()
        spread = x.var(-1, unbiased=False, keepdim=True) if self.layer_norm else x.pow(2).mean(-1, keepdim=True)
        return torch.sqrt(spread + self.eps)

    def linear(self, c: Tensor, scale: Tensor) -> Tensor:
        """Component ``c`` [..., d_model] as the norm passes it on with the divisor ``scale`` held
        fixed: ``(c - mean(c)) * gain / scale`` (no centring for RMSNorm), float32, no bias."""
        c = c.float()
        if self.layer_norm:
            c = c - c.mean(-1, keepdim=True)
        return c * self.gain / scale

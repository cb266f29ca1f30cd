"""Predicates on ``torch.nn`` modules that every part of lmscope recognises the same way."""

from __future__ import annotations

from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is GPT-2's ``Conv1D``: a linear layer that stores its weight as [in, out]."""
    return type(module).__name__ == "Conv1D"


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer: an ``nn.Linear`` (or a subclass, e.g. Falcon's
    ``FalconLinear``) or GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)

"""Module parameters as analyses read them: also when accelerate has offloaded them to the CPU
or disk (``device_map`` with ``max_memory``), where the module itself holds meta tensors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from lmscope.core.errors import LmscopeError


def parameter(module: nn.Module, name: str = "weight") -> Tensor | None:
    """``module.<name>`` (None if it has none), also when accelerate has offloaded it to the CPU
    or disk (then the module holds a meta tensor): read from the offload's weights map onto the
    module's execution device, as accelerate does before the module runs."""
    value = getattr(module, name, None)
    if value is None or value.device.type != "meta":
        return value
    hook = getattr(module, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        raise LmscopeError(f"{type(module).__name__}.{name} is on the meta device with no offloaded copy")
    return weights[name].to(hook.execution_device)


class _TransformedMap(Mapping):
    """An offload weights map whose entry ``name`` reads as ``fn(entry)``."""

    def __init__(self, base: Mapping, name: str, fn: Callable[[Tensor], Tensor]):
        self.base, self.name, self.fn = base, name, fn

    def __getitem__(self, key: str) -> Tensor:
        value = self.base[key]
        return self.fn(value) if key == self.name else value

    def __iter__(self) -> Iterator[str]:
        return iter(self.base.keys())

    def __len__(self) -> int:
        return len(self.base)


@contextlib.contextmanager
def transformed(module: nn.Module, fn: Callable[[Tensor], Tensor], name: str = "weight") -> Iterator[None]:
    """While the block runs, ``module.<name>`` is ``fn(original)``: changed in place and restored
    on exit (also after an error), or, when accelerate has offloaded it to the CPU or disk, read
    through the offload's weights map, so each forward loads the transformed copy."""
    value = getattr(module, name)
    if value.device.type != "meta":
        original = value.detach().clone()
        try:
            with torch.no_grad():
                value.copy_(fn(value))
            yield
        finally:
            with torch.no_grad():
                value.copy_(original)
        return
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "weights_map", None) is None:
        raise LmscopeError(f"{type(module).__name__}.{name} is on the meta device with no offloaded copy")
    base = hook.weights_map
    hook.weights_map = _TransformedMap(base, name, lambda w: fn(w.to(hook.execution_device)))
    try:
        yield
    finally:
        hook.weights_map = base

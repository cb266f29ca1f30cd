"""Module parameters as analyses read them: also when accelerate has offloaded them to the CPU
or disk (``device_map`` with ``max_memory``), where the module itself holds meta tensors."""

from __future__ import annotations

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

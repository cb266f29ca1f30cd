"""Memory: sizes as users write them, the working-memory budget of a device, and peak use.

Gradient methods size their chunks (integrated-gradient steps per backward pass) to a budget:
what ``--max-memory`` gives for the device that computes, else what is free there now (CUDA:
``torch.cuda.mem_get_info``; CPU: the kernel's ``MemAvailable``), less a safety margin.
:class:`PeakMemory` measures what a block of work used above its starting point: on CUDA the
caching allocator's peak (``torch.cuda.max_memory_allocated``), on the CPU the peak resident set
size sampled every few milliseconds by a thread (``/proc/self/statm``), after returning the memory
earlier work freed to the system (glibc's ``malloc_trim``).
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import re
import threading
import time
from typing import Self

import torch

from lmscope.core.errors import LmscopeError
from lmscope.core.loading import parse_max_memory

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
# Fraction of the free memory a default budget takes: the rest is left to the allocator's
# fragmentation, other processes and what the estimate misses.
_DEFAULT_SHARE = 0.5


def parse_size(text: str | int) -> int:
    """``"300MB"`` -> 300_000_000, ``"2GiB"`` -> 2 * 2**30, plain integers are bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise LmscopeError(f"bad memory size '{text}' (e.g. 300MB, 20GB, 2GiB)")
    size = float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]
    if not math.isfinite(size):
        raise LmscopeError(f"memory size '{text}' is too large")
    return int(size)


def format_size(n: int) -> str:
    """``1_500_000_000`` -> ``"1.5 GB"`` (decimal units, as :func:`parse_size` reads them)."""
    for unit in ("TB", "GB", "MB", "KB"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} B"


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now: CUDA's free memory (with what PyTorch's allocator holds
    unused), or the kernel's ``MemAvailable``."""
    device = torch.device(device)
    if device.type == "cuda":
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0] + unused)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30  # no /proc (not Linux): assume 8 GiB


def budget(device: torch.device, max_memory: dict | str | int | None = None) -> int:
    """Working-memory budget in bytes on ``device``: ``max_memory`` for it (a size, or
    accelerate's per-device dict, keyed by CUDA index or ``"cpu"``), else half of what is free."""
    device = torch.device(device)
    if isinstance(max_memory, dict):
        key = "cpu" if device.type == "cpu" else (device.index or 0)
        max_memory = max_memory.get(key, max_memory.get(str(key)))
    if max_memory is not None:
        return parse_size(max_memory)
    return int(free_memory(device) * _DEFAULT_SHARE)


def forward_bytes(model, batch: int, pos: int, kept: int, grad: bool = False) -> int:
    """A lower estimate of the memory one forward of ``batch`` x ``pos`` tokens takes on
    ``model``: the logits of ``kept`` positions per sequence, a layer's hidden and MLP
    activations (every layer's when ``grad`` keeps them for the backward) and, under eager
    attention, a layer's attention weights [batch, heads, pos, pos]."""
    element = next(model.hf.parameters()).element_size()
    layers = model.n_layers if grad else 1
    per_layer = pos * (model.d_model + (model.d_mlp or 0))
    if getattr(model.hf.config, "_attn_implementation", None) == "eager":
        per_layer += model.n_heads * pos * pos
    return batch * (kept * model.d_vocab + layers * per_layer) * element


def require_memory(need: int, device: torch.device | str, what: str) -> None:
    """Refuse work that needs ``need`` bytes on ``device`` when less is free there
    (:func:`free_memory`): a one-line error with both sizes, before anything is computed."""
    free = free_memory(torch.device(device))
    if need > free:
        raise LmscopeError(
            f"{what} needs about {format_size(need)} on {device}, more than the {format_size(free)} free there"
        )


def model_budget(model) -> int:
    """The working-memory budget of gradient methods on ``model``: its ``max_memory`` as loaded
    (``--max-memory``: a bare size, or that device's ``DEVICE=SIZE`` entry), else half of what
    is free on its device (:func:`budget`)."""
    spec = model.max_memory
    if isinstance(spec, str) and "=" in spec:
        spec = parse_max_memory(spec)
    return budget(model.device, spec)


def _trim() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``), so that the resident set
    size is the memory in use, not what earlier work freed; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Context manager: ``peak`` = the most memory in use on ``device`` during the block, in
    bytes above what was in use when it began (CUDA: allocated tensors; CPU: resident set size,
    sampled every ``interval`` seconds, so a spike shorter than that can be missed)."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()  # free cyclic garbage now, not during the block (it would lower the peak)
            _trim()
            self._start = self._max = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss()) - self._start

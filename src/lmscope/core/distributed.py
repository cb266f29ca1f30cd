"""Many processes with torch.distributed: split an analysis's work over ranks, merge it exactly.

``torchrun --nproc-per-node N -m lmscope <command> ...`` (or a script that calls
:func:`lmscope.load` under torchrun) starts N processes; each loads the model and the first
call of :func:`init` joins them in a process group (gloo on the CPU, NCCL on CUDA, each rank on
``cuda:LOCAL_RANK``). Analyses then split their items (corpus batches, prompt pairs, head
batches) round-robin, item i to rank ``i % world``:

- :func:`ordered_map` hands every rank every item's result, in item order, exchanged in
  lock-step rounds; folding them in that order gives what one process computes (bitwise,
  for the same per-item computation);
- :func:`shard_sum` sums per-item tensors on each rank, then over ranks (``all_reduce``): for
  large accumulators (Gram matrices) where exchanging every item's result would cost too much;
  equal to one process up to float64 rounding.

An exception on one rank reaches every rank at the next exchange: the rank that failed raises
it, the others raise :class:`RankFailed` naming it, so all stop with one line instead of
waiting for the lost rank. Only rank 0 writes files, shows progress and prints errors (so an
error every rank met, such as bad input, prints once). With one process
(no ``WORLD_SIZE``, or 1) every function here is the plain loop.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from lmscope.core.errors import LmscopeError

T = TypeVar("T")
R = TypeVar("R")
_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("LMSCOPE_DIST_TIMEOUT_MIN", "30")))


class RankFailed(LmscopeError):
    """Raised on every rank but the one where the work failed; the message names that rank."""


def requested() -> bool:
    """Whether this process was started as one of several (torchrun sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 with one process; from torchrun's ``RANK`` before :func:`init`)."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of ranks (1 with one process)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes results and shows progress: rank 0."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, CUDA means this rank's GPU, ``cuda:LOCAL_RANK``; anything else as given."""
    if requested() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init(device: torch.device | str = "cpu") -> None:
    """Join torchrun's process group once (a no-op with one process or when already joined):
    NCCL when ``device`` is CUDA, else gloo."""
    if not requested() or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise LmscopeError("torch.distributed is not available in this build of PyTorch")
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device(device))
    dist.init_process_group(backend, timeout=_TIMEOUT)


def _failure(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return first if isinstance(e, LmscopeError) else f"{type(e).__name__}: {first}"


def _raise_if_failed(errors: Sequence[str | None], own: BaseException | None) -> None:
    """After an exchange: re-raise this rank's own error, or :class:`RankFailed` for another's."""
    if own is not None:
        if isinstance(own, LmscopeError):
            raise own
        raise LmscopeError(f"rank {rank()}: {_failure(own)}") from own
    for r, error in enumerate(errors):
        if error is not None:
            raise RankFailed(f"rank {r}: {error}")


def _gather(payload: object) -> list:
    out: list = [None] * world_size()
    dist.all_gather_object(out, payload)
    return out


def ordered_map(items: Sequence[T], fn: Callable[[T], R]) -> Iterator[R]:
    """``fn(item)`` for every item, yielded in item order on every rank. Under torch.distributed
    item i is computed on rank ``i % world`` and results travel in rounds of one item per rank
    (``all_gather_object``), so at most ``world`` results are held at once."""
    if not active():
        for item in items:
            yield fn(item)
        return
    size, me = world_size(), rank()
    for first in range(0, len(items), size):
        own, result = None, None
        if first + me < len(items):
            try:
                result = fn(items[first + me])
            except Exception as e:  # noqa: BLE001 (every rank must reach the exchange)
                own = e
        gathered = _gather((None, result) if own is None else (_failure(own), None))
        _raise_if_failed([error for error, _ in gathered], own)
        for _, value in gathered[: len(items) - first]:
            yield value


def shard_sum(items: Sequence[T], fn: Callable[[T], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """The sum over items of ``fn(item)`` (a sequence of tensors of fixed shapes), each rank
    summing the items ``i % world == rank`` in order, then ``all_reduce`` over ranks. With no
    items on a rank, its part is zeros, so every rank must see at least one item overall."""
    size, me = world_size(), rank()
    total: list[torch.Tensor] | None = None
    own: BaseException | None = None
    try:
        for item in items[me::size]:
            parts = list(fn(item))
            total = parts if total is None else [t + p for t, p in zip(total, parts)]
    except Exception as e:
        if not active():
            raise
        own = e
    if not active():
        if total is None:
            raise LmscopeError("nothing to sum: no items")
        return total
    _raise_if_failed(_gather(None if own is None else _failure(own)), own)
    shapes = _gather(None if total is None else [(tuple(t.shape), t.dtype) for t in total])
    known = next(s for s in shapes if s is not None)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    parts = total or [torch.zeros(shape, dtype=dtype) for shape, dtype in known]
    out = []
    for part in parts:
        moved = part.to(device)
        dist.all_reduce(moved)
        out.append(moved.to(part.device))
    return out


def shutdown() -> None:
    """Leave the process group, if one was joined (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op with one process)."""
    if active():
        dist.barrier()

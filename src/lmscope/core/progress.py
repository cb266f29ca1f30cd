"""Progress bars and status lines for long steps (rich, on stderr).

Set ``LMSCOPE_QUIET=1`` to turn them off (read at each step, so no switch needs resetting).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
console = Console(stderr=True)


def enabled() -> bool:
    """Whether progress output is on: unless ``LMSCOPE_QUIET`` is set (to anything but 0), and
    only on rank 0 of a torch.distributed run (torchrun's ``RANK``)."""
    return os.environ.get("LMSCOPE_QUIET", "") in ("", "0") and os.environ.get("RANK", "0") == "0"


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


@contextlib.contextmanager
def progress_bar(description: str, total: float) -> Iterator[Callable[[float], None]]:
    """A bar for ``total`` units of work; yields ``advance(n)``."""
    if not enabled():
        yield lambda n: None
        return
    with _progress() as p:
        task = p.add_task(description, total=total)
        yield lambda n: p.advance(task, n)


@contextlib.contextmanager
def status_bar(description: str, total: float, initial: float = 0) -> Iterator[Callable[..., None]]:
    """A bar for ``total`` units of work (``initial`` done) followed by a live status text; yields
    ``update(n, status="")``, which advances it by ``n`` and, given a status, shows it."""
    if not enabled():
        yield lambda n, status=None: None
        return
    with Progress(*_progress().columns, TextColumn("{task.fields[status]}"), console=console, transient=True) as p:
        task = p.add_task(description, total=total, completed=initial, status="")

        def update(n: float, status: str | None = None) -> None:
            p.update(task, advance=n, **({"status": status} if status is not None else {}))

        yield update


def note(message: str) -> None:
    """One status line on stderr before a step that shows its own progress (e.g. transformers')."""
    if enabled():
        console.print(f"[dim]{message}[/dim]")

"""Progress bars and status lines for long steps (rich, on stderr).

Set ``LMSCOPE_QUIET=1`` (or call :func:`set_enabled`) to turn them off.
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
_enabled = os.environ.get("LMSCOPE_QUIET", "") in ("", "0")


def set_enabled(value: bool) -> None:
    """Turn progress output on or off for this process."""
    global _enabled
    _enabled = value


def enabled() -> bool:
    """Whether progress output is on."""
    return _enabled


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
    if not _enabled:
        yield lambda n: None
        return
    with _progress() as p:
        task = p.add_task(description, total=total)
        yield lambda n: p.advance(task, n)


def note(message: str) -> None:
    """One status line on stderr before a step that shows its own progress (e.g. transformers')."""
    if _enabled:
        console.print(f"[dim]{message}[/dim]")

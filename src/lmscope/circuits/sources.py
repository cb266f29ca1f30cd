"""Where prompt pairs come from: a JSONL file or a built-in task (what ``--data``, ``--task``
and ``--n`` select on the command line)."""

from __future__ import annotations

from pathlib import Path

from lmscope.circuits import tasks
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model


def pairs_for(
    model: Model, data: str | Path | None = None, task: str | None = None, n: int | None = None
) -> list[tasks.PromptPair]:
    """The prompt pairs of exactly one of ``data`` (a JSONL file, :func:`tasks.load_pairs`) or
    ``task`` (a built-in task of :data:`tasks.GENERATORS`: its default pairs, or ``n`` of them)."""
    if (data is None) == (task is None):
        raise LmscopeError("give exactly one of --data pairs.jsonl or --task ioi|induction|capitals")
    if data is not None:
        return tasks.load_pairs(data)
    if n is None:
        return tasks.builtin(model, task)
    if task not in tasks.GENERATORS:
        tasks.builtin(model, task)  # raises the unknown-task error
    return tasks.GENERATORS[task](model, n=n)

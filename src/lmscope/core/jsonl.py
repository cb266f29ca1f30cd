"""Reading JSONL input files with one-line errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmscope.core.errors import LmscopeError


def read_jsonl(path: str | Path) -> Iterator[tuple[str, object]]:
    """Yield ``(where, obj)`` for each non-blank line of ``path``; ``where`` is ``file:line``."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LmscopeError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise LmscopeError(f"{where}: malformed JSON ({e.msg})") from e

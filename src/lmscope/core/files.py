"""Writing a file atomically: every file lmscope writes (results.json, report.html, PNGs,
``.resume`` copies, tensors, checkpoints) goes through :func:`atomic`, so a reader never sees a
half-written file, an interrupted write leaves the earlier file whole, and two processes
writing the same path never share a temporary file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lmscope.core.errors import LmscopeError


@contextlib.contextmanager
def atomic(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path of this writer's own next to ``path`` (``.<name>.<random>.tmp``): what
    the block writes there is renamed over ``path`` when the block ends, and removed when it
    raises. The parent folder is created if needed; an OS error becomes a one-line
    :class:`LmscopeError` naming ``path``, as does a ``path`` that exists and is not a regular
    file (a folder, ``/dev/null``: renaming over it would replace the device)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise LmscopeError(f"cannot write {path}: not a regular file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise LmscopeError(f"cannot write {path}: {e.strerror or e}") from e
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from the group
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LmscopeError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

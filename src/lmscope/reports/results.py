"""``results.json``: every number a command shows, with its settings and versions.

Written atomically (to a temporary file, then renamed), so an interrupted or failed command
never leaves a half-written file and never destroys a complete earlier one.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from lmscope.core.errors import LmscopeError


def versions() -> dict:
    from importlib.metadata import version

    import torch
    import transformers

    return {
        "lmscope": version("lmscope"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def output_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check it is writable; a clear error if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmscopeError(f"cannot create output directory {path}: {e.strerror or e}") from e
    if not os.access(path, os.W_OK):
        raise LmscopeError(f"output directory {path} is not writable")
    return path


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as JSON atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=1, default=float))
        os.replace(tmp, path)
    except OSError as e:
        raise LmscopeError(f"cannot write {path}: {e.strerror or e}") from e
    return path

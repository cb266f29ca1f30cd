"""Tensors with metadata in one safetensors file: what lmscope saves for later (steering vectors,
probe directions, LinEAS maps, tuned lenses, subspaces). Metadata values are strings; others are
stored as JSON. A file records its ``format`` so one kind is never read as another."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.files import atomic


def save_tensors(path: str | Path, tensors: dict[str, Tensor], fmt: str, **metadata) -> Path:
    """Write ``tensors`` (float32, CPU) and ``metadata`` with ``format = fmt`` to ``path``."""
    path = Path(path)
    meta = {"format": fmt, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    with atomic(path) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path


def load_tensors(path: str | Path, fmt: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a ``fmt`` file written by :func:`save_tensors`; a missing,
    corrupt or foreign file raises :class:`LmscopeError`."""
    if not Path(path).is_file():
        raise LmscopeError(f"{path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (OSError, SafetensorError) as e:
        raise LmscopeError(f"cannot read {path}: {e}") from e
    if meta.get("format") != fmt:
        raise LmscopeError(f"{path} is not a {fmt} file (format {meta.get('format')!r})")
    return tensors, meta

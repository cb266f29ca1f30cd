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
from lmscope.core.jsonl import parse_json, require_file


def save_tensors(path: str | Path, tensors: dict[str, Tensor], fmt: str, **metadata) -> Path:
    """Write ``tensors`` (float32, CPU) and ``metadata`` with ``format = fmt`` to ``path``."""
    path = Path(path)
    meta = {"format": fmt, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    with atomic(path) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path


def load_tensors(path: str | Path, fmt: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a ``fmt`` file written by :func:`save_tensors`; a missing,
    corrupt, truncated or foreign file raises a one-line :class:`LmscopeError` naming it."""
    path = require_file(path, f"{fmt} file (safetensors)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (OSError, SafetensorError) as e:
        raise LmscopeError(f"{path}: cannot read as safetensors ({str(e).strip().splitlines()[0]})") from e
    if meta.get("format") != fmt:
        raise LmscopeError(f"{path}: not a {fmt} file (format {meta.get('format')!r})")
    return tensors, meta


def metadata_value(meta: dict[str, str], key: str, path: str | Path) -> object:
    """The JSON value :func:`save_tensors` stored under ``key``; missing or malformed is an error."""
    if key not in meta:
        raise LmscopeError(f"{path}: no '{key}' in its metadata")
    return parse_json(meta[key], f"{path}: metadata '{key}'")

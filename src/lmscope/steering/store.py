"""Saving and exchanging directions, probes and subspaces.

**safetensors** (:func:`save`, :func:`load`): named tensors plus string metadata: ``format``
(``lmscope-steering``), ``model``, ``site``, ``method``, ``data`` (the training data's SHA-256
prefix), ``layers``, and anything else the caller adds. Steering vectors are stored as
``layer.{L}`` tensors [d_model] (:func:`save_vectors`, :func:`load_vectors`).

**llama.cpp control vectors** (:func:`export_control_vector`, :func:`load_control_vector`): a
GGUF file with ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the
model's architecture) and ``controlvector.layer_count``, and one float32 tensor
``direction.{L}`` [n_embd] per layer, as repeng's ``export_gguf`` writes and llama.cpp's
``--control-vector`` reads. llama.cpp adds ``direction.L`` to the output of layer L (counted
from 0; layer 0 cannot be steered: ``direction.0`` is rejected by its loader), which is
lmscope's ``blocks.L.resid_post``. The coefficient is baked into the vectors; llama.cpp's
``--control-vector-scaled FILE:s`` scales them again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.files import atomic
from lmscope.core.jsonl import require_file
from lmscope.core.tensorfile import load_tensors, save_tensors

FORMAT = "lmscope-steering"


def save(path: str | Path, tensors: dict[str, Tensor], **metadata) -> Path:
    """Write ``tensors`` and ``metadata`` (values stored as strings; non-strings as JSON)."""
    return save_tensors(path, tensors, FORMAT, **metadata)


def load(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a file written by :func:`save`."""
    return load_tensors(path, FORMAT)


def save_vectors(path: str | Path, vectors: dict[int, Tensor], **metadata) -> Path:
    """Steering vectors per layer as ``layer.{L}`` tensors, with ``metadata``."""
    return save(path, {f"layer.{L}": v for L, v in vectors.items()}, layers=sorted(vectors), **metadata)


def load_vectors(path: str | Path) -> tuple[dict[int, Tensor], dict[str, str]]:
    """``({layer: vector}, metadata)`` from :func:`save_vectors`'s file."""
    tensors, meta = load(path)
    vectors = {int(k.removeprefix("layer.")): v for k, v in tensors.items() if _layer_key(k, "layer.")}
    if not vectors:
        raise LmscopeError(f"{path} holds no steering vectors")
    return vectors, meta


def export_control_vector(path: str | Path, vectors: dict[int, Tensor], model_hint: str) -> Path:
    """Write ``vectors`` ({layer: [d_model]}, coefficient included) as a llama.cpp control vector."""
    import gguf

    if 0 in vectors:
        raise LmscopeError("llama.cpp cannot steer layer 0 (no direction.0): use layers >= 1")
    path = Path(path)
    with atomic(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", model_hint)
        writer.add_int32("controlvector.layer_count", len(vectors))
        for layer in sorted(vectors):
            writer.add_tensor(f"direction.{layer}", vectors[layer].detach().float().cpu().numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def load_control_vector(path: str | Path) -> dict[int, Tensor]:
    """``{layer: vector}`` from a llama.cpp control-vector GGUF (``direction.L`` -> layer L)."""
    import gguf

    path = require_file(path, "control vector (GGUF)")
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception as e:  # the gguf reader raises what its parsing meets
        raise LmscopeError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:80]})") from e
    if arch != "controlvector":
        raise LmscopeError(f"{path} is not a control vector (architecture {arch!r})")
    vectors = {}
    for t in reader.tensors:
        if _layer_key(t.name, "direction."):
            vectors[int(t.name.removeprefix("direction."))] = torch.from_numpy(
                np.array(t.data, dtype=np.float32)
            ).flatten()
    if not vectors:
        raise LmscopeError(f"{path} holds no direction tensors")
    return vectors


def _layer_key(name: str, prefix: str) -> bool:
    """Whether tensor ``name`` is ``prefix`` and a layer number (``layer.12``)."""
    number = name.removeprefix(prefix)
    return name.startswith(prefix) and number.isascii() and number.isdigit()

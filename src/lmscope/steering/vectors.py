"""Precomputed directions for the steering sweep: ``lmscope steer --vectors SPEC``.

A spec names one direction per steered layer, added as ``coeff * v_L`` at ``blocks.L.<kind>``
like a steering vector, so that directions found by other methods go through the same evaluated
sweep (behaviour, KL, perplexity, prompting baseline):

- ``FILE`` written by :func:`lmscope.steering.store.save_vectors` (``lmscope steer --save``):
  its ``layer.L`` tensors, at the site kind of its ``site`` metadata (default ``resid_post``);
- ``FILE#j`` of an SNMF fit (:func:`lmscope.features.snmf.save_snmf`, ``lmscope features
  snmf``): feature j, the column ``F[:, j]``, at ``blocks.L.mlp.post``;
- ``DIR#j`` of a dictionary (any format :func:`lmscope.features.load_dictionary` reads): the
  decoder row ``W_dec[j]``, at the site it writes (its ``out_site``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.sites import parse_site, provider_of
from lmscope.features import CrossLayerTranscoder, load_dictionary
from lmscope.features.snmf import FORMAT as SNMF_FORMAT
from lmscope.features.snmf import load_snmf
from lmscope.steering.store import FORMAT as STEERING_FORMAT
from lmscope.steering.store import load_vectors


@dataclass(frozen=True)
class Direction:
    """A direction per layer (``vectors``) added at ``blocks.L.<kind>``; ``name`` is its method
    in the sweep's table."""

    name: str
    kind: str
    vectors: dict[int, Tensor]
    source: str

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.vectors))


def _split(spec: str) -> tuple[Path, int | None]:
    path, _, index = spec.rpartition("#") if "#" in spec else (spec, "", "")
    if not index:
        return Path(path), None
    if not index.isdigit():
        raise LmscopeError(f"--vectors {spec}: expected PATH or PATH#FEATURE (a feature number)")
    return Path(path), int(index)


def _format(path: Path) -> str | None:
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format")
    except (OSError, SafetensorError) as e:
        raise LmscopeError(f"cannot read {path}: {' '.join(str(e).split())}") from e


def _feature(index: int | None, count: int, spec: str, what: str) -> int:
    if index is None:
        raise LmscopeError(f"--vectors {spec}: name one of its {count} {what} as PATH#j")
    if not 0 <= index < count:
        raise LmscopeError(f"--vectors {spec}: {what} {index} out of range ({count})")
    return index


def load_direction(spec: str) -> Direction:
    """The direction ``spec`` names (module docstring)."""
    path, index = _split(spec)
    if path.is_dir():
        d = load_dictionary(path)
        if isinstance(d, CrossLayerTranscoder):
            raise LmscopeError(f"--vectors {spec}: a cross-layer transcoder writes several layers; not a direction")
        if d.out_site is None or d.norm_folded:
            raise LmscopeError(f"--vectors {spec}: the dictionary does not say which site it writes (or writes a "
                               "folded norm's space)")  # fmt: skip
        j = _feature(index, d.d_sae, spec, "features")
        site = parse_site(d.out_site)
        if site.layer is None or site.head is not None or site.kind == "attn.z":
            raise LmscopeError(f"--vectors {spec}: cannot add a direction at {d.out_site}")
        name = f"{'tc' if d.transcoder else 'sae'}{j}"
        return Direction(name, site.kind, {site.layer: d.W_dec[j].detach().float().cpu()}, spec)
    if not path.is_file():
        raise LmscopeError(f"--vectors {path}: no such file or folder")
    fmt = _format(path)
    if fmt == SNMF_FORMAT:
        tensors, meta = load_snmf(path)
        j = _feature(index, tensors["F"].shape[1], spec, "SNMF features")
        return Direction(f"snmf{j}", "mlp.post", {int(meta["layer"]): tensors["F"][:, j].clone()}, spec)
    if fmt == STEERING_FORMAT:
        if index is not None:
            raise LmscopeError(f"--vectors {spec}: a steering-vector file holds one direction per layer; drop #{index}")
        vectors, meta = load_vectors(path)
        kind = meta.get("site", "resid_post")
        parse_site(f"blocks.0.{kind}")
        return Direction(path.stem, kind, vectors, spec)
    raise LmscopeError(
        f"--vectors {spec}: not a steering-vector file, an SNMF file or a dictionary folder (format {fmt!r})"
    )


def check_direction(model, direction: Direction) -> None:
    """A one-line error unless every layer of ``direction`` has its site in ``model`` with the
    vector's width."""
    for layer, v in direction.vectors.items():
        site = f"blocks.{layer}.{direction.kind}"
        if not 0 <= layer < model.n_layers:
            raise LmscopeError(f"--vectors {direction.source}: layer {layer} out of range ({model.n_layers} layers)")
        width = int(torch.Size(provider_of(direction.kind).shape(model, model.site(site), 1, 1)[2:]).numel())
        if v.numel() != width:
            raise LmscopeError(f"--vectors {direction.source}: a vector of {v.numel()} at {site}, which has {width}")

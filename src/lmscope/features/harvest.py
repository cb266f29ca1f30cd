"""Activations to train dictionaries on: harvested from a model, cached to disk as shards, streamed
in shuffled batches.

A **source** holds activations in **blocks**, each a dict ``name -> [tokens, width]`` (the same
tokens for every name; names are site names):

- :class:`TensorSource`: tensors in memory, cut into blocks (synthetic data, tests);
- :class:`HarvestSource`: block ``j`` is one forward over windows ``j * W .. (j + 1) * W`` of a
  tokenised corpus, every site captured in the same pass (``model.run(..., capture=sites,
  logits=False, stop_after=<last layer>)``); heads of ``attn.z`` flattened, the first
  ``skip_first`` positions of every window left out (SmolLM2's first position carries norms a
  hundred times the others', an attention sink no dictionary should spend features on), stored
  as ``dtype``; tokens whose norm at any site exceeds ``outlier`` times the median (the massive
  activations of attention sinks, :func:`ordinary`) are left out too. Under torchrun every rank runs a share of each block's forward batches and
  receives the others' (:func:`lmscope.core.distributed.ordered_map`), so every rank holds the
  same block;
- :class:`ShardSource`: blocks written by :func:`write_shards` (one safetensors file per block,
  float16 / bfloat16 / float32, and a ``manifest.json`` naming what they hold); :func:`cached`
  reuses a folder whose manifest matches and (re)writes it otherwise.

:func:`batches` streams a source as training batches: the blocks in order, epoch after epoch,
each block's tokens in a random order drawn from ``(seed, epoch, block)``; batch ``s`` holds
tokens ``s * B .. (s + 1) * B`` of that stream (a batch may span blocks). Batch ``s`` is a
function of the seed and ``s`` alone; each comes with the stream position after it (epoch, block,
tokens read), from which a resumed run continues with exactly the batches the interrupted one
would have seen.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lmscope.core import distributed
from lmscope.core.errors import LmscopeError
from lmscope.core.progress import progress_bar
from lmscope.core.sites import provider_of

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MANIFEST = "manifest.json"


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of ``float32``, ``float16`` or ``bfloat16``."""
    if name not in DTYPES:
        raise LmscopeError(f"unknown activation dtype '{name}' (known: {', '.join(DTYPES)})")
    return DTYPES[name]


class Source(Protocol):
    """Activations in blocks (module docstring)."""

    names: tuple[str, ...]

    def widths(self) -> dict[str, int]:
        """Each name's vector width."""
        ...

    def sizes(self) -> list[int]:
        """Tokens per block (before outliers are left out, for a harvest)."""
        ...

    def tokens(self) -> int:
        """Tokens in all (before outliers are left out): one pass, a run's default length."""
        ...

    def block(self, j: int) -> dict[str, Tensor]:
        """Block ``j``: ``name -> [tokens, width]``."""
        ...


@dataclass
class TensorSource:
    """Tensors ``name -> [n, width]`` (the same ``n`` tokens each) cut into blocks of ``block_tokens``."""

    tensors: Mapping[str, Tensor]
    block_tokens: int = 65536

    def __post_init__(self) -> None:
        counts = {v.shape[0] for v in self.tensors.values()}
        if len(counts) != 1 or any(v.ndim != 2 for v in self.tensors.values()):
            raise LmscopeError("a tensor source needs 2-d tensors [tokens, width] with the same number of tokens")
        self.names = tuple(self.tensors)
        self._n = counts.pop()

    def widths(self) -> dict[str, int]:
        return {k: v.shape[1] for k, v in self.tensors.items()}

    def sizes(self) -> list[int]:
        full, rest = divmod(self._n, self.block_tokens)
        return [self.block_tokens] * full + ([rest] if rest else [])

    def tokens(self) -> int:
        return self._n

    def block(self, j: int) -> dict[str, Tensor]:
        start = j * self.block_tokens
        return {k: v[start : start + self.block_tokens] for k, v in self.tensors.items()}


def site_width(model, name: str) -> int:
    """The width of one token's vector at site ``name`` (heads flattened)."""
    site = model.site(name)
    return int(torch.Size(provider_of(site.kind).shape(model, site, 1, 1)[2:]).numel())


def _flat(x: Tensor, skip_first: int) -> Tensor:
    """A captured [batch, pos, ...] tensor as [batch * (pos - skip_first), width]."""
    return x[:, skip_first:].flatten(2).flatten(0, 1)


def ordinary(vectors: Sequence[Tensor], outlier: float) -> Tensor:
    """Which tokens [n] (bool) have, at every site (each [n, width]), a norm at most ``outlier``
    times that site's median norm over these tokens: the massive activations of attention sinks
    (Sun et al. 2024, norms a hundred times the others') fail; ``outlier`` 0 keeps every token."""
    keep = torch.ones(vectors[0].shape[0], dtype=torch.bool, device=vectors[0].device)
    if outlier:
        for v in vectors:
            norms = v.float().norm(dim=-1)
            keep &= norms <= outlier * norms.median()
    return keep


@dataclass
class HarvestSource:
    """Sites of ``model`` over token ``windows`` [n, seq_len] (module docstring): block ``j`` is
    windows ``j * block_windows ..`` run ``batch_size`` at a time."""

    model: Any
    sites: Sequence[str]
    windows: Tensor
    block_windows: int = 256
    batch_size: int = 16
    skip_first: int = 1
    outlier: float = 10.0
    dtype: torch.dtype = torch.float32
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.names = tuple(dict.fromkeys(str(self.model.site(s)) for s in self.sites))
        for name in self.names:
            site = self.model.site(name)
            if site.layer is None or site.head is not None or site.kind in ("attn.pattern",):
                raise LmscopeError(f"cannot train a dictionary on '{name}': name a whole layer site")
        if not 0 <= self.skip_first < self.windows.shape[1]:
            raise LmscopeError(f"skip_first {self.skip_first} leaves no position of windows of {self.windows.shape[1]}")
        self.stop_after = max(self.model.site(n).layer for n in self.names)

    def widths(self) -> dict[str, int]:
        return {n: site_width(self.model, n) for n in self.names}

    def sizes(self) -> list[int]:
        """Tokens per block before outliers are left out."""
        full, rest = divmod(self.windows.shape[0], self.block_windows)
        per = self.windows.shape[1] - self.skip_first
        return [self.block_windows * per] * full + ([rest * per] if rest else [])

    def tokens(self) -> int:
        return sum(self.sizes())

    def _forward(self, ids: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            cache = self.model.run(ids, self.names, logits=False, stop_after=self.stop_after).cache
        flat = {n: _flat(cache[n], self.skip_first) for n in self.names}
        keep = ordinary(list(flat.values()), self.outlier)
        return {n: v[keep].to("cpu", self.dtype) for n, v in flat.items()}

    def block(self, j: int) -> dict[str, Tensor]:
        windows = self.windows[j * self.block_windows : (j + 1) * self.block_windows]
        parts = list(distributed.ordered_map(list(windows.split(self.batch_size)), self._forward))
        return {n: torch.cat([p[n] for p in parts]) for n in self.names}


@dataclass
class ShardSource:
    """Blocks written by :func:`write_shards` in ``folder``."""

    folder: Path

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.manifest = read_manifest(self.folder)
        if self.manifest is None:
            raise LmscopeError(f"{self.folder}: no activation shards ({MANIFEST} missing or unreadable)")
        self.names = tuple(self.manifest["names"])

    def widths(self) -> dict[str, int]:
        return dict(self.manifest["widths"])

    def sizes(self) -> list[int]:
        return list(self.manifest["sizes"])

    def tokens(self) -> int:
        return int(self.manifest["tokens"])

    def block(self, j: int) -> dict[str, Tensor]:
        path = self.folder / _shard_name(j)
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise LmscopeError(f"cannot read activation shard {path}: {e}") from e
        return {n: tensors[n] for n in self.names}


def _shard_name(j: int) -> str:
    return f"block-{j:05d}.safetensors"


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a shard folder, or None where there is none (or it is unreadable)."""
    try:
        value = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get("complete") else None


def write_shards(
    source: Source, folder: str | Path, dtype: torch.dtype, key: Mapping[str, Any] | None = None
) -> ShardSource:
    """Write every block of ``source`` to ``folder`` as ``dtype`` (rank 0 writes; every rank
    harvests its share), the manifest last; returns the folder as a :class:`ShardSource`."""
    folder = Path(folder)
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)
    sizes = []
    with progress_bar("activation shards", len(source.sizes())) as advance:
        for j in range(len(source.sizes())):
            block = {n: v.to(dtype).contiguous() for n, v in source.block(j).items()}
            sizes.append(next(iter(block.values())).shape[0])
            if distributed.is_main():
                tmp = folder / (_shard_name(j) + ".tmp")
                save_file(block, str(tmp))
                os.replace(tmp, folder / _shard_name(j))
            advance(1)
    manifest = {
        "complete": True,
        "names": list(source.names),
        "widths": source.widths(),
        "sizes": sizes,
        "tokens": source.tokens(),
        "dtype": str(dtype).removeprefix("torch."),
        "key": dict(key or {}),
    }
    if distributed.is_main():
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    distributed.barrier()
    return ShardSource(folder)


def cached(source: Source, folder: str | Path, dtype: torch.dtype, key: Mapping[str, Any]) -> ShardSource:
    """The shards in ``folder`` when its manifest records the same ``key`` and dtype (what was
    harvested: model, sites, corpus, windows), else ``source`` written there first."""
    manifest = read_manifest(Path(folder))
    wanted = json.loads(json.dumps(dict(key)))
    if (
        manifest is not None
        and manifest.get("key") == wanted
        and manifest.get("dtype") == str(dtype).removeprefix("torch.")
    ):
        return ShardSource(Path(folder))
    return write_shards(source, folder, dtype, wanted)


# -- streaming batches ---------------------------------------------------------------------------


@dataclass
class Remembered:
    """``source`` with its last block kept, so that reading it twice (a statistic, then the
    stream) harvests it once."""

    source: Source

    def __post_init__(self) -> None:
        self.names = self.source.names
        self._last: tuple[int, dict[str, Tensor]] | None = None

    def widths(self) -> dict[str, int]:
        return self.source.widths()

    def sizes(self) -> list[int]:
        return self.source.sizes()

    def tokens(self) -> int:
        return self.source.tokens()

    def block(self, j: int) -> dict[str, Tensor]:
        if self._last is None or self._last[0] != j:
            self._last = (j, self.source.block(j))
        return self._last[1]


def _order(seed: int, epoch: int, j: int, n: int) -> Tensor:
    generator = torch.Generator().manual_seed(((seed * 1_000_003) + epoch) * 1_000_033 + j)
    return torch.randperm(n, generator=generator)


Position = tuple[int, int, int]  # (epoch, block, tokens of the block already read)


def batches(
    source: Source, batch_size: int, seed: int = 0, position: Position = (0, 0, 0)
) -> Iterator[tuple[dict[str, Tensor], Position]]:
    """Training batches ``name -> [batch_size, width]`` from ``position`` on (module docstring),
    each with the position of the next unread token (where a resumed stream starts); endless
    (epochs repeat with new orders)."""
    n_blocks = len(source.sizes())
    if sum(source.sizes()) < batch_size:
        raise LmscopeError(f"{sum(source.sizes())} activation tokens, fewer than one batch of {batch_size}")
    epoch, j, offset = position
    carry: dict[str, Tensor] | None = None
    while True:
        block = source.block(j)
        n = next(iter(block.values())).shape[0]
        order = _order(seed, epoch, j, n)[offset:]
        block = {k: v[order] for k, v in block.items()}
        carried = 0 if carry is None else next(iter(carry.values())).shape[0]
        if carry is not None:
            block = {k: torch.cat([carry[k], block[k]]) for k in block}
        rows = carried + n - offset
        full = rows // batch_size * batch_size
        following = (epoch, j + 1, 0) if j + 1 < n_blocks else (epoch + 1, 0, 0)
        for b in range(0, full, batch_size):
            read = offset + b + batch_size - carried
            yield {k: v[b : b + batch_size] for k, v in block.items()}, (epoch, j, read) if read < n else following
        carry = {k: v[full:] for k, v in block.items()}
        epoch, j, offset = following

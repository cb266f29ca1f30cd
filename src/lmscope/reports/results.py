"""Results: the :class:`Result` protocol every analysis result follows, and ``results.json``.

A result gives its numbers as plain JSON (:meth:`Result.to_json`), as captioned tables
(:meth:`Result.tables`), as figures (:meth:`Result.figures`, each rendering as a PNG and as a
Plotly chart) and, in Jupyter, as HTML (tables and inline PNG images, no network needed).

``results.json`` is written by :class:`lmscope.reports.command.RunWriter` (header and parts) through
:func:`save` as JSON, atomically (to a temporary file, then renamed), so an interrupted
or failed command never leaves a half-written file and never destroys a complete earlier one.
It is strict JSON (:func:`strict`): NaN and infinities are written as ``null``, which
:func:`nan_for_none` reads back as NaN.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmscope.core import distributed
from lmscope.core.errors import LmscopeError
from lmscope.core.files import atomic
from lmscope.reports.figures import Figure

if TYPE_CHECKING:
    from lmscope.core.model import Model


@dataclass
class Table:
    """A captioned table: one dict per row, columns in order of first appearance."""

    caption: str
    rows: list[dict] = field(default_factory=list)


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data: tensors and arrays to lists, tuples to lists, mapping keys to
    strings, nested results to their :meth:`Result.to_json`; floats are kept as they are."""
    return _json_data(value, finite=False)


def strict(value: Any) -> Any:
    """``value`` as strict JSON data: :func:`plain`'s conversions, with every NaN, +inf and -inf
    float (Python, numpy, or an element of a tensor or array), at any depth, as None (``null``)."""
    return _json_data(value, finite=True)


def _json_data(value: Any, finite: bool) -> Any:
    """:func:`plain` (``finite=False``) or :func:`strict` (``finite=True``) of ``value``."""
    if isinstance(value, Result):
        value = value.to_json()
        if not finite:
            return value
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # torch tensor, numpy array/scalar
        value = value.tolist()
        if not finite:
            return value
    if isinstance(value, float):
        return value if not finite or math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _json_data(item, finite) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_data(item, finite) for item in value]
    return value


def nan_for_none(value: Any) -> Any:
    """Numbers read back from strict JSON (:func:`strict`): None as NaN, also inside lists and
    mapping values (for fields that hold only numbers: a non-finite number was written as None)."""
    if value is None:
        return math.nan
    if isinstance(value, Mapping):
        return {key: nan_for_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [nan_for_none(item) for item in value]
    return value


class Result:
    """What every analysis returns. Subclasses (dataclasses) override what applies:

    - :meth:`to_json`: every number as plain JSON (default: the dataclass fields, via :func:`plain`);
    - :meth:`text`: one or two sentences with the headline numbers (default: none);
    - :meth:`tables`: captioned tables (default: none);
    - :meth:`figures`: :class:`~lmscope.reports.figures.Figure` specs (default: none).

    Reports and the Jupyter view (:meth:`_repr_html_`) are built from these alone.
    """

    def to_json(self) -> dict:
        """Every number as plain JSON."""
        if not dataclasses.is_dataclass(self):
            raise NotImplementedError(f"{type(self).__name__}.to_json")
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def text(self) -> str:
        """The headline numbers in a sentence or two ("" if none)."""
        return ""

    def tables(self) -> list[Table]:
        """The result as captioned tables."""
        return []

    def figures(self) -> list[Figure]:
        """The result's plots."""
        return []

    def _repr_html_(self) -> str:
        """Jupyter: the text, the tables and the figures (inline PNG images)."""
        from lmscope.reports.html import table_html

        blocks = [f"<p>{html.escape(self.text())}</p>"] if self.text() else []
        blocks += [table_html(table.rows, caption=table.caption) for table in self.tables()]
        for figure in self.figures():
            data = base64.b64encode(figure.png_bytes()).decode("ascii")
            blocks.append(f'<img alt="{html.escape(figure.title)}" src="data:image/png;base64,{data}">')
        return "\n".join(blocks) or html.escape(repr(self))


@dataclass
class Skipped(Result):
    """A part that did not run, and why."""

    reason: str

    def text(self) -> str:
        return self.reason


@dataclass
class ModelCard(Result):
    """What was loaded: family, size, dimensions, dtype, device, source (:meth:`Model.card`)."""

    card: dict

    @classmethod
    def of(cls, model: Model) -> ModelCard:
        """The card of ``model``."""
        return cls(model.card())

    def to_json(self) -> dict:
        return dict(self.card)

    def tables(self) -> list[Table]:
        return [Table("", [{"property": k, "value": str(v)} for k, v in self.card.items()])]


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


def save(out: str | Path, payload: dict, figures: Iterable[Figure] = ()) -> Path:
    """Write ``out/results.json`` (atomically), then each figure as ``out/<name>.png``."""
    out = Path(out)
    path = write_json(out / "results.json", payload)
    for figure in figures:
        figure.png(out)
    return path


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as strict JSON (:func:`strict`: NaN and infinities as ``null``)
    atomically: to a temporary file of its own in the same directory, then renamed over
    ``path``, so concurrent writers never mix their files (under torchrun, on rank 0 only)."""
    path = Path(path)
    if not distributed.is_main():
        return path
    text = json.dumps(strict(payload), indent=1, default=float, allow_nan=False)
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path

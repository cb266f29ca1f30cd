"""Figures as data: one :class:`Figure` renders both as a PNG (matplotlib, for papers) and as an
interactive Plotly chart (for the HTML report), so the two never disagree."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_DIVERGING = [[0.0, "#2166ac"], [0.5, "#f7f7f7"], [1.0, "#b2182b"]]  # blue, white, red (RdBu_r)


@dataclass
class Figure:
    """``kind`` "heatmap": ``z`` [rows][cols] with row labels ``y`` and column labels ``x``;
    "lines"/"bars": ``series`` name -> values over ``x``. ``log`` puts the values (colour or
    y axis) on a log scale; ``diverging`` centres a heatmap's colours on 0."""

    name: str
    kind: str
    title: str
    xlabel: str
    ylabel: str
    x: Sequence = ()
    y: Sequence = ()
    z: Sequence = ()
    series: dict[str, Sequence[float]] = field(default_factory=dict)
    log: bool = False
    diverging: bool = False
    value_label: str = "value"

    def plotly(self) -> dict:
        """The Plotly figure dict (see :mod:`lmscope.reports.html`)."""
        from lmscope.reports import html

        common = {"title": self.title, "xlabel": self.xlabel, "ylabel": self.ylabel}
        if self.kind == "heatmap":
            fig = html.heatmap(
                self.z,
                x=list(self.x) or None,
                y=list(self.y) or None,
                colorscale=_DIVERGING if self.diverging else "Viridis",
                zmid=0.0 if self.diverging else None,
                hover_label=self.value_label,
                log_color=self.log,
                **common,
            )
        else:
            draw = html.lines if self.kind == "lines" else html.bars
            fig = draw(list(self.x), self.series, log_y=self.log, **common)
        for axis, labels in (("xaxis", self.x), ("yaxis", self.y)):
            if any(isinstance(v, str) for v in labels):  # labels such as "emb", "0", ..., "norm"
                fig["layout"][axis]["type"] = "category"
        return fig

    def png(self, directory: str | Path) -> Path:
        """Save as ``directory/name.png``."""
        return self._draw(Path(directory) / f"{self.name}.png")

    def png_bytes(self) -> bytes:
        """The PNG image as bytes (for inline images)."""
        buffer = io.BytesIO()
        self._draw(buffer)
        return buffer.getvalue()

    def _draw(self, target: Path | io.BytesIO) -> Path | io.BytesIO:
        from lmscope.reports import plots

        if self.kind == "heatmap":
            z = np.array(self.z, dtype=float)
            values = np.log10(np.where(z > 0, z, np.nan)) if self.log else z
            label = f"log10 {self.value_label}" if self.log else self.value_label
            return plots.heatmap(
                values,
                target,
                self.title,
                self.xlabel,
                self.ylabel,
                xticks=[str(v) for v in self.x] or None,
                yticks=[str(v) for v in self.y] or None,
                diverging=self.diverging,
                colorbar_label=label,
            )
        return plots.chart(self.kind, list(self.x), self.series, target, self.title, self.xlabel, self.ylabel, self.log)

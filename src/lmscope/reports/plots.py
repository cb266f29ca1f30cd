"""Static plots (PNG, matplotlib) for papers and for the CLI's ``--out`` directories.

Each plot is drawn on its own :class:`matplotlib.figure.Figure` with the Agg canvas: no pyplot,
no global backend switch, nothing left open. ``target`` is a path or a binary file object
(e.g. :class:`io.BytesIO`, for inline images).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from lmscope.core import distributed
from lmscope.core.files import atomic

Target = str | Path | IO[bytes]


def _figure(width: float, height: float) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig: Figure, target: Target) -> Path | IO[bytes]:
    fig.tight_layout()
    if isinstance(target, (str, Path)):
        target = Path(target)
        if distributed.is_main():  # under torchrun only rank 0 writes files
            with atomic(target) as tmp:
                fig.savefig(tmp, dpi=120, format="png")
        return target
    fig.savefig(target, dpi=120, format="png")
    return target


def heatmap(
    values: Tensor,
    path: Target,
    title: str,
    xlabel: str,
    ylabel: str,
    xticks: Sequence[str] | None = None,
    yticks: Sequence[str] | None = None,
    diverging: bool = True,
    colorbar_label: str = "",
) -> Path:
    """Save a [rows, cols] heatmap; diverging colours centred on 0 for signed scores."""
    if isinstance(values, Tensor):
        values = values.detach().float().cpu().numpy()
    rows, cols = values.shape
    fig, ax = _figure(min(3 + 0.45 * cols, 16), min(2 + 0.25 * rows, 14))
    if diverging:
        limit = float(np.nanmax(np.abs(values))) or 1.0
        image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    else:
        image = ax.imshow(values, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.8, label=colorbar_label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xticks is not None:
        every = max(1, cols // 40)
        ax.set_xticks(range(0, cols, every), list(xticks)[::every], rotation=60, ha="right", fontsize=8)
    if yticks is not None:
        every = max(1, rows // 40)
        ax.set_yticks(range(0, rows, every), list(yticks)[::every], fontsize=8)
    return _save(fig, path)


def chart(
    kind: str,
    x: Sequence,
    series: Mapping[str, Sequence[float]],
    path: Target,
    title: str,
    xlabel: str,
    ylabel: str,
    log: bool = False,
) -> Path:
    """Save a line chart (``kind="lines"``) or grouped bar chart (``"bars"``) of ``series`` over ``x``."""
    fig, ax = _figure(min(4 + 0.3 * len(x), 12), 4)
    labels = [str(v) for v in x]
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        values = np.array([np.nan if v is None else v for v in values], dtype=float)
        if kind == "bars":
            ax.bar(np.arange(len(x)) + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        else:
            ax.plot(range(len(x)), values, marker="o" if len(x) <= 60 else None, markersize=3, label=name)
    every = max(1, len(x) // 30)
    ax.set_xticks(range(0, len(x), every), labels[::every], rotation=60 if kind == "bars" else 0, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def graph(
    nodes: Sequence[str],
    positions: Mapping[str, tuple[float, float]],
    edges: Sequence[tuple[str, str, float]],
    path: Target,
    title: str = "graph",
    height: float | None = None,
) -> Path:
    """Save a drawing of a weighted graph: ``nodes`` as labelled circles at ``positions`` (x, y),
    ``edges`` ``(from, to, score)`` between node names as lines of width ~ |score|, red
    positive, blue negative. ``height`` (inches) defaults to 2 + 0.3 per distinct y value, at least 4."""
    if height is None:
        height = max(4, 0.3 * len({positions[n][1] for n in nodes}) + 2)
    fig, ax = _figure(8, height)
    biggest = max((abs(s) for *_, s in edges), default=1.0) or 1.0
    for u, v, s in edges:
        (x0, y0), (x1, y1) = positions[u], positions[v]
        ax.plot(
            [x0, x1],
            [y0, y1],
            color="tab:red" if s > 0 else "tab:blue",
            alpha=0.6,
            linewidth=0.5 + 4 * abs(s) / biggest,
        )
    for n in nodes:
        x, y = positions[n]
        ax.scatter([x], [y], s=300, color="white", edgecolors="black", zorder=3)
        ax.annotate(n, (x, y), ha="center", va="center", fontsize=6, zorder=4)
    ax.set_axis_off()
    ax.set_title(title)
    return _save(fig, path)

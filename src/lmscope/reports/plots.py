"""Static plots (PNG, matplotlib) for papers and for the CLI's ``--out`` directories."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt
import numpy as np
from torch import Tensor


def heatmap(
    values: Tensor,
    path: str | Path,
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
    fig, ax = plt.subplots(figsize=(min(3 + 0.45 * cols, 16), min(2 + 0.25 * rows, 14)))
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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def chart(
    kind: str,
    x: Sequence,
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    log: bool = False,
) -> Path:
    """Save a line chart (``kind="lines"``) or grouped bar chart (``"bars"``) of ``series`` over ``x``."""
    fig, ax = plt.subplots(figsize=(min(4 + 0.3 * len(x), 12), 4))
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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Static plots (PNG, matplotlib) for papers and for the CLI's ``--out`` directories."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt
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
) -> Path:
    """Save a [rows, cols] heatmap; diverging colours centred on 0 for signed scores."""
    values = values.detach().float().cpu().numpy()
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * cols, 16), min(1.5 + 0.25 * rows, 14)))
    if diverging:
        limit = float(abs(values).max()) or 1.0
        image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    else:
        image = ax.imshow(values, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xticks is not None:
        ax.set_xticks(range(cols), list(xticks), rotation=60, ha="right", fontsize=8)
    if yticks is not None:
        ax.set_yticks(range(rows), list(yticks), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

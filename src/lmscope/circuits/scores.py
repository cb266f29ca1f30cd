"""Node scores: what exact patching, attribution patching and EAP-IG return."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table


@dataclass
class PatchResult(Result):
    """Normalised scores ``[n_layers, n_positions, n_heads]`` (``n_positions`` is 1 when
    patching all positions at once, ``n_heads`` is 1 for layer components and the number of
    experts for ``expert``), with the metric's
    clean and corrupted baselines (means over pairs)."""

    scores: Tensor
    component: str
    per_position: bool
    direction: str
    metric: str
    clean: float
    corrupt: float
    method: str = "exact"
    tokens: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """The scores as a tidy table: one dict per (layer, position, head)."""
        n_layers, n_pos, n_heads = self.scores.shape
        rows = []
        for layer in range(n_layers):
            for pos in range(n_pos):
                for head in range(n_heads):
                    row = {"layer": layer, "head": head if self.component == "head" else None}
                    if self.component == "expert":
                        row["expert"] = head
                    row["position"] = pos if self.per_position else None
                    row["score"] = float(self.scores[layer, pos, head])
                    rows.append(row)
        return rows

    def top(self, n: int = 10) -> list[dict]:
        """The ``n`` rows with the largest absolute score."""
        return sorted(self.rows(), key=lambda r: -abs(r["score"]))[:n]

    def to_json(self) -> dict:
        """The component, level, method, direction, metric with its clean and corrupted
        baselines, the position tokens and every score as :meth:`rows`."""
        return {
            "component": self.component,
            "per_position": self.per_position,
            "method": self.method,
            "direction": self.direction,
            "metric": self.metric,
            "clean": self.clean,
            "corrupt": self.corrupt,
            "tokens": list(self.tokens),
            "rows": self.rows(),
        }

    def text(self) -> str:
        return f"{self.metric}: clean {self.clean:.3f}, corrupted {self.corrupt:.3f}."

    def tables(self) -> list[Table]:
        """The ten rows of largest |score|."""
        return [Table(f"top {self.component} scores by |score|", self.top(10))]

    def grid(self) -> tuple[list[list[float]], str, list]:
        """The scores as a 2-D ``[layer][column]`` grid with the column axis's label and labels:
        positions (with their tokens) when patching per position, else heads, else the component."""
        _, n_pos, n_heads = self.scores.shape
        if self.per_position:
            return self.scores[:, :, 0].tolist(), "position", list(self.tokens) or list(range(n_pos))
        if self.component in ("head", "expert"):
            return self.scores[:, 0, :].tolist(), self.component, list(range(n_heads))
        return self.scores[:, 0, :].tolist(), self.component, [self.component]

    def figure(self, name: str | None = None, title: str | None = None, value_label: str | None = None) -> Figure:
        """A layer x (head, position or component) heatmap of the scores, diverging around 0;
        by default named after the component, titled with the method, metric and direction."""
        z, xlabel, x = self.grid()
        return Figure(
            name or self.component,
            "heatmap",
            title or f"{self.method} {self.component} ({self.metric}, {self.direction})",
            xlabel,
            "layer",
            x=x,
            y=list(range(len(z))),
            z=z,
            diverging=True,
            value_label=value_label or f"normalised {self.metric}",
        )

    def figures(self) -> list[Figure]:
        return [self.figure()]

"""Node scores: what exact patching, attribution patching and EAP-IG return."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class PatchResult:
    """Normalised scores ``[n_layers, n_positions, n_heads]`` (``n_positions`` is 1 when
    patching all positions at once, ``n_heads`` is 1 for layer components), with the metric's
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
                    rows.append(
                        {
                            "layer": layer,
                            "head": head if self.component == "head" else None,
                            "position": pos if self.per_position else None,
                            "score": float(self.scores[layer, pos, head]),
                        }
                    )
        return rows

    def top(self, n: int = 10) -> list[dict]:
        """The ``n`` rows with the largest absolute score."""
        return sorted(self.rows(), key=lambda r: -abs(r["score"]))[:n]

"""Expert resection as Monet does it (Park et al., ICLR 2025, §5 "domain masking"): remove the
experts most specialised to one domain and measure the loss on every domain, against removing the
same number of experts drawn at random.

A removed expert gets routing weight 0 wherever it was chosen; the other chosen experts keep
their weights (:func:`lmscope.core.moe.resect`). The loss is the mean next-token negative
log-likelihood (nats) over non-overlapping windows (:func:`lmscope.quant.evaluation.perplexity`);
perplexity = exp(loss).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lmscope.core import moe
from lmscope.core.errors import LmscopeError
from lmscope.core.interventions import Intervention
from lmscope.core.model import Model
from lmscope.experts.routing import ExpertStats
from lmscope.core.corpus import Corpus
from lmscope.quant.evaluation import perplexity
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table, nan_for_none

Expert = tuple[int, int]  # (layer, expert)


def resect_all(experts: Sequence[Expert]) -> list[Intervention]:
    """One :func:`lmscope.core.moe.resect` per layer removing the given (layer, expert) pairs."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, expert in experts:
        by_layer[layer].append(expert)
    return [moe.resect(layer, sorted(chosen)) for layer, chosen in sorted(by_layer.items())]


def domain_loss(
    model: Model,
    corpora: Sequence[Corpus],
    experts: Sequence[Expert] = (),
    *,
    window: int = 256,
    batch_size: int = 4,
) -> dict[str, float]:
    """Mean next-token loss (nats) on each corpus with ``experts`` removed."""
    with model.hooks(interventions=resect_all(experts)):
        return {
            c.name: perplexity(model, c, window=window, batch_size=batch_size, label=f"loss on {c.name}")["nll"]
            for c in corpora
        }


@dataclass
class Resection(Result):
    """``baseline``: loss per domain with every expert; ``rows``: one per resection, with
    ``target`` (the domain whose specialists were removed), ``kind`` ("specialised" or
    "random"), ``experts`` (the (layer, expert) pairs; for random, one list per draw) and
    ``loss`` per domain (for random, the mean over draws; ``draws``: each draw's)."""

    n: int
    baseline: dict[str, float]
    rows: list[dict] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict) -> Resection:
        """Read back :meth:`to_json`'s output (a non-finite loss, written as ``null``, as NaN)."""
        rows = []
        for row in data["rows"]:
            losses = {key: nan_for_none(row[key]) for key in ("loss", "draws") if key in row}
            rows.append({**row, **losses, "experts": _pairs(row["experts"], row["kind"])})
        return cls(data["n"], nan_for_none(dict(data["baseline"])), rows)

    def delta(self, row: dict, domain: str) -> float:
        """The loss change on ``domain`` of one resection."""
        return row["loss"][domain] - self.baseline[domain]

    def text(self) -> str:
        parts = []
        for row in self.rows:
            if row["kind"] == "specialised":
                changes = ", ".join(f"{d} {self.delta(row, d):+.3f}" for d in self.baseline)
                parts.append(f"removing the {self.n} experts most specialised to {row['target']}: loss {changes}")
        return "; ".join(parts) + "." if parts else ""

    def tables(self) -> list[Table]:
        """One row per resection: the loss change on each domain (nats) and the perplexity."""
        rows = [{"removed": "none", **{f"loss {d}": v for d, v in self.baseline.items()}}]
        for row in self.rows:
            label = f"{self.n} {row['target']} specialists" if row["kind"] == "specialised" else f"{self.n} random"
            if row["kind"] == "random":
                label += f" (mean of {len(row['draws'])})"
            cells = {"removed": label}
            for d in self.baseline:
                cells[f"loss {d}"] = row["loss"][d]
                cells[f"change {d}"] = self.delta(row, d)
            rows.append(cells)
        return [Table(f"expert resection: loss (nats) per domain, {self.n} experts removed", rows)]

    def figures(self) -> list[Figure]:
        """Loss change per domain for each resection (bars)."""
        labels = [
            f"{r['target']} specialists" if r["kind"] == "specialised" else f"random ({r['target']} run)"
            for r in self.rows
        ]
        series = {d: [self.delta(r, d) for r in self.rows] for d in self.baseline}
        return [Figure("resection", "bars", "loss change after resection", "removed", "change in loss (nats)",
                       x=labels, series=series)]  # fmt: skip


def _pairs(experts: list, kind: str) -> list:
    """(layer, expert) tuples from JSON lists (one list per draw for random rows)."""
    if kind == "random":
        return [[tuple(pair) for pair in draw] for draw in experts]
    return [tuple(pair) for pair in experts]


def resection(
    model: Model,
    corpora: Sequence[Corpus],
    stats: ExpertStats,
    n: int,
    *,
    draws: int = 3,
    seed: int = 0,
    window: int = 256,
    batch_size: int = 4,
    on_row: Callable[[Resection], None] | None = None,
    earlier: Resection | None = None,
) -> Resection:
    """For each domain: remove its ``n`` most specialised experts (:meth:`ExpertStats.most_specialised`)
    and, separately, ``n`` experts drawn uniformly from all (layer, expert) pairs (``draws`` draws,
    seeded); the loss on every domain each time. ``on_row`` gets the table after each row.
    ``earlier``: an interrupted run's table (same model, corpora and settings), whose baseline and
    rows are kept instead of measured again."""
    if n < 1:
        raise LmscopeError(f"--resect must be at least 1 (got {n})")
    if [c.name for c in corpora] != stats.domains:
        raise LmscopeError("the corpora are not those the routing statistics were computed on")
    pool = [(layer, e) for layer in stats.layers for e in range(stats.n_experts)]
    chosen = {d: stats.most_specialised(d, n) for d in stats.domains}  # bad n fails before any forward
    options = {"window": window, "batch_size": batch_size}
    done = {(r["target"], r["kind"]): r for r in earlier.rows} if earlier is not None and earlier.n == n else {}
    baseline = earlier.baseline if done else domain_loss(model, corpora, **options)
    result = Resection(n, baseline)
    rng = random.Random(seed)
    for domain in stats.domains:
        picks = [sorted(rng.sample(pool, n)) for _ in range(draws)]  # drawn always: same seed, same draws
        row = done.get((domain, "specialised"))
        if row is None:
            row = {"target": domain, "kind": "specialised", "experts": chosen[domain]}
            row["loss"] = domain_loss(model, corpora, chosen[domain], **options)
        result.rows.append(row)
        if on_row:
            on_row(result)
        row = done.get((domain, "random"))
        if row is None:
            losses = [domain_loss(model, corpora, pick, **options) for pick in picks]
            mean = {c.name: sum(loss[c.name] for loss in losses) / draws for c in corpora}
            row = {"target": domain, "kind": "random", "experts": picks, "loss": mean, "draws": losses}
        result.rows.append(row)
        if on_row:
            on_row(result)
    return result

"""Several prompt sets of one model side by side (e.g. numeric-year vs alias prompts): their
logit lenses (:class:`LensComparison`) or their direct logit attributions
(:class:`AttributionComparison`), built by :func:`compare`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.readout.attribution import LogitAttribution, heads_figure
from lmscope.readout.logit_lenses import LogitLens
from lmscope.readout.prompts import slug
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table


@dataclass
class LensComparison(Result):
    """Logit lenses of several prompt sets of one model (e.g. numeric-year vs alias prompts),
    compared on answer column ``answer``: ``sets`` name -> :class:`LogitLens`."""

    sets: dict[str, LogitLens]
    answer: int = 0

    def to_json(self) -> dict:
        return {
            "answer": self.answer,
            "layers": self._layers(),
            "median_rank": {k: v.median_rank()[:, self.answer].tolist() for k, v in self.sets.items()},
            "mean_prob": {k: v.mean_prob()[:, self.answer].tolist() for k, v in self.sets.items()},
            "sets": {k: v.to_json() for k, v in self.sets.items()},
        }

    def _layers(self) -> list[str]:
        return next(iter(self.sets.values())).layers

    def text(self) -> str:
        parts = []
        for k, lens in self.sets.items():
            first = lens.first_layer(self.answer)
            reached = first[first >= 0]
            where = f"median first layer {lens.layers[int(reached.float().median())]}" if len(reached) else "never"
            parts.append(f"{k}: answer top-1 to the end in {len(reached)}/{lens.n_prompts} prompts ({where})")
        return "; ".join(parts) + "."

    def tables(self) -> list[Table]:
        """Per layer, each set's median rank and mean probability of the answer."""
        rows = []
        for i, layer in enumerate(self._layers()):
            row: dict = {"layer": layer}
            for k, lens in self.sets.items():
                row[f"{k} median rank"] = float(lens.median_rank()[i, self.answer])
                row[f"{k} mean prob"] = round(float(lens.mean_prob()[i, self.answer]), 6)
            rows.append(row)
        return [Table("logit lens: " + " vs ".join(self.sets), rows)]

    def figures(self) -> list[Figure]:
        """The median rank (log scale) and mean probability per layer, one curve per set."""
        x = self._layers()
        return [
            Figure(
                "logit_lens_rank_compare",
                "lines",
                "logit lens: median rank of the answer (1 = top)",
                "layer",
                "rank",
                x=x,
                series={k: v.median_rank()[:, self.answer].tolist() for k, v in self.sets.items()},
                log=True,
            ),
            Figure(
                "logit_lens_prob_compare",
                "lines",
                "logit lens: mean probability of the answer",
                "layer",
                "probability",
                x=x,
                series={k: v.mean_prob()[:, self.answer].tolist() for k, v in self.sets.items()},
            ),
        ]


@dataclass
class AttributionComparison(Result):
    """Direct logit attributions of several prompt sets of one model, side by side: ``sets``
    name -> :class:`LogitAttribution`. With two sets, the difference is first minus second."""

    sets: dict[str, LogitAttribution]

    def difference(self) -> Tensor | None:
        """Mean head attributions of the first set minus the second's [n_layers, n_heads] (two sets only)."""
        if len(self.sets) != 2:
            return None
        a, b = self.sets.values()
        return a.mean_heads() - b.mean_heads()

    def to_json(self) -> dict:
        diff = self.difference()
        return {
            "mean_heads": {k: v.mean_heads().tolist() for k, v in self.sets.items()},
            "difference": None if diff is None else diff.tolist(),
            "sets": {k: v.to_json() for k, v in self.sets.items()},
        }

    def tables(self) -> list[Table]:
        """The heads of largest |mean attribution| in any set (or of largest |difference|), with
        each set's value."""
        means = {k: v.mean_heads() for k, v in self.sets.items()}
        diff = self.difference()
        key = diff.abs() if diff is not None else torch.stack(list(means.values())).abs().amax(0)
        n_heads = key.shape[1]
        rows = []
        for i in key.flatten().topk(min(20, key.numel())).indices.tolist():
            layer, head = divmod(i, n_heads)
            row: dict = {"head": f"L{layer}H{head}", **{k: float(m[layer, head]) for k, m in means.items()}}
            if diff is not None:
                row["difference"] = float(diff[layer, head])
            rows.append(row)
        order = "|difference|" if diff is not None else "|mean attribution|"
        return [Table(f"direct logit attribution: {' vs '.join(self.sets)}, top heads by {order}", rows)]

    def figures(self) -> list[Figure]:
        """One [layer, head] heatmap per set, and the difference for two sets."""
        figures = [
            heads_figure(f"dla_heads_{slug(k)}", f"direct logit attribution ({k}): {v._what()}", v.mean_heads())
            for k, v in self.sets.items()
        ]
        diff = self.difference()
        if diff is not None:
            a, b = self.sets
            figures.append(heads_figure("dla_heads_difference", f"direct logit attribution: {a} - {b}", diff))
        return figures


def compare(
    sets: Mapping[str, LogitLens] | Mapping[str, LogitAttribution], answer: int = 0
) -> LensComparison | AttributionComparison:
    """Several prompt sets side by side: ``{"numeric": lens_a, "alias": lens_b}`` gives a
    :class:`LensComparison` (on answer column ``answer``), attributions an
    :class:`AttributionComparison`."""
    if not sets:
        raise LmscopeError("compare: no prompt sets")
    values = list(sets.values())
    if all(isinstance(v, LogitLens) for v in values):
        if len({tuple(v.layers) for v in values}) != 1:
            raise LmscopeError("compare: the lenses read different layers (different models?)")
        if any(not 0 <= answer < len(v.labels) for v in values):
            raise LmscopeError(f"compare: answer column {answer} missing from a lens")
        return LensComparison(dict(sets), answer)
    if all(isinstance(v, LogitAttribution) for v in values):
        if len({tuple(v.heads.shape[:2]) for v in values}) != 1:
            raise LmscopeError("compare: the attributions have different layers or heads (different models?)")
        return AttributionComparison(dict(sets))
    raise LmscopeError("compare: give only LogitLens results or only LogitAttribution results")

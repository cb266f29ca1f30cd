"""Zero-ablating temporal heads: what the model still knows, and whether it still speaks.

"Temporal Heads" (Park et al., ACL 2025, arXiv 2502.14258), notebooks ``4.ablation_example``
and ``5.compute-logprobs``: a head is zero-ablated by zeroing its slice of the attention output
projection's input (``blocks.L.attn.z`` at head H, every position, TransformerLens's
``hook_z``). Each temporal head alone, then all together; for each, multiple-choice recall per
category (:func:`lmscope.temporal.recall.recall`) and the perplexity of a general corpus
(WikiText-2 by default) as the general-ability check. The paper's finding: temporal recall
drops, invariant recall and perplexity barely move.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmscope.circuits.nodes import head_node
from lmscope.core.interventions import Intervention, zero
from lmscope.core.model import Model
from lmscope.core.progress import progress_bar
from lmscope.core.corpus import Corpus
from lmscope.quant.evaluation import perplexity
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table
from lmscope.temporal.data import Category
from lmscope.temporal.recall import Recall, recall

NONE, ALL = "none", "all temporal heads"


def zero_heads(heads: Sequence[tuple[int, int]]) -> list[Intervention]:
    """Zero-ablation of each ``(layer, head)``: its ``blocks.L.attn.z`` slice at every position."""
    return [zero(f"blocks.{layer}.attn.z", head=head) for layer, head in heads]


@dataclass
class AblationRow:
    """Recall (and perplexity) with ``heads`` zeroed (``label``: ``none``, ``a{L}.h{H}`` or all)."""

    label: str
    heads: list[tuple[int, int]]
    recall: Recall
    perplexity: float | None

    def mean(self, kind: str, key: str = "accuracy") -> float | None:
        values = [getattr(c, key) for c in self.recall.categories if c.kind == kind]
        return sum(values) / len(values) if values else None


@dataclass
class Ablation(Result):
    """Recall per category and perplexity without ablation, with each temporal head zeroed
    alone, and with all of them zeroed (:func:`ablation`)."""

    rows: list[AblationRow]
    corpus: str | None

    def to_json(self) -> dict:
        return {
            "corpus": self.corpus,
            "rows": [
                {
                    "ablated": r.label,
                    "heads": [list(h) for h in r.heads],
                    "perplexity": r.perplexity,
                    "categories": {
                        c.name: {"kind": c.kind, "accuracy": c.accuracy, "gold_probability": c.gold_probability}
                        for c in r.recall.categories
                    },
                }
                for r in self.rows
            ],
        }

    def row(self, label: str) -> AblationRow:
        return next(r for r in self.rows if r.label == label)

    def text(self) -> str:
        if len(self.rows) < 2:
            return "No temporal heads to ablate: recall without ablation only."
        base, all_ = self.rows[0], self.row(ALL)
        parts = []
        for kind in ("temporal", "invariant"):
            a, b = base.mean(kind), all_.mean(kind)
            if a is not None:
                parts.append(f"{kind} recall {a:.3f} -> {b:.3f}")
        if base.perplexity is not None:
            parts.append(f"{self.corpus} perplexity {base.perplexity:.3f} -> {all_.perplexity:.3f}")
        return f"Zeroing all {len(all_.heads)} temporal heads: " + "; ".join(parts) + "."

    def tables(self) -> list[Table]:
        rows = []
        for r in self.rows:
            row = {"ablated": r.label}
            for kind in ("temporal", "invariant"):
                for key, short in (("accuracy", "acc"), ("gold_probability", "p(gold)")):
                    value = r.mean(kind, key)
                    if value is not None:
                        row[f"{kind} {short}"] = round(value, 4)
            if r.perplexity is not None:
                row["perplexity"] = round(r.perplexity, 4)
            for c in r.recall.categories:
                row[c.name] = round(c.accuracy, 4)
            rows.append(row)
        return [Table("multiple-choice accuracy (mean over categories, then each) and perplexity", rows)]

    def figures(self) -> list[Figure]:
        labels = [r.label for r in self.rows]
        series = {}
        for kind in ("temporal", "invariant"):
            values = [r.mean(kind) for r in self.rows]
            if all(v is not None for v in values):
                series[f"{kind} accuracy"] = values
        return [
            Figure(
                "ablation", "bars", "recall with temporal heads zeroed", "ablated", "accuracy", x=labels, series=series
            )
        ]


def ablation(
    model: Model,
    heads: Sequence[tuple[int, int]],
    categories: Sequence[Category],
    *,
    alone: Sequence[tuple[int, int]] | None = None,
    corpus: Corpus | None = None,
    window: int = 512,
    recall_options: dict | None = None,
    baseline: Recall | None = None,
    on_row: Callable[[Ablation], None] | None = None,
) -> Ablation:
    """Recall of ``categories`` (options of :func:`recall` in ``recall_options``) and the
    perplexity of ``corpus`` (windows of ``window`` tokens; None: skipped) with nothing zeroed,
    each of ``alone`` (default: every one of ``heads``) zeroed alone, and all ``heads`` zeroed
    together (the last two only with heads). ``baseline``: the recall of ``categories`` with
    nothing zeroed, if already computed (with the same options), reused for the first row.
    ``on_row`` sees the table after each row (to save partial results)."""
    plans = [(NONE, [])]
    if heads:
        alone = heads if alone is None else alone
        plans += [(head_node(layer, head), [(layer, head)]) for layer, head in alone] + [(ALL, list(heads))]
    result = Ablation([], corpus.name if corpus is not None else None)
    with progress_bar("ablation", len(plans)) as advance:
        for label, zeroed in plans:
            interventions = zero_heads(zeroed)
            if not zeroed and baseline is not None:
                known = baseline
            else:
                known = recall(model, categories, interventions=interventions, **(recall_options or {}))
            ppl = None
            if corpus is not None:
                with model.hooks(interventions=interventions):
                    ppl = perplexity(model, corpus, window=window, label=f"perplexity ({label})")["perplexity"]
            result.rows.append(AblationRow(label, zeroed, known, ppl))
            if on_row is not None:
                on_row(result)
            advance(1)
    return result

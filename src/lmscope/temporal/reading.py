"""Reading the temporal heads: the logit lens and direct logit attribution on numeric-year and
alias prompts side by side.

"Temporal Heads" (Park et al., ACL 2025, arXiv 2502.14258), notebook ``3.logit_lens``: at the
answer position (the prompt's last token), the logit lens (the residual stream after every
layer through the final norm and the unembedding: rank and probability of the answer's first
token) and direct logit attribution of every head and MLP (TransformerLens's
``stack_head_results(apply_ln=True)``), for prompts that name the year ("In year 2004, ...")
and the same facts with the year said as an event (``alias_time_templates``: "In the year the
Summer Olympics were held in Athens, ..."). Do the temporal heads respond to the alias as to the
number? (:mod:`lmscope.readout` computes both readings.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmscope.circuits.nodes import head_node
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.core.scoring import padded
from lmscope.readout import (
    AttributionComparison,
    LensComparison,
    compare,
    direct_logit_attribution,
    logit_lens,
)
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table
from lmscope.temporal.data import PromptTokens, TemporalCategory


@dataclass(frozen=True)
class ReadingPrompt:
    """One fact as a numeric-year prompt and as an alias prompt, with its answer."""

    category: str
    subject: str
    time: str
    numeric: str
    alias: str
    answer: str


def reading_prompts(
    categories: Sequence[TemporalCategory], *, per_category: int = 16, template: int = 0
) -> list[ReadingPrompt]:
    """Up to ``per_category`` samples of each category whose year has an alias sentence, in file
    order: the prompt with the year (``prompt_templates[template]``) and with its alias."""
    out = []
    for c in categories:
        if not 0 <= template < len(c.prompt_templates):
            raise LmscopeError(f"{c.name}: no prompt template {template}")
        rows = [
            ReadingPrompt(
                c.name,
                s.subject,
                s.time,
                c.prompt_templates[template].format(time=s.time, subject=s.subject),
                c.alias(s.time).format(s.subject),
                s.object,
            )
            for s in c.samples
            if c.alias(s.time)
        ]
        out += rows[:per_category]
    return out


@dataclass
class HeadReading(Result):
    """Logit lens and direct logit attribution of numeric vs alias prompts (``lens``, ``dla``)
    and each temporal head's mean attribution to the answer in both (``heads``)."""

    prompts: list[ReadingPrompt]
    heads: list[tuple[int, int]]
    lens: LensComparison
    dla: AttributionComparison

    def head_rows(self) -> list[dict]:
        numeric, alias = (self.dla.sets[k].mean_heads() for k in ("numeric", "alias"))
        rows = []
        for layer, head in self.heads:
            rank = lambda grid, h=(layer, head): int((grid.flatten() > grid[h]).sum()) + 1
            rows.append(
                {
                    "head": head_node(layer, head),
                    "DLA numeric": round(float(numeric[layer, head]), 4),
                    "DLA alias": round(float(alias[layer, head]), 4),
                    "rank numeric": rank(numeric),
                    "rank alias": rank(alias),
                }
            )
        return rows

    def to_json(self) -> dict:
        return {
            "prompts": [p.__dict__ for p in self.prompts],
            "heads": self.head_rows(),
            "lens": self.lens.to_json(),
            "dla": self.dla.to_json(),
        }

    def text(self) -> str:
        final = {k: float(v.mean_prob()[-1, 0]) for k, v in self.lens.sets.items()}
        return (
            f"{len(self.prompts)} facts read at the answer position: final-layer probability of the answer "
            f"{final['numeric']:.3f} with the year as a number, {final['alias']:.3f} with the year as an event. "
            + self.lens.text()
        )

    def tables(self) -> list[Table]:
        heads = [
            Table("temporal heads: direct logit attribution to the answer (rank among all heads)", self.head_rows())
        ]
        return heads + self.lens.tables() + self.dla.tables()

    def figures(self) -> list[Figure]:
        return self.lens.figures() + self.dla.figures()


def read_heads(
    model: Model,
    categories: Sequence[TemporalCategory],
    heads: Sequence[tuple[int, int]],
    *,
    per_category: int = 16,
    template: int = 0,
    bos: bool = True,
) -> HeadReading:
    """The logit lens and direct logit attribution of the answer's first token at the last
    position of each numeric-year and alias prompt (:func:`reading_prompts`), ``bos`` prepended
    as the paper's code does; ``heads`` (the temporal heads) are tabulated."""
    prompts = reading_prompts(categories, per_category=per_category, template=template)
    if not prompts:
        raise LmscopeError("no temporal category with alias templates to read")
    tokens = PromptTokens(model, bos)
    lenses, attributions = {}, {}
    for kind in ("numeric", "alias"):
        texts = [getattr(p, kind) for p in prompts]
        sequences = [tokens.prompt(t) for t in texts]
        inputs = padded(model, sequences)
        last = [len(s) - 1 for s in sequences]  # each right-padded prompt's last token
        answers = torch.tensor([tokens.first_answer_token(t, p.answer) for t, p in zip(texts, prompts)])
        lenses[kind] = logit_lens(model, inputs, answers, position=last, name=kind)
        attributions[kind] = direct_logit_attribution(model, inputs, answers, position=last, name=kind)
    return HeadReading(prompts, list(heads), compare(lenses), compare(attributions))

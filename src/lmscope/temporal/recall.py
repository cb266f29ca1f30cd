"""What the model knows: multiple-choice recall of each category's facts, as the paper's
``5.compute-logprobs.ipynb`` measures it ("Temporal Heads", Park et al., ACL 2025, arXiv
2502.14258), with or without interventions (head ablations).

For a sample, each candidate object c (the subject's ``all_possible_objects`` for a temporal
category, every object of the category, sorted, for an invariant one) is scored by

    score(c) = log p(prompt + " " + c) - log p(prompt),

each the summed log-probability of a tokenised sequence's tokens after its first, the candidate
tokenised *together with* the prompt (so the difference is the log-probability of the
candidate's tokens after the prompt), not length-normalised. Question templates
(``prompt_templates_zs``) go through the tokenizer's chat template when it has one: the
prompt is the user turn with the generation prompt, the candidate sequence the conversation
with the assistant turn ``"The answer is: " + c``. The softmax of the scores over the
candidates gives the gold object's probability (the notebook's table averages it over the
samples, template ``prompt_templates_zs:0``); top-1 accuracy is how often the gold object
scores highest.

All sequences of a category run in batches (right-padded, the padding masked out of the
sums, so the scores equal separate unpadded forwards), one forward per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from lmscope.core.errors import LmscopeError
from lmscope.core.interventions import Intervention
from lmscope.core.model import Model
from lmscope.core.scoring import sequence_logprobs
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table
from lmscope.temporal.data import Category, TemporalCategory

TEMPLATE_KEYS = ("prompt_templates", "prompt_templates_zs")
ANSWER_PREFIX = "The answer is: "  # the assistant turn of the paper's chat-template scoring


@dataclass
class CategoryRecall:
    """Recall of one category: ``n`` samples, top-1 ``accuracy``, mean probability of the gold
    object over its candidates, and chance (mean 1 / number of candidates). ``predictions``:
    per sample ``{subject, time (temporal), object, predicted, p_gold}``."""

    name: str
    kind: str
    n: int
    accuracy: float
    gold_probability: float
    chance: float
    predictions: list[dict] = field(default_factory=list)


@dataclass
class Recall(Result):
    """Multiple-choice recall per category (:func:`recall`)."""

    categories: list[CategoryRecall]
    templates: str
    template: int
    chat: bool

    def to_json(self) -> dict:
        return {
            "templates": self.templates,
            "template": self.template,
            "chat": self.chat,
            "categories": [asdict(c) for c in self.categories],
        }

    def text(self) -> str:
        if not self.categories:
            return ""
        mean = lambda key: sum(getattr(c, key) for c in self.categories) / len(self.categories)
        return (
            f"Multiple-choice recall ({self.templates}[{self.template}]{', chat template' if self.chat else ''}) "
            f"over {len(self.categories)} categories: mean accuracy {mean('accuracy'):.3f}, "
            f"mean gold probability {mean('gold_probability'):.3f} (chance {mean('chance'):.3f}). "
            + "; ".join(self.verdicts().values())
            + "."
        )

    def verdicts(self) -> dict[str, str]:
        """Per kind, whether mean top-1 accuracy is within two binomial standard errors of chance
        ("near chance") or above it, from the samples' count and mean chance."""
        out = {}
        for kind in ("temporal", "invariant"):
            cats = [c for c in self.categories if c.kind == kind and c.n]
            if not cats:
                continue
            n = sum(c.n for c in cats)
            accuracy = sum(c.accuracy * c.n for c in cats) / n
            chance = sum(c.chance * c.n for c in cats) / n
            bound = chance + 2 * (chance * (1 - chance) / n) ** 0.5
            verdict = "near chance" if accuracy <= bound else "above chance"
            out[kind] = f"{kind} accuracy {accuracy:.3f} vs chance {chance:.3f} over {n} samples: {verdict}"
        return out

    def tables(self) -> list[Table]:
        rows = [
            {
                "category": c.name,
                "kind": c.kind,
                "n": c.n,
                "accuracy": round(c.accuracy, 4),
                "gold probability": round(c.gold_probability, 4),
                "chance": round(c.chance, 4),
            }
            for c in self.categories
        ]
        return [Table("Multiple-choice recall per category", rows)]

    def figures(self) -> list[Figure]:
        if not self.categories:
            return []
        return [
            Figure(
                name="recall",
                kind="bars",
                title="Multiple-choice recall",
                xlabel="category",
                ylabel="",
                x=[c.name for c in self.categories],
                series={
                    "accuracy": [c.accuracy for c in self.categories],
                    "gold probability": [c.gold_probability for c in self.categories],
                    "chance": [c.chance for c in self.categories],
                },
            )
        ]


def _texts(model: Model, category: Category, sample, fmt: str, chat: bool) -> tuple[str, list[str]]:
    """The prompt and the candidate sequences of ``sample``, as text."""
    fill = {"subject": sample.subject}
    if isinstance(category, TemporalCategory):
        fill["time"] = sample.time
    question = fmt.format(**fill)
    candidates = category.candidates(sample.subject)
    if not chat:
        return question, [f"{question} {c}" for c in candidates]
    user = {"role": "user", "content": question}
    render = model.tokenizer.apply_chat_template
    prompt = render([user], tokenize=False, add_generation_prompt=True)
    answers = [render([user, {"role": "assistant", "content": ANSWER_PREFIX + c}], tokenize=False) for c in candidates]
    return prompt, answers


def _ids(model: Model, text: str, bos: bool) -> list[int]:
    """``text``'s token ids with BOS prepended (when ``bos`` and not already first)."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    first = model.bos_ids() if bos else []
    return ids if ids[:1] == first else first + ids


def category_recall(
    model: Model,
    category: Category,
    *,
    templates: str = "prompt_templates_zs",
    template: int = 0,
    chat: bool = True,
    bos: bool = True,
    interventions: Sequence[Intervention] = (),
    batch_size: int = 32,
) -> CategoryRecall:
    """Multiple-choice recall of one category (see the module docstring and :func:`recall`)."""
    use_chat = _use_chat(model, templates, chat)
    prompts = getattr(category, templates)
    if not 0 <= template < len(prompts):
        raise LmscopeError(f"{category.name}: no template {templates}[{template}] ({len(prompts)} usable)")
    sequences: dict[str, int] = {}  # text -> index of its token ids in `ids`
    ids, layout = [], []
    for sample in category.samples:
        prompt, candidates = _texts(model, category, sample, prompts[template], use_chat)
        for text in (prompt, *candidates):
            if text not in sequences:
                sequences[text] = len(ids)
                ids.append(_ids(model, text, bos))
        layout.append((sequences[prompt], [sequences[t] for t in candidates]))
    logprobs = sequence_logprobs(model, ids, interventions=interventions, batch_size=batch_size)
    predictions = []
    for sample, (p, cs) in zip(category.samples, layout, strict=True):
        scores = logprobs[cs] - logprobs[p]
        names = category.candidates(sample.subject)
        gold = names.index(sample.object)
        row = {"subject": sample.subject, "object": sample.object}
        if isinstance(category, TemporalCategory):
            row["time"] = sample.time
        row["predicted"] = names[int(scores.argmax())]
        row["p_gold"] = float(scores.softmax(0)[gold])
        row["n_candidates"] = len(names)
        predictions.append(row)
    n = len(predictions)
    mean = lambda values: sum(values) / n if n else float("nan")
    return CategoryRecall(
        category.name,
        category.kind,
        n,
        mean([r["predicted"] == r["object"] for r in predictions]),
        mean([r["p_gold"] for r in predictions]),
        mean([1 / r["n_candidates"] for r in predictions]),
        predictions,
    )


def _use_chat(model: Model, templates: str, chat: bool) -> bool:
    if templates not in TEMPLATE_KEYS:
        raise LmscopeError(f"templates must be one of {', '.join(TEMPLATE_KEYS)}, not {templates!r}")
    if model.tokenizer is None:
        raise LmscopeError(f"model {model.name} has no tokenizer: recall is scored on text")
    return chat and templates == "prompt_templates_zs" and bool(getattr(model.tokenizer, "chat_template", None))


def recall(
    model: Model,
    categories: Sequence[Category],
    *,
    templates: str = "prompt_templates_zs",
    template: int = 0,
    chat: bool = True,
    bos: bool = True,
    interventions: Sequence[Intervention] = (),
    batch_size: int = 32,
) -> Recall:
    """Multiple-choice recall of each category ("Temporal Heads", notebook
    ``5.compute-logprobs.ipynb``): per sample, the candidates' summed log-probabilities after
    the prompt, their softmax and argmax; per category top-1 accuracy, the mean gold-object
    probability and ``n``.

    ``templates``/``template``: which prompt list and which of its templates (the paper's table:
    ``"prompt_templates_zs"``, 0); ``chat``: question templates through the tokenizer's chat
    template when it has one (plain text otherwise, and always for ``"prompt_templates"``);
    ``bos``: prepend BOS to every sequence (chat text keeps the template's own);
    ``interventions``: applied to every forward (e.g. zeroed temporal heads)."""
    results = [
        category_recall(
            model,
            c,
            templates=templates,
            template=template,
            chat=chat,
            bos=bos,
            interventions=interventions,
            batch_size=batch_size,
        )
        for c in categories
    ]
    return Recall(results, templates, template, _use_chat(model, templates, chat))

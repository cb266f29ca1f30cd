"""Evaluation under simulated quantisation: perplexity, multiple-choice accuracy, comparison tables.

- **Perplexity** with the strided sliding-window protocol of Hugging Face's "Perplexity of
  fixed-length models" guide: windows of ``window`` tokens start every ``stride`` tokens; the
  first window scores all its predictions, later ones only their last ``stride`` tokens (the
  rest is context). ``stride = window`` (the default) is plain non-overlapping windows.
  ``exp(mean negative log-likelihood)`` over the scored tokens.
- **Multiple choice**: each JSONL line ``{"context": str, "choices": [str, ...], "answer": int}``;
  every choice is scored by the summed log-probability of its tokens after the context (the
  context and the choice tokenised separately and concatenated), as lm-evaluation-harness's
  ``acc``; the prediction is the highest-scoring choice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lmscope.core import distributed
from lmscope.core.errors import LmscopeError
from lmscope.core.jsonl import INTEGER, TEXT, Schema, list_of, read_rows
from lmscope.core.model import Model
from lmscope.core.progress import progress_bar
from lmscope.quant.configs import QuantConfig
from lmscope.core.corpus import Corpus
from lmscope.quant.simulate import quantized
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table


def _token_nll(model: Model, ids: Tensor) -> Tensor:
    """Negative log-likelihood of each next token: ids [batch, pos] -> [batch, pos - 1]."""
    logits = model.hf(input_ids=ids.to(model.device), use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:].to(model.device), reduction="none")


def perplexity(
    model: Model,
    corpus: Corpus,
    *,
    window: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    config: QuantConfig | None = None,
    label: str = "perplexity",
) -> dict:
    """Perplexity of ``corpus`` (protocol in the module docstring), optionally under ``config``.
    Returns ``{"perplexity", "nll", "n_scored", "seconds", "tokens_per_second"}``."""
    stride = stride or window
    if stride > window:
        raise LmscopeError(f"stride {stride} is longer than the window {window}")
    windows = corpus.windows(window, stride)
    batches = list(zip(range(0, len(windows), batch_size), windows.split(batch_size)))

    def batch_nll(item: tuple[int, Tensor]) -> list[Tensor]:
        first, batch = item
        nll = _token_nll(model, batch)
        scored = torch.ones_like(nll, dtype=torch.bool)
        context = window - stride - 1  # predictions of the tokens before the last `stride`
        if context > 0:
            scored[:, :context] = False
        if first == 0:
            scored[0] = True
        advance(len(batch) * distributed.world_size())
        return [torch.tensor([float(nll[scored].double().sum()), float(scored.sum())], dtype=torch.float64)]

    start = time.perf_counter()
    with (
        torch.no_grad(),
        quantized(model, config or QuantConfig()),
        progress_bar(label, len(windows)) as advance,
    ):
        # Under torchrun each rank sums its share of the batches, then the ranks' sums add up.
        (sums,) = distributed.shard_sum(batches, batch_nll)
    total, count = float(sums[0]), int(sums[1])
    seconds = time.perf_counter() - start
    mean = total / count
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "n_scored": count,
        "seconds": seconds,
        "tokens_per_second": windows.numel() / seconds,
    }


@dataclass(frozen=True)
class Choice:
    """One multiple-choice item."""

    context: str
    choices: tuple[str, ...]
    answer: int


CHOICE = Schema({"context": TEXT, "choices": list_of(TEXT, at_least=2), "answer": INTEGER})


def load_choices(path: str | Path) -> list[Choice]:
    """Read a multiple-choice JSONL file (:data:`CHOICE` rows; ``answer`` the index of the right
    choice); errors name the file, line and field."""
    items = []
    for where, row, _ in read_rows(path, CHOICE, what="multiple-choice items"):
        context, choices, answer = row["context"], row["choices"], row["answer"]
        if not 0 <= answer < len(choices):
            raise LmscopeError(f"{where}: field 'answer' must be the index of a choice (0..{len(choices) - 1}), not {answer}")
        items.append(Choice(context, tuple(choices), answer))
    return items


def choice_scores(model: Model, item: Choice) -> Tensor:
    """Summed log-probability of each choice's tokens after the context: [n_choices]."""
    tok = model.tokenizer
    context = tok(item.context, add_special_tokens=False)["input_ids"]
    seqs = [context + tok(c, add_special_tokens=False)["input_ids"] for c in item.choices]
    width = max(map(len, seqs))
    pad = model.pad_id or 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    nll = _token_nll(model, ids)
    scores = []
    for row, seq in enumerate(seqs):
        scores.append(-nll[row, len(context) - 1 : len(seq) - 1].double().sum())
    return torch.stack(scores)


def choice_accuracy(model: Model, items: Sequence[Choice], *, config: QuantConfig | None = None) -> dict:
    """Accuracy of log-probability scoring on ``items``, optionally under ``config``."""
    correct = 0
    with torch.no_grad(), quantized(model, config or QuantConfig()), progress_bar("multiple choice", len(items)) as adv:
        for item in items:
            correct += int(choice_scores(model, item).argmax()) == item.answer
            adv(1)
    return {"accuracy": correct / len(items), "n": len(items)}


@dataclass
class QuantTable(Result):
    """One row per quantisation config: ``config`` (its name), ``k_bits``/``v_bits`` (mean over
    layers, None = full precision), ``weight_bits``, ``act_bits``, ``perplexity``, ``seconds``,
    ``accuracy`` (with multiple-choice items) and ``delta_perplexity`` (from the first row)."""

    rows: list[dict]
    caption: str = "simulated quantisation"

    def to_json(self) -> dict:
        return {"rows": self.rows}

    def tables(self) -> list[Table]:
        """Config, K and V bits ("fp": full precision), perplexity, its change, seconds (and
        weight/activation bits and accuracy where any row has them)."""
        optional = [
            (key, label)
            for key, label in (("weight_bits", "W bits"), ("act_bits", "A bits"), ("accuracy", "accuracy"))
            if any(row.get(key) is not None for row in self.rows)
        ]
        rows = []
        for r in self.rows:
            row = {
                "config": r["config"],
                "K bits": r["k_bits"] if r["k_bits"] is not None else "fp",
                "V bits": r["v_bits"] if r["v_bits"] is not None else "fp",
                "perplexity": r["perplexity"],
                "change": r["delta_perplexity"],
                "seconds": r["seconds"],
            }
            row.update({label: r.get(key) for key, label in optional})
            rows.append(row)
        return [Table(self.caption, rows)]

    def figures(self) -> list[Figure]:
        """Perplexity per config (log scale)."""
        return [
            Figure(
                "quant_perplexity",
                "bars",
                "perplexity under simulated quantisation",
                "configuration",
                "perplexity",
                x=[r["config"] for r in self.rows],
                series={"perplexity": [r["perplexity"] for r in self.rows]},
                log=True,
            )
        ]


def quant_table(
    model: Model,
    corpus: Corpus,
    configs: Sequence[QuantConfig],
    *,
    window: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    choices: Sequence[Choice] | None = None,
    on_row: Callable[[QuantTable], None] | None = None,
) -> QuantTable:
    """Perplexity (and multiple-choice accuracy) of each config, one row per config, with its
    average KV bits and the perplexity change from the first row (the baseline). ``on_row``
    is called with the table so far after each row (e.g. to save partial results)."""
    rows = []
    for config in configs:
        result = perplexity(
            model, corpus, window=window, stride=stride, batch_size=batch_size, config=config, label=config.name
        )
        k, v = zip(*(config.kv.bits(layer) for layer in range(model.n_layers)))
        row = {
            "config": config.name,
            "k_bits": _mean_bits(k),
            "v_bits": _mean_bits(v),
            "weight_bits": config.weight_bits,
            "act_bits": config.act_bits,
            "perplexity": result["perplexity"],
            "seconds": result["seconds"],
        }
        if choices:
            row["accuracy"] = choice_accuracy(model, choices, config=config)["accuracy"]
        row["delta_perplexity"] = row["perplexity"] - (rows[0] if rows else row)["perplexity"]
        rows.append(row)
        if on_row is not None:
            on_row(QuantTable(list(rows)))
    return QuantTable(rows)


def _mean_bits(bits: Sequence[int | None]) -> float | None:
    return None if any(b is None for b in bits) else sum(bits) / len(bits)

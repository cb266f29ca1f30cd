"""The A/B of pre-training recipes (OSP's ablation of its components, Park et al. 2025, arXiv
2506.19697, at toy scale): every recipe trained with the same initialisation, data order and
steps, then evaluated on the same text:

- **OSP excess kurtosis over training** (:class:`~lmscope.training.pretrain.TrainingRun`'s log)
  and at the end, with OSP's protocol (every token its own sequence) and in context;
- **massive activations** at the end (Sun et al. 2024: |x| > 100 and > 1000 x the median |x| of
  the hidden state), in context, from :func:`lmscope.quant.outliers.activation_stats`;
- **perplexity** (:func:`lmscope.quant.evaluation.perplexity`, windows of the training length)
  in full precision, in OSP's W4A4KV4 setting (:func:`lmscope.quant.osp.osp_quantized`: 4-bit
  weights, activations and KV cache as OSP's evaluation code runs them), and in W4A4KV4 after
  the Hadamard rotation (:func:`lmscope.quant.rotation.rotated`, QuaRot's, as OSP's "Had." rows).

:func:`run_pretraining` writes ``results.json``, ``report.html`` and the PNGs part by part
(one part per recipe, then the comparison), so an interrupted A/B keeps its finished recipes, and
``resume=True`` picks up from the finished parts and the checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmscope.core import load
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.core.corpus import Corpus
from lmscope.quant.evaluation import perplexity
from lmscope.quant.osp import osp_quantized
from lmscope.quant.outliers import activation_stats
from lmscope.quant.rotation import rotated
from lmscope.reports.figures import Figure
from lmscope.reports.command import RunWriter
from lmscope.reports.results import Result, Table
from lmscope.training.osp import RECIPES, get_recipe
from lmscope.training.pretrain import (
    PretrainSettings,
    TrainingRun,
    evaluation_corpus,
    llama_config,
    load_tokenizer,
    pretrain,
    training_corpus,
)

MASSIVE_TOKENS = 4096  # evaluation tokens for the in-context outlier statistics


@dataclass(frozen=True)
class QuantScheme:
    """A numeric setting to evaluate in: its name and a context manager factory for a Model."""

    name: str
    enter: Callable[[Model], contextlib.AbstractContextManager]


@contextlib.contextmanager
def _w4a4kv4_rotated(model: Model) -> Iterator[None]:
    with rotated(model, seed=0), osp_quantized(model):
        yield


SCHEMES = (
    QuantScheme("fp", lambda model: contextlib.nullcontext()),
    QuantScheme("W4A4KV4", lambda model: osp_quantized(model)),
    QuantScheme("W4A4KV4+rot", _w4a4kv4_rotated),
)


def evaluate(
    model: Model, corpus: Corpus, probe: Corpus, *, window: int, schemes: Sequence[QuantScheme] = SCHEMES
) -> dict:
    """The end-of-training numbers of ``model`` on ``corpus``: ``perplexity`` per scheme name,
    ``osp_kurtosis`` (OSP's protocol on ``probe``), ``in_context_kurtosis``, ``max_abs`` (over
    the residual hidden states), ``massive`` (rows of
    :meth:`lmscope.quant.outliers.OutlierStats.massive`, in context on the first
    :data:`MASSIVE_TOKENS` tokens) and ``seconds``."""
    start = time.perf_counter()
    ppl = {}
    for scheme in schemes:
        with scheme.enter(model):
            result = perplexity(model, corpus, window=window, label=f"perplexity {scheme.name}")
        ppl[scheme.name] = result["perplexity"]
    in_context = activation_stats(model, corpus.head(MASSIVE_TOKENS), window=window).summary(model.tokenizer)
    osp = activation_stats(model, probe, protocol="osp", window=min(window, len(probe)))
    return {
        "perplexity": ppl,
        "osp_kurtosis": osp.osp_kurtosis,
        "in_context_kurtosis": in_context.osp_kurtosis,
        "max_abs": max(site["max_abs"] for site in in_context.sites.values()),
        "massive": in_context.massive,
        "seconds": time.perf_counter() - start,
    }


@dataclass
class Comparison(Result):
    """The recipes side by side: one :class:`TrainingRun` (with its evaluation) per recipe."""

    runs: list[TrainingRun]

    def to_json(self) -> dict:
        return {"runs": {run.recipe: run.to_json() for run in self.runs}}

    @property
    def schemes(self) -> list[str]:
        names: dict[str, None] = {}
        for run in self.runs:
            names.update(dict.fromkeys((run.evaluation or {}).get("perplexity", {})))
        return list(names)

    def text(self) -> str:
        done = [run for run in self.runs if run.evaluation]
        if not done:
            return ""
        parts = [
            f"{run.recipe}: kurtosis {run.evaluation['osp_kurtosis']:.2f}, "
            + ", ".join(f"perplexity {name} {value:.1f}" for name, value in run.evaluation["perplexity"].items())
            for run in done
        ]
        return "; ".join(parts) + "."

    def tables(self) -> list[Table]:
        """Per recipe: final loss, OSP kurtosis (OSP's protocol and in context), max |x|, number
        of massive activations, perplexity per scheme, milliseconds per step; then the massive
        activations."""
        rows, massive = [], []
        for run in self.runs:
            ev = run.evaluation or {}
            row = {
                "recipe": run.recipe,
                "steps": run.done,
                "final loss": run.final_loss,
                "OSP kurtosis": ev.get("osp_kurtosis"),
                "in-context kurtosis": ev.get("in_context_kurtosis"),
                "max |x|": ev.get("max_abs"),
                "massive": len(ev.get("massive", [])) if ev else None,
            }
            row.update({f"ppl {name}": ev.get("perplexity", {}).get(name) for name in self.schemes})
            row["ms/step"] = 1000 * run.step_seconds if run.step_seconds else None
            rows.append(row)
            for m in ev.get("massive", []):
                massive.append({"recipe": run.recipe, "hidden state": m["site"], "channel": m["channel"],
                                "max |x|": m["max_abs"], "x median": m["ratio"]})  # fmt: skip
        tables = [Table("recipes compared (perplexity on the evaluation text)", rows)]
        tables.append(Table("massive activations at the end", massive or [{"massive activations": "none"}]))
        return tables

    def figures(self) -> list[Figure]:
        """Loss and OSP kurtosis over training per recipe; perplexity per recipe and scheme."""
        if not self.runs:
            return []
        curves = {run.recipe: run.loss_curve() for run in self.runs}
        steps = sorted({s for curve in curves.values() for s in curve})
        k_steps = sorted({k["step"] for run in self.runs for k in run.kurtosis})
        kurtosis = {run.recipe: {k["step"]: k["osp_kurtosis"] for k in run.kurtosis} for run in self.runs}
        figures = [
            Figure(
                "pretrain_loss",
                "lines",
                "training loss (mean over each logging interval)",
                "step",
                "loss",
                x=steps,
                series={r: [c.get(s) for s in steps] for r, c in curves.items()},
            ),
            Figure(
                "pretrain_kurtosis",
                "lines",
                "OSP excess kurtosis over training (OSP's protocol)",
                "step",
                "excess kurtosis",
                x=k_steps,
                series={r: [k.get(s) for s in k_steps] for r, k in kurtosis.items()},
            ),
        ]
        done = [run for run in self.runs if run.evaluation]
        if done:
            figures.append(
                Figure(
                    "pretrain_perplexity",
                    "bars",
                    f"perplexity per recipe: {', '.join(self.schemes)}",
                    "recipe",
                    "perplexity",
                    x=[run.recipe for run in done],
                    series={
                        name: [_finite(run.evaluation["perplexity"].get(name)) for run in done] for name in self.schemes
                    },
                    log=True,
                )
            )
        return figures


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def run_pretraining(
    recipes: Sequence[str],
    settings: PretrainSettings,
    out: str | Path | RunWriter,
    *,
    device: str = "cpu",
    schemes: Sequence[QuantScheme] = SCHEMES,
) -> Comparison:
    """Train each recipe of ``recipes`` (``out/<recipe>/``: checkpoint and final model) with
    ``settings``, evaluate it (:func:`evaluate`) and compare them; ``results.json``,
    ``report.html`` and PNGs are written to ``out`` (a folder or a :class:`RunWriter`) after
    every part. A rerun with the same settings reads the finished recipes back and continues the
    others from their checkpoints (a recipe whose checkpoint is at its last step is only
    evaluated again)."""
    recipes = [get_recipe(name).name for name in recipes]  # unknown names fail first
    if len(set(recipes)) != len(recipes):
        raise LmscopeError(f"a recipe is listed twice: {', '.join(recipes)}")
    tokenizer = load_tokenizer(settings.tokenizer)
    train = training_corpus(tokenizer, settings.corpus, settings.train_tokens)
    corpus = evaluation_corpus(tokenizer, settings.eval_corpus, settings.eval_tokens)
    probe = corpus.head(settings.kurtosis_tokens)
    writer = out if isinstance(out, RunWriter) else RunWriter(out, "pretrain", settings)
    writer.payload.update(_header(recipes, settings, tokenizer, train, corpus))
    resume = writer.resuming

    def train_and_evaluate(name: str) -> TrainingRun:
        run = pretrain(
            name, settings, tokenizer, train, probe, writer.out / name, resume=resume, device=device,
            on_log=lambda partial: writer.update(name, partial),
        )  # fmt: skip
        model = load(run.model_path, device=device)
        run.evaluation = evaluate(model, corpus, probe, window=settings.seq_len, schemes=schemes)
        return run

    runs = [
        writer.part(name, f"Recipe {name}", RECIPES[name].description, lambda name=name: train_and_evaluate(name))
        for name in recipes
    ]
    description = (
        f"Identical initialisation, data order and {settings.steps} steps; evaluation on {corpus.name} "
        f"({len(corpus)} tokens, windows of {settings.seq_len})."
    )
    comparison = writer.part("comparison", "Comparison", description, lambda: Comparison(runs))
    if not isinstance(out, RunWriter):
        writer.finish()
    return comparison


def _header(recipes: list[str], settings: PretrainSettings, tokenizer, train: Corpus, corpus: Corpus) -> dict:
    """What ``results.json`` records besides the settings: the recipes, the tokens used and the
    card of the (plain) architecture."""
    from transformers import LlamaForCausalLM

    plain = Model(LlamaForCausalLM(llama_config(settings, tokenizer)), tokenizer, source="pretrain", name="pretrain")
    return {
        "recipes": recipes,
        "train_tokens_used": len(train),
        "eval_tokens_used": len(corpus),
        "model": plain.card(),
    }

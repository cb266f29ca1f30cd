"""``lmscope scan``: one report of a model's internals, part by part.

Parts, in order (each timed, each saved to ``results.json`` as soon as it finishes, so an
interrupted scan leaves the finished parts readable):

1. ``model``    the model card;
2. ``outliers`` OSP excess kurtosis per hidden state, max |x|, massive activations
                (:mod:`lmscope.quant.outliers`, in-context protocol on WikiText-2);
3. ``kv``       key vs value norms per layer (:mod:`lmscope.quant.kv`) and the KV quantisation
                table with perplexity on WikiText-2 (:mod:`lmscope.quant.evaluation`);
4. ``heads``    induction, previous-token and duplicate-token scores (:mod:`lmscope.circuits.head_roles`);
5. ``circuit``  exact activation patching of every head on the built-in IOI task
                (:mod:`lmscope.circuits.patching`).

Outputs in ``out``: ``results.json``, ``report.html`` (self-contained, interactive) and every
plot as PNG.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lmscope.core.errors import LmscopeError
from lmscope.core.progress import note
from lmscope.quant.corpus import load_corpus
from lmscope.reports import sections
from lmscope.reports.figures import Figure
from lmscope.reports.results import output_dir, versions, write_json

KV_CONFIGS = ("fp", "k8v8", "k4v4", "k4v2", "k2v4", "k2v2")


@dataclass(frozen=True)
class ScanSettings:
    """How much data each part uses (tokens of WikiText-2 test, IOI pairs, ...)."""

    stats_tokens: int = 16384
    kv_tokens: int = 4096
    ppl_tokens: int = 32768
    window: int = 512
    kv_configs: tuple[str, ...] = KV_CONFIGS
    head_batch: int = 8
    head_length: int = 30
    ioi_pairs: int = 40


FULL = ScanSettings()
QUICK = ScanSettings(stats_tokens=2048, kv_tokens=1024, ppl_tokens=4096, ioi_pairs=8)


@dataclass
class ScanResult:
    """The payload written to ``results.json`` and the figures of each part."""

    payload: dict
    figures: dict[str, list[Figure]]
    out: Path


def scan(model, out: str | Path = "out/scan", settings: ScanSettings = FULL, name: str = "") -> ScanResult:
    """Run every part on ``model`` (an :class:`lmscope.Model`) and write the outputs to ``out``."""
    from lmscope.reports.report import write_report

    out = output_dir(out)
    payload = {
        "command": "scan",
        "model_name": name or model.name,
        "settings": asdict(settings),
        "versions": versions(),
        "timings": {},
        "parts": {},
    }
    result = ScanResult(payload, {}, out)
    parts: list[tuple[str, Callable]] = [
        ("model", _model_part),
        ("outliers", _outliers_part),
        ("kv", _kv_part),
        ("heads", _heads_part),
        ("circuit", _circuit_part),
    ]
    for part, run in parts:
        note(f"scan: {part}")
        start = time.perf_counter()
        data, figures = run(model, settings)
        payload["timings"][part] = time.perf_counter() - start
        payload["parts"][part] = data
        result.figures[part] = figures
        write_json(out / "results.json", payload)
        for figure in figures:
            figure.png(out)
        write_report(result, out / "report.html")
        note(f"scan: {part} took {payload['timings'][part]:.1f} s")
    return result


def _model_part(model, settings: ScanSettings) -> tuple[dict, list]:
    return model.card(), []


def _outliers_part(model, settings: ScanSettings) -> tuple[dict, list]:
    from lmscope.quant.outliers import activation_stats

    corpus = load_corpus(model, "wikitext2", max_tokens=settings.stats_tokens)
    summary = activation_stats(model, corpus, window=min(settings.window, len(corpus))).summary(model.tokenizer)
    return summary, sections.outlier_figures(summary)


def _kv_part(model, settings: ScanSettings) -> tuple[dict, list]:
    from lmscope.quant.evaluation import quant_table
    from lmscope.quant.fake import QuantConfig, parse_kv
    from lmscope.quant.kv import kv_stats, weight_norms

    corpus = load_corpus(model, "wikitext2", max_tokens=max(settings.kv_tokens, settings.ppl_tokens))
    small = corpus.head(settings.kv_tokens)
    window = min(settings.window, len(small))
    norms = kv_stats(model, small, window=window).summary()
    weights = weight_norms(model)
    configs = [QuantConfig(parse_kv(spec)) for spec in settings.kv_configs]
    rows = quant_table(model, corpus, configs, window=min(settings.window, len(corpus)))
    data = {"norms": norms, "weights": weights, "quant": rows, "quant_protocol": _QUANT_PROTOCOL}
    return data, sections.kv_figures(norms, weights) + sections.quant_figures(rows)


_QUANT_PROTOCOL = (
    "KV cache fake-quantised (asymmetric min/max, per token, groups of 64 channels, keys after the rotary "
    "embedding); perplexity over non-overlapping windows of WikiText-2 test"
)


def _heads_part(model, settings: ScanSettings) -> tuple[dict, list]:
    from lmscope.circuits.head_roles import head_roles, repeated_loss

    roles = head_roles(model, batch=settings.head_batch, length=settings.head_length)
    first, second = repeated_loss(model, batch=settings.head_batch, length=settings.head_length)
    data = {
        "scores": {role: getattr(roles, role).tolist() for role in ("induction", "previous_token", "duplicate_token")},
        "top": {role: roles.top(role) for role in ("induction", "previous_token", "duplicate_token")},
        "repeated_loss": {"first_half": first, "second_half": second},
    }
    return data, sections.head_figures(data["scores"])


def _circuit_part(model, settings: ScanSettings) -> tuple[dict, list]:
    from lmscope.circuits.patching import activation_patching
    from lmscope.circuits.tasks import ioi

    if model.tokenizer is None:
        raise LmscopeError("the IOI circuit part needs a tokenizer")
    pairs = ioi(model, n=settings.ioi_pairs)
    result = activation_patching(model, pairs, component="head")
    scores = result.scores[:, 0, :]
    data = {
        "task": "ioi",
        "n_pairs": len(pairs),
        "metric": result.metric,
        "clean": result.clean,
        "corrupt": result.corrupt,
        "scores": scores.tolist(),
        "top": [{k: row[k] for k in ("layer", "head", "score")} for row in result.top(10)],
    }
    return data, [sections.patching_figure(data["scores"], len(pairs))]

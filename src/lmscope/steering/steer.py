"""Steering vectors, evaluated against a prompting baseline, with their side effects.

**Vector** (contrastive activation addition, Rimsky et al. 2024): per layer L, the difference of
the mean activations of the positive and negative examples at the chosen position, at the site
``blocks.L.resid_post`` (:func:`lmscope.steering.directions.mean_difference`). A setting adds
``coeff * v_L`` at every layer L of the setting, at all positions or chosen ones, in every
forward, generation included (:func:`interventions`).

**Evaluation** (:func:`sweep`), per setting, next to the unsteered model and the **prompting
baseline** (an instruction prefixed to every prompt; AxBench, Wu et al. 2025, found prompting
beats most steering methods):

- *behaviour*: over evaluation items ``{prompt, target, opposite}``, the mean of
  ``log p(target | prompt) - log p(opposite | prompt)`` (completions' token log-probabilities
  summed), and the mean ``p = sigmoid`` of that difference (the target's probability among the two);
  without ``opposite``, ``log p(target | prompt)``;
- *side effects*: the mean over every position of neutral prompts of
  ``KL(p_unsteered || p_setting)`` of the next-token distributions, and the perplexity of
  WikiText-2 windows. For the prompting baseline the instruction is prefixed to the neutral
  prompt or window and only the original tokens are compared or scored.

**Choice**: the setting with the largest behaviour effect whose KL is at most ``max_kl`` and whose
perplexity is at most ``(1 + max_ppl_rise)`` times the unsteered one.

**Speed**: the settings of a batch (below) are rows of one forward per text (an evaluation prompt
with its target or its opposite, a neutral prompt, a window), plus the unsteered row for the KL.
The text enters as one unsteered row; each setting's row joins the batch as a copy of it entering
the setting's lowest steered layer (below, it would be the same), so a setting at layer L costs
the layers from L up only; each steered layer gets one intervention with a row per batch row
(``coeff * v_L`` for the rows whose setting steers at L, else 0); the unembedding runs at the
scored positions only. ``sweep(..., batched=False)`` is the plain loop (one run per setting and
text), the reference the tests and ``bench/bench_steer.py`` compare with.

**Batches, and resuming**: the sweep measures its cells in a fixed order of batches: the
unsteered model, the prompting baseline, then the settings of each layer group (one method and
set of layers), at most ``cells_per_batch`` of its coefficients per batch (settings that share
their lowest layer share the forward below it). After each batch the cells measured so far go to
``on_cells`` (:class:`SweepCells`); given back as ``earlier``, they are not measured again, and
since the batches are the same in an interrupted and an uninterrupted run, so are the numbers.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.interventions import Intervention, add, apply
from lmscope.core.jsonl import TEXT, Schema, read_rows, read_text
from lmscope.core.model import Model
from lmscope.core.progress import progress_bar
from lmscope.core.stats import kl_divergence
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table
from lmscope.steering.directions import Examples, features, mean_difference


@dataclass(frozen=True)
class EvalItem:
    """A prompt whose continuation ``target`` the steering should favour over ``opposite``."""

    prompt: str
    target: str
    opposite: str | None = None


EVAL = Schema({"prompt": TEXT, "target": TEXT}, {"opposite": TEXT})


def load_eval(path) -> list[EvalItem]:
    """Evaluation items from JSONL (:data:`EVAL`: ``{prompt, target[, opposite]}``); errors name
    the file, line and field."""
    items = [EvalItem(**row.values) for row in read_rows(path, EVAL, what="evaluation items")]
    if len({i.opposite is None for i in items}) > 1:
        raise LmscopeError(f"{path}: give 'opposite' for every item or for none")
    return items


def neutral_prompts(path: str | Path | None = None) -> list[str]:
    """Neutral prompts, one per non-blank line of ``path`` (default: the bundled
    ``lmscope/data/steering/neutral.txt``, eight plain factual sentences)."""
    if path is None:
        text = (resources.files("lmscope") / "data" / "steering" / "neutral.txt").read_text(encoding="utf-8")
    else:
        text = read_text(path)
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise LmscopeError(f"{path}: no neutral prompts (the file is empty)")
    return prompts


def steering_vectors(
    model: Model, examples: Examples, layers: Sequence[int], *, position: str = "last", site: str = "resid_post"
) -> dict[int, Tensor]:
    """Contrastive activation addition: per layer, ``mean(x | 1) - mean(x | 0)`` [d_model]."""
    layers = sorted({int(layer) for layer in layers})
    x = features(model, examples.texts, layers, site=site, position=position)
    y = torch.tensor(examples.labels)
    return {layer: mean_difference(x[:, i], y) for i, layer in enumerate(layers)}


@dataclass(frozen=True)
class Setting:
    """Add ``coeff * v_L`` at every layer L in ``layers``."""

    layers: tuple[int, ...]
    coeff: float
    method: str = ""  # "" for steering vectors; else the method's name (e.g. "LinEAS")

    @property
    def name(self) -> str:
        where = self.method or f"L{'+'.join(map(str, self.layers))}"
        return f"{where} x{self.coeff:g}"


def interventions(
    vectors: dict[int, Tensor],
    settings: Sequence[Setting | None],
    *,
    site: str = "resid_post",
    positions: Sequence[int] | None = None,
) -> list[Intervention]:
    """One intervention per steered layer. With one setting, ``add`` of ``coeff * v_L`` [d];
    with several, batch row r gets ``settings[r]`` (None: unsteered) through a ``[rows, 1, d]``
    vector, of which a batch of k rows takes the first k (see :data:`Steerer`)."""
    missing = {layer for s in settings if s for layer in s.layers} - vectors.keys()
    if missing:
        raise LmscopeError(f"no steering vector for layer(s) {sorted(missing)} (have {sorted(vectors)})")
    out = []
    for layer in sorted({layer for s in settings if s for layer in s.layers}):
        coeffs = torch.tensor([s.coeff if s and layer in s.layers else 0.0 for s in settings])
        site_name = f"blocks.{layer}.{site}"
        if len(settings) == 1:
            out.append(add(site_name, vectors[layer] * coeffs[0], positions=positions))
        else:
            rows = coeffs[:, None, None] * vectors[layer]
            out.append(apply(site_name, lambda x, rows=rows: x + first_rows(rows, x), positions=positions))
    return out


def first_rows(values: Tensor, x: Tensor) -> Tensor:
    """The first ``x.shape[0]`` rows of per-row ``values``, on ``x``'s device and dtype."""
    return values[: x.shape[0]].to(x.device, x.dtype)


# A steering method as the sweep sees it: the interventions that steer batch row r by
# settings[r] (None: unsteered), for any number of rows. The sweep may run a layer on the first
# k rows only (rows join the batch at their lowest steered layer, in order), so per-row values
# are taken with first_rows.
Steerer = Callable[[Sequence["Setting | None"]], list[Intervention]]


def caa(vectors: dict[int, Tensor], *, site: str = "resid_post", positions: Sequence[int] | None = None) -> Steerer:
    """The :data:`Steerer` adding ``coeff * vectors[L]`` (:func:`interventions`)."""
    return functools.partial(interventions, vectors, site=site, positions=positions)


def combined(steerers: dict[str, Steerer]) -> Steerer:
    """One :data:`Steerer` over several methods: each row goes to the steerer of its setting's
    ``method`` (the others see it as unsteered); their interventions compose."""

    def steer(settings: Sequence[Setting | None]) -> list[Intervention]:
        out = []
        for method, steerer in steerers.items():
            mine = [s if s is not None and s.method == method else None for s in settings]
            if any(mine):
                out += steerer(mine)
        return out

    return steer


# -- token-level pieces ------------------------------------------------------------------------


def _encode(model: Model, text: str, first: bool) -> list[int]:
    """Token ids of ``text``; special tokens (BOS) only for the first piece of a sequence."""
    if model.tokenizer is None:
        raise LmscopeError(f"model {model.name} has no tokenizer")
    return model.tokenizer(text, add_special_tokens=first)["input_ids"]


@dataclass(frozen=True)
class Scored:
    """A token sequence and the range of positions whose next-token predictions count."""

    ids: list[int]
    start: int  # first position whose *prediction* is scored (predicts ids[start + 1])
    stop: int  # one past the last predicting position


def _continuation(model: Model, prefix: str, prompt: str, completion: str) -> Scored:
    """``[instruction] prompt completion``: the predictions of the completion's tokens."""
    head = _encode(model, prefix, True) + _encode(model, prompt, False) if prefix else _encode(model, prompt, True)
    tail = _encode(model, completion, False)
    return Scored(head + tail, len(head) - 1, len(head) + len(tail) - 1)


def _text(model: Model, prefix: str, ids: list[int]) -> Scored:
    """``[instruction] text``: the predictions of the text's own next tokens."""
    head = _encode(model, prefix, True) if prefix else []
    return Scored(head + ids, len(head), len(head) + len(ids) - 1)


def _log_probs(model: Model, seq: Scored, steerer: Steerer, rows: Sequence[Setting | None]) -> list[Tensor]:
    """Run one sequence for every row (row r steered by ``rows[r]``, None: unsteered): per row
    the log-softmax over the vocabulary at the scored positions, [n_scored, vocab] float32.

    One forward. The sequence enters as one unsteered row; a steered row joins the batch, as a
    copy of that row, entering its lowest steered layer (below it the row is unsteered), so the
    layers below a setting's run once for all the settings above them. The unembedding runs at
    the scored positions only."""
    steered = sorted((r for r in range(len(rows)) if rows[r]), key=lambda r: min(rows[r].layers))
    batch = [None, *(rows[r] for r in steered)]  # batch row 0: unsteered
    ivs = steerer(batch) if steered else []
    for layer, group in itertools.groupby(steered, key=lambda r: min(rows[r].layers)):
        k = len(list(group))
        ivs.insert(0, apply(f"blocks.{layer}.resid_pre", lambda x, k=k: torch.cat([x, x[:1].expand(k, *x.shape[1:])])))
    last = f"blocks.{model.n_layers - 1}.resid_post"
    resid = model.run(torch.tensor([seq.ids]), [last], ivs, logits=False).cache[last]
    logp = F.log_softmax(model.unembed(resid[:, seq.start : seq.stop]).float(), -1)  # [batch, n_scored, vocab]
    where = {r: i + 1 for i, r in enumerate(steered)}
    return [logp[where.get(r, 0)] for r in range(len(rows))]


def _completion_logp(logp: Tensor, seq: Scored) -> float:
    targets = torch.tensor(seq.ids[seq.start + 1 : seq.stop + 1])
    return float(logp.gather(1, targets[:, None].to(logp.device)).sum())


def _nll(logp: Tensor, seq: Scored) -> float:
    return -_completion_logp(logp, seq)


def _kl_sums(
    model: Model,
    text: str,
    prefix: str,
    rows: Sequence[Setting | None],
    forward: Callable[[Scored, Sequence[Setting | None]], list[Tensor]],
) -> tuple[list[float], int]:
    """Per row, the sum over the positions of the neutral ``text`` of ``KL(unsteered ||
    row)`` of the next-token distributions (the row reading ``prefix`` first), and the number
    of positions."""
    ids = _encode(model, text, True)
    plain, seq = _text(model, "", ids), _text(model, prefix, ids[1:] if prefix and _bos(model, ids) else ids)
    if seq == plain:  # the unsteered reference is one more row of the same sequence
        reference, *logps = forward(seq, [None, *rows])
    else:
        reference, logps = forward(plain, [None])[0], forward(seq, rows)
    reference = reference[-(seq.stop - seq.start) :]
    return [float(kl_divergence(reference, logp).sum()) for logp in logps], len(reference)


# -- the sweep ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepData:
    """What a sweep measures on: evaluation items, neutral prompts, perplexity windows (token ids)."""

    items: list[EvalItem]
    neutral: list[str]
    windows: list[list[int]] = field(default_factory=list)


@dataclass
class Measures:
    """Per setting: behaviour (mean log-probability difference, mean target probability among the
    two), side effects (mean KL to unsteered on neutral prompts, perplexity of the windows)."""

    behaviour: float
    p_target: float | None
    kl: float
    perplexity: float | None


class _Accumulator:
    def __init__(self, n: int):
        self.diff, self.p, self.kl, self.nll = ([0.0] * n for _ in range(4))
        self.n_items, self.n_kl, self.n_tokens = 0, 0, 0  # counts shared by every row

    def measures(self, r: int, paired: bool, windows: bool) -> Measures:
        ppl = float(torch.tensor(self.nll[r] / self.n_tokens).exp()) if windows else None
        return Measures(
            self.diff[r] / self.n_items,
            self.p[r] / self.n_items if paired else None,
            self.kl[r] / max(self.n_kl, 1),
            ppl,
        )


def _evaluate(
    model: Model,
    data: SweepData,
    steerer: Steerer,
    rows: list[Setting | None],
    prefix: str,
    batched: bool,
) -> list[Measures]:
    """Measures of each row of ``rows`` (None: unsteered) with the instruction ``prefix``
    (empty: none). Batched: one forward per text over all rows; else one per row and text."""
    acc = _Accumulator(len(rows))
    paired = data.items[0].opposite is not None

    def forward(seq: Scored, settings: Sequence[Setting | None]) -> list[Tensor]:
        if batched:
            return _log_probs(model, seq, steerer, settings)
        return [_log_probs(model, seq, steerer, [r])[0] for r in settings]

    total = len(data.items) + len(data.neutral) + len(data.windows)
    with torch.no_grad(), progress_bar("steering sweep", total) as advance:
        for item in data.items:
            completions = [item.target, item.opposite] if paired else [item.target]
            seqs = [_continuation(model, prefix, item.prompt, c) for c in completions]
            logps = [forward(seq, rows) for seq in seqs]
            for r in range(len(rows)):
                target = _completion_logp(logps[0][r], seqs[0])
                diff = target - _completion_logp(logps[1][r], seqs[1]) if paired else target
                acc.diff[r] += diff
                acc.p[r] += float(torch.sigmoid(torch.tensor(diff)))
            acc.n_items += 1
            advance(1)
        for text in data.neutral:
            sums, n = _kl_sums(model, text, prefix, rows, forward)
            for r in range(len(rows)):
                acc.kl[r] += sums[r]
            acc.n_kl += n
            advance(1)
        for window in data.windows:
            seq = _text(model, prefix, window)
            logps = forward(seq, rows)
            for r in range(len(rows)):
                acc.nll[r] += _nll(logps[r], seq)
            acc.n_tokens += seq.stop - seq.start
            advance(1)
    return [acc.measures(r, paired, bool(data.windows)) for r in range(len(rows))]


@dataclass
class SweepCells(Result):
    """The cells of a sweep measured so far (by setting name: ``"none"``, ``"prompting"``, each
    setting's :attr:`Setting.name`), out of ``total``: a sweep's progress, kept to resume it."""

    measures: dict[str, Measures]
    total: int

    def to_json(self) -> dict:
        return {
            "measured": len(self.measures),
            "total": self.total,
            "cells": {k: asdict(m) for k, m in self.measures.items()},
        }

    def text(self) -> str:
        return f"{len(self.measures)} of {self.total} sweep cells measured."


def _batches(settings: Sequence[Setting], size: int) -> list[list[Setting]]:
    """The settings of each layer group (one method and set of layers), in order of first
    appearance, in batches of at most ``size``."""
    groups: dict[tuple[str, tuple[int, ...]], list[Setting]] = {}
    for s in settings:
        groups.setdefault((s.method, s.layers), []).append(s)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def _bos(model: Model, ids: list[int]) -> bool:
    return bool(ids) and ids[0] in model.bos_ids()


@dataclass
class SteerResult(Result):
    """The sweep table: unsteered, the prompting baseline and every setting, the chosen setting
    and the rule that chose it, and sample generations."""

    model: str
    site: str
    rows: list[dict]
    chosen: str | None
    rule: str
    instruction: str
    samples: list[dict] = field(default_factory=list)

    def text(self) -> str:
        if self.chosen is None:
            return f"No setting met the side-effect limits ({self.rule})."
        rows = {r["setting"]: r for r in self.rows}
        row, prompt = rows[self.chosen], rows.get("prompting")  # no prompting baseline without an instruction
        versus = f" vs prompting (behaviour {prompt['behaviour']:+.3f}, KL {prompt['kl']:.3f})" if prompt else ""
        return f"Chosen: {self.chosen} (behaviour {row['behaviour']:+.3f}, KL {row['kl']:.3f}){versus}; rule: {self.rule}."

    def tables(self) -> list[Table]:
        tables = [Table(f"Steering sweep ({self.site}); chosen by: {self.rule}", [_rounded(r) for r in self.rows])]
        if self.samples:
            tables.append(Table("Sample generations", self.samples))
        return tables

    def figures(self) -> list[Figure]:
        steered = [r for r in self.rows if r["layers"]]
        coeffs = sorted({r["coeff"] for r in steered})
        groups = {r["setting"].rsplit(" x", 1)[0] for r in steered}  # "L9", "L12+15", "LinEAS"
        series = {
            g: [next((r["behaviour"] for r in steered if r["setting"] == f"{g} x{c:g}"), None) for c in coeffs]
            for g in sorted(groups)
        }
        for row in self.rows:
            if not row["layers"]:  # the unsteered model and the prompting baseline: flat lines
                series[row["setting"]] = [row["behaviour"]] * len(coeffs)
        return [
            Figure(
                "steering_sweep",
                "lines",
                f"{self.model}: behaviour by coefficient",
                "coefficient",
                "behaviour",
                x=coeffs,
                series=series,
            )
        ]


def _rounded(row: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def choose(rows: list[dict], max_kl: float, max_ppl_rise: float) -> str | None:
    """The steered row with the largest behaviour among those within the side-effect limits."""
    base = next(r for r in rows if r["setting"] == "none")["perplexity"]
    ok = [
        r
        for r in rows
        if r["layers"] and r["kl"] <= max_kl and (base is None or r["perplexity"] <= (1 + max_ppl_rise) * base)
    ]
    return max(ok, key=lambda r: r["behaviour"])["setting"] if ok else None


def sweep(
    model: Model,
    steer: dict[int, Tensor] | Steerer,
    settings: Sequence[Setting],
    data: SweepData,
    *,
    instruction: str = "",
    site: str = "resid_post",
    positions: Sequence[int] | None = None,
    max_kl: float = 0.2,
    max_ppl_rise: float = 0.1,
    samples: int = 3,
    max_new_tokens: int = 24,
    batched: bool = True,
    cells_per_batch: int = 4,
    earlier: SweepCells | None = None,
    on_cells: Callable[[SweepCells], None] | None = None,
) -> SteerResult:
    """Evaluate every setting, the unsteered model and the prompting baseline (module docstring).
    ``steer``: steering vectors per layer (added at ``site``, ``positions``), or any
    :data:`Steerer` (e.g. :func:`lmscope.steering.lineas.Transport.steerer`). ``on_cells`` gets
    the cells measured so far after each batch (of at most ``cells_per_batch`` settings); ``earlier``: an interrupted sweep's cells (same
    model, steering, settings and data), kept instead of measured again."""
    steerer = caa(steer, site=site, positions=positions) if isinstance(steer, dict) else steer
    if positions is not None and any(p < 0 for p in positions):
        raise LmscopeError("the sweep takes positions counted from the start (>= 0)")
    if not settings:
        raise LmscopeError("no steering settings to sweep")
    if cells_per_batch < 1:
        raise LmscopeError(f"cells_per_batch must be at least 1 (got {cells_per_batch})")
    batches: list[tuple[list[str], list[Setting | None], str]] = [(["none"], [None], "")]
    if instruction:
        batches.append((["prompting"], [None], instruction))
    batches += [([s.name for s in batch], list(batch), "") for batch in _batches(settings, cells_per_batch)]
    cells = SweepCells({}, sum(len(names) for names, _, _ in batches))
    done = earlier.measures if earlier is not None else {}
    for names, rows_in, prefix in batches:
        if all(name in done for name in names):
            cells.measures.update({name: done[name] for name in names})
            continue
        measured = _evaluate(model, data, steerer, rows_in, prefix, batched)
        cells.measures.update(zip(names, measured, strict=True))
        if on_cells:
            on_cells(cells)
    rows = [_row("none", None, cells.measures["none"])]
    if instruction:
        rows.append(_row("prompting", None, cells.measures["prompting"]))
    rows += [_row(s.name, s, cells.measures[s.name]) for s in settings]
    rule = f"largest behaviour with KL <= {max_kl:g} and perplexity <= {1 + max_ppl_rise:g} x unsteered"
    chosen = choose(rows, max_kl, max_ppl_rise)
    result = SteerResult(model.name, site, rows, chosen, rule, instruction)
    if samples:
        setting = next((s for s in settings if s.name == chosen), None)
        result.samples = generations(model, steerer, setting, data.items[:samples], instruction, max_new_tokens)
    return result


def _row(name: str, setting: Setting | None, m: Measures) -> dict:
    return {
        "setting": name,
        "method": "none" if setting is None else setting.method or "vector",
        "layers": "+".join(map(str, setting.layers)) if setting else "",
        "coeff": setting.coeff if setting else 0.0,
        "behaviour": m.behaviour,
        "p_target": m.p_target,
        "kl": m.kl,
        "perplexity": m.perplexity,
    }


def generations(
    model: Model,
    steerer: Steerer,
    setting: Setting | None,
    items: Sequence[EvalItem],
    instruction: str,
    max_new_tokens: int = 24,
) -> list[dict]:
    """Greedy continuations of each item's prompt: unsteered, with the instruction, and steered."""
    out = []
    ivs = steerer([setting]) if setting else []
    for item in items:
        row = {"prompt": item.prompt, "none": model.generate(item.prompt, max_new_tokens=max_new_tokens).texts[0]}
        if instruction:
            row["prompting"] = model.generate(instruction + item.prompt, max_new_tokens=max_new_tokens).texts[0]
        if setting:
            row[setting.name] = model.generate(item.prompt, ivs, max_new_tokens=max_new_tokens).texts[0]
        out.append(row)
    return out


def parse_layers(spec: str, n_layers: int) -> list[tuple[int, ...]]:
    """``"6,9,12+15"`` -> ``[(6,), (9,), (12, 15)]``: comma-separated settings, ``+`` joins layers."""
    groups = []
    for part in spec.split(","):
        try:
            layers = tuple(int(x) for x in part.split("+"))
        except ValueError:
            raise LmscopeError(f"bad layer list {spec!r}: expected e.g. 6,9,12+15") from None
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad:
            raise LmscopeError(f"layer {bad[0]} out of range (model has {n_layers} layers)")
        groups.append(layers)
    return groups


# -- coefficients at a target KL -----------------------------------------------------------------


def neutral_kl(model: Model, steerer: Steerer, settings: Sequence[Setting], prompts: Sequence[str]) -> list[float]:
    """Per setting, the sweep's side effect: the mean over every position of the neutral
    ``prompts`` of ``KL(p_unsteered || p_setting)`` of the next-token distributions."""
    rows, sums, n = list(settings), [0.0] * len(settings), 0

    def forward(seq: Scored, batch: Sequence[Setting | None]) -> list[Tensor]:
        return _log_probs(model, seq, steerer, batch)

    with torch.no_grad():
        for text in prompts:
            kl, count = _kl_sums(model, text, "", rows, forward)
            sums = [a + b for a, b in zip(sums, kl, strict=True)]
            n += count
    return [s / max(n, 1) for s in sums]


@dataclass(frozen=True)
class Calibration:
    """The coefficient of one steering method (``layers``, ``method``) whose mean neutral KL
    came out at ``kl`` for a ``target``, after ``steps`` KL evaluations."""

    method: str
    layers: tuple[int, ...]
    coeff: float
    kl: float
    target: float
    steps: int

    @property
    def setting(self) -> Setting:
        return Setting(self.layers, self.coeff, self.method)


def calibrate(
    model: Model,
    steerer: Steerer,
    layers: Sequence[int],
    target: float,
    prompts: Sequence[str],
    *,
    method: str = "",
    start: float = 1.0,
    rtol: float = 0.05,
    max_steps: int = 40,
) -> Calibration:
    """The coefficient ``c > 0`` of ``Setting(layers, c, method)`` whose :func:`neutral_kl` is
    ``target`` within ``rtol * target``: bracketed by doubling from ``start`` (the KL grows with
    the coefficient), then bisection; after ``max_steps`` evaluations, the closest one seen."""
    if not target > 0:
        raise LmscopeError(f"the target KL must be positive, got {target}")
    layers = tuple(layers)
    seen: dict[float, float] = {}

    def kl(c: float) -> float:
        if c not in seen:
            seen[c] = neutral_kl(model, steerer, [Setting(layers, c, method)], prompts)[0]
        return seen[c]

    lo, hi = 0.0, start
    while kl(hi) < target and len(seen) < max_steps:
        lo, hi = hi, hi * 2
    while abs(kl(hi) - target) > rtol * target and len(seen) < max_steps:
        mid = (lo + hi) / 2
        if abs(kl(mid) - target) <= rtol * target:
            hi = mid
            break
        lo, hi = (mid, hi) if kl(mid) < target else (lo, mid)
    best = min(seen, key=lambda c: abs(seen[c] - target))
    return Calibration(method, layers, best, seen[best], target, len(seen))

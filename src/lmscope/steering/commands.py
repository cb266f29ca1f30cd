"""The commands of this package: ``lmscope probe`` and ``lmscope steer`` (settings and run)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lmscope.circuits.commands import MAX_PAIRS, token_pairs
from lmscope.circuits.pairs import ANSWER_TOKENS, TokenPair, answer_record, load_pairs, prompt_batch
from lmscope.circuits.tasks import GENERATORS, pairs_for
from lmscope.core.corpus import load_corpus
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.core.sites import parse_site
from lmscope.reports.command import Command, RunWriter, option
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Skipped, Table
from lmscope.steering.directions import POSITIONS, ProbeResult, load_examples, probe
from lmscope.steering.lineas import METHOD, Transport, train_lineas
from lmscope.steering.steer import (
    Calibration,
    Setting,
    SteerResult,
    SweepData,
    caa,
    calibrate,
    combined,
    load_eval,
    neutral_prompts,
    parse_layers,
    steering_vectors,
    sweep,
)
from lmscope.steering.store import export_control_vector, save_vectors
from lmscope.steering.store import save as save_tensors
from lmscope.steering.subspace import DASResult, IllusionResult, das, illusion_check
from lmscope.steering.vectors import check_direction, load_direction


def numbers(spec: str, name: str = "", kind: type = float) -> list:
    """``"1,2,4"`` as finite numbers of ``kind``; a one-line error naming the option otherwise."""
    try:
        values = [kind(x) for x in spec.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        what = "numbers" if kind is float else "integers"
        raise LmscopeError(f"--{name}: " * bool(name) + f"expected comma-separated finite {what}, got {spec!r}")
    return values


def layer_spec(spec: str) -> list[tuple[int, ...]]:
    """Check a ``--layers`` spec (``6,9,12+15``) before the model loads: non-negative layers."""
    return parse_layers(spec, sys.maxsize)


def layer_list(spec: str, n_layers: int) -> list[int]:
    """``"3,5"``: one layer per entry, each in range of a model of ``n_layers`` layers."""
    groups = parse_layers(spec, n_layers)
    if any(len(g) > 1 for g in groups):
        raise LmscopeError(f"--layers {spec!r}: one layer per entry (no +)")
    return [g[0] for g in groups]


def site_kind(kind: str) -> None:
    """Check a per-layer site (``resid_post``, ``attn.out``) before the model loads."""
    parse_site(f"blocks.0.{kind}")


# -- probe ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSettings:
    """``lmscope probe``: directions and probes per layer with held-out accuracy."""

    data: Path = option(help="JSONL: {text, label} or contrastive {positive, negative[, prompt]}", path="file")
    layers: str | None = option(None, "comma-separated layers (default: all)", parse=layer_spec)
    site: str = option("resid_post", "per-layer site, e.g. resid_post, resid_mid, attn.out", parse=site_kind)
    position: str = option("last", "last, mean, or span ([[marked]] in each text)", choices=POSITIONS)
    test_fraction: float = option(0.25, "held-out fraction (pairs kept together)", min=0.01, max=0.99)
    seed: int = option(0, "split seed", min=0)
    save: Path | None = option(None, "write the directions (safetensors)", path="out")

    def __post_init__(self) -> None:
        load_examples(self.data)  # a bad file fails before the model loads


def run_probe(model: Model, settings: ProbeSettings, out: RunWriter) -> ProbeResult:
    """Difference-of-means, first-principal-component and logistic-regression probes per layer, with
    held-out accuracy per layer."""
    examples = load_examples(settings.data)
    model.check_texts(examples.texts, str(settings.data))  # every example fits the model
    layers = layer_list(settings.layers, model.n_layers) if settings.layers is not None else None
    result = out.part("probe", "Probes per layer", f"Held-out accuracy ({settings.site}, {settings.position}).",
                      lambda: probe(model, examples, layers, site=settings.site, position=settings.position,
                                    test_fraction=settings.test_fraction, seed=settings.seed))  # fmt: skip
    if settings.save is not None:
        tensors = {f"{m}.{layer}": d[i] for m, d in result.directions.items() for i, layer in enumerate(result.layers)}
        meta = {"model": model.name, "site": settings.site, "method": "probe", "position": settings.position}
        save_tensors(settings.save, tensors, layers=result.layers, data=result.data, **meta)
    return result


PROBE = Command("probe", ProbeSettings, run_probe)


# -- steer ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SteerSettings:
    """``lmscope steer``: steering vectors (and LinEAS maps) swept and evaluated."""

    pairs: Path = option(help="contrastive pairs (JSONL: positive, negative[, prompt])", path="file")
    eval: Path = option(help="JSONL: prompt, target[, opposite]", path="file")
    layers: str | None = option(None, "settings' layers, e.g. 6,9,12+15 (+ joins; default: every n/8 in the middle)",
                                parse=layer_spec)  # fmt: skip
    coeffs: str = option("1,2,4,8", "comma-separated coefficients", parse=numbers)
    instruction: str = option("", "the prompting baseline's prefix (default: no prompting baseline)")
    neutral: Path | None = option(None, "neutral prompts, one per line (default: bundled)", path="file")
    windows: int = option(4, "WikiText-2 windows for perplexity", min=0, max=100_000)
    window: int = option(64, "tokens per window", min=2)
    position: str = option("last", "where the vector is read: last, mean or span", choices=POSITIONS)
    max_kl: float = option(0.2, "choice: largest KL to unsteered allowed", min=0)
    max_ppl_rise: float = option(0.1, "choice: largest relative perplexity rise", min=0)
    samples: int = option(3, "prompts with sample generations", min=0)
    lineas: bool = option(False, "also learn LinEAS maps (negatives -> positives, unpaired)")
    lineas_steps: int = option(100, "LinEAS Adam steps", min=1, max=1_000_000)
    lineas_strengths: str = option("0.5,1", "LinEAS strengths to sweep", parse=numbers)
    lineas_sparsity: float = option(1e-3, "LinEAS group-sparsity weight", min=0)
    save: Path | None = option(None, "write the vectors (safetensors)", path="out")
    gguf: Path | None = option(None, "write the chosen setting as a llama.cpp control vector", path="out")
    vectors: tuple[str, ...] = option((), "also sweep a precomputed direction: a --save file, an SNMF file's "
                                      "feature (FILE#j) or a dictionary's decoder row (DIR#j); repeatable",
                                      flag="--vectors", parse=load_direction)  # fmt: skip
    match_kl: float | None = option(None, "instead of --coeffs, each method's coefficient calibrated so its mean KL "
                                    "on the neutral prompts is this (positive)", min=0)  # fmt: skip

    def __post_init__(self) -> None:
        if self.match_kl == 0:
            raise LmscopeError("--match-kl must be positive, got 0")
        load_examples(self.pairs)  # bad files fail before the model loads
        load_eval(self.eval)
        neutral_prompts(self.neutral)

    def groups(self, n_layers: int) -> list[tuple[int, ...]]:
        """The settings' layer groups (default: every n/8-th layer of the middle half)."""
        if self.layers:
            return parse_layers(self.layers, n_layers)
        return [(layer,) for layer in range(n_layers // 4, 3 * n_layers // 4 + 1, max(1, n_layers // 8))]


@dataclass
class SteeringVectors(Result):
    """Contrastive activation addition vectors per layer, ``mean(x | positive) - mean(x | negative)``."""

    vectors: dict[int, Tensor]

    def to_json(self) -> dict:
        return {"layers": sorted(self.vectors), "norms": {str(k): float(v.norm()) for k, v in self.vectors.items()}}

    def tables(self) -> list[Table]:
        return [Table("steering vectors", [{"layer": k, "norm": float(v.norm())} for k, v in self.vectors.items()])]


@dataclass
class LinEASMaps(Result):
    """LinEAS maps learned from the examples (:class:`~lmscope.steering.lineas.Transport`)."""

    transport: Transport

    def to_json(self) -> dict:
        return {"layers": self.transport.layers, "active": self.transport.active(), "info": self.transport.info}

    def text(self) -> str:
        return f"LinEAS: {len(self.transport.active())} of {len(self.transport.layers)} layers active."


@dataclass
class Calibrations(Result):
    """Each method's coefficient at the target KL (:func:`~lmscope.steering.steer.calibrate`)."""

    calibrations: list[Calibration]

    @property
    def settings(self) -> list[Setting]:
        return [c.setting for c in self.calibrations]

    def rows(self) -> list[dict]:
        return [{"setting": c.setting.name, "method": c.method or "vector", "layers": "+".join(map(str, c.layers)),
                 "coeff": c.coeff, "kl": c.kl, "target": c.target, "evaluations": c.steps}
                for c in self.calibrations]  # fmt: skip

    def to_json(self) -> dict:
        return {"rows": self.rows()}

    def tables(self) -> list[Table]:
        return [Table("coefficients at the target KL on the neutral prompts", self.rows())]


def calibrated(model: Model, steerer, grid: list[Setting], target: float, prompts: list[str], start: float) -> Calibrations:
    """One calibrated setting per method and layer group of ``grid`` (in order of first appearance)."""
    groups = list(dict.fromkeys((s.method, s.layers) for s in grid))
    return Calibrations([calibrate(model, steerer, layers, target, prompts, method=method, start=start)
                         for method, layers in groups])  # fmt: skip


def run_steer(model: Model, settings: SteerSettings, out: RunWriter) -> SteerResult:
    """Steering vectors (contrastive activation addition) swept over layers x coefficients, with behaviour,
    side effects (KL on neutral prompts, perplexity) and a prompting baseline side by side; with --lineas,
    LinEAS maps (Rodriguez et al. 2025) learned from the same examples, in the same table; with --vectors,
    precomputed directions (SNMF features, dictionary decoder rows, saved vectors) too; with --match-kl, every
    method at the same KL."""
    examples, items, texts = load_examples(settings.pairs), load_eval(settings.eval), neutral_prompts(settings.neutral)
    model.check_texts(examples.texts, str(settings.pairs))  # every text fits the model, before the first part
    completions = [settings.instruction + i.prompt + c for i in items for c in (i.target, i.opposite) if c is not None]
    model.check_texts(completions, str(settings.eval))  # before the first part is written
    model.check_texts(texts, str(settings.neutral or "neutral prompts"))
    directions = [load_direction(spec) for spec in settings.vectors]
    for direction in directions:
        check_direction(model, direction)
    if len({d.name for d in directions}) < len(directions):
        raise LmscopeError("two --vectors name the same direction")
    coeffs = numbers(settings.coeffs, "coeffs")
    groups = settings.groups(model.n_layers)
    grid = [Setting(g, c) for g in groups for c in coeffs]
    layers = sorted({layer for g in groups for layer in g})
    vectors = out.part("vectors", "Steering vectors", "Mean difference of positive and negative activations.",
                       lambda: SteeringVectors(steering_vectors(model, examples, layers, position=settings.position)))
    steerers = {"": caa(vectors.vectors)}
    for direction in directions:
        steerers[direction.name] = caa(direction.vectors, site=direction.kind)
        grid += [Setting(direction.layers, c, direction.name) for c in coeffs]
    if settings.lineas:
        by_label = {y: [t for t, label in zip(examples.texts, examples.labels, strict=True) if label == y] for y in (0, 1)}
        maps = out.part("lineas", "LinEAS maps", "Joint per-layer affine maps, negatives to positives.",
                        lambda: LinEASMaps(train_lineas(model, by_label[0], by_label[1], steps=settings.lineas_steps,
                                                        sparsity=settings.lineas_sparsity,
                                                        position=settings.position)))  # fmt: skip
        grid += [maps.transport.setting(v) for v in numbers(settings.lineas_strengths, "lineas-strengths")]
        steerers[METHOD] = maps.transport.steerer()
        if settings.save is not None:
            maps.transport.save(out.file("lineas.safetensors"), model=model.name)
    steerer = combined(steerers) if len(steerers) > 1 else steerers[""]
    if settings.match_kl is not None:
        start = next((c for c in coeffs if c > 0), 1.0)
        grid = out.part("calibration", "Coefficients at matched KL",
                        f"Each method's coefficient with mean KL {settings.match_kl:g} on the neutral prompts.",
                        lambda: calibrated(model, steerer, grid, settings.match_kl, texts, start)).settings  # fmt: skip
    corpus = load_corpus(model, "wikitext2", max_tokens=settings.windows * settings.window) if settings.windows else None
    data = SweepData(items, texts, [w.tolist() for w in corpus.windows(settings.window)] if corpus else [])
    result = out.part("steer", "Steering sweep", "Contrastive activation addition vs a prompting baseline.",
                      lambda: sweep(model, steerer, grid, data, instruction=settings.instruction,
                                    max_kl=settings.max_kl, max_ppl_rise=settings.max_ppl_rise,
                                    samples=settings.samples, earlier=out.partial("steer"),
                                    on_cells=lambda cells: out.update("steer", cells)))  # fmt: skip
    if settings.save is not None:
        meta = {"site": "resid_post", "method": "mean_diff", "position": settings.position, "data": examples.source}
        save_vectors(settings.save, vectors.vectors, model=model.name, **meta)
    setting = next((s for s in grid if s.name == result.chosen and not s.method), None)
    if settings.gguf is not None and setting is not None:
        chosen = {layer: setting.coeff * vectors.vectors[layer] for layer in setting.layers}
        export_control_vector(settings.gguf, chosen, model.hf.config.model_type)
    return result


STEER = Command("steer", SteerSettings, run_steer)


# -- das -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DASSettings:
    """``lmscope das``: distributed alignment search at one site, and the illusion check."""

    data: Path | None = option(
        None, "prompt pairs (JSONL: clean, corrupt, answer, wrong_answer): each corrupted prompt is a base "
        "run, its clean prompt the source, the answer the counterfactual label", path="file"
    )  # fmt: skip
    task: str | None = option(None, f"built-in task: {', '.join(GENERATORS)}", choices=GENERATORS)
    n: int | None = option(None, "number of pairs to generate for --task", flag="--n", min=1, max=MAX_PAIRS)
    answer_token: str = option("first", f"the label's token of an answer of several tokens: {', '.join(ANSWER_TOKENS)}",
                               choices=ANSWER_TOKENS)  # fmt: skip
    site: str | None = option(None, "the site, e.g. blocks.6.resid_post (default: the middle layer's resid_post)",
                              parse=parse_site)  # fmt: skip
    positions: str = option("-1", "comma-separated positions (negative: from the end) or all")
    k: int = option(1, "dimension of the subspace", min=1, max=1_000_000)
    steps: int = option(300, "Adam steps", min=1, max=1_000_000)
    lr: float = option(1e-2, "learning rate (positive)", min=0)
    batch_size: int = option(32, "pairs per step and per evaluation batch", min=1, max=100_000)
    holdout: float = option(0.2, "fraction of the pairs held out of training (the held-out IIA)", min=0, max=0.99)
    seed: int = option(0, "seed of the split, the initial basis and the batches", min=0)
    illusion: bool = option(True, "check the subspace for the interpretability illusion (Makelov et al. 2024)")
    min_effect: float = option(0.2, "illusion check: the least effect of the whole subspace that is checked", min=0)
    ratio: float = option(0.5, "illusion check: flagged when the row-space part keeps less than this share of it",
                          min=0.001, max=1)  # fmt: skip

    def __post_init__(self) -> None:
        if self.lr == 0:
            raise LmscopeError("--lr must be positive (got 0)")
        if self.data is not None:
            load_pairs(self.data)  # a bad pair file fails before the model loads
        self.position_list()

    def position_list(self) -> list[int] | None:
        """``--positions`` as a list (None: every position)."""
        return None if self.positions.strip() == "all" else numbers(self.positions, "positions", int)


@dataclass
class Alignment(Result):
    """The subspace DAS found (:class:`~lmscope.steering.subspace.DASResult`) and how the pairs'
    answers became labels (:func:`~lmscope.circuits.pairs.answer_record`)."""

    found: DASResult
    answers: dict

    def to_json(self) -> dict:
        return {**self.found.to_json(), "answers": self.answers}

    def text(self) -> str:
        return self.found.text()

    def tables(self) -> list[Table]:
        return self.found.tables()

    def figures(self) -> list[Figure]:
        return self.found.figures()


@dataclass
class DASRun(Result):
    """``lmscope das``: the alignment and its illusion check (or why it did not run)."""

    alignment: Alignment
    illusion: IllusionResult | Skipped | None = None

    def to_json(self) -> dict:
        return {"das": self.alignment.to_json(), "illusion": self.illusion.to_json() if self.illusion else None}

    def text(self) -> str:
        return " ".join(r.text() + "." for r in (self.alignment, self.illusion) if r is not None)

    def tables(self) -> list[Table]:
        return self.alignment.tables() + (self.illusion.tables() if self.illusion else [])


def _labelled(pairs: list[TokenPair]) -> tuple[Tensor, Tensor]:
    """Each pair's counterfactual label (its answer's token) and base label (its wrong answer's)."""
    for i, p in enumerate(pairs):
        if len(p.answer) != 1 or len(p.wrong) != 1:
            raise LmscopeError(f"pair {i}: DAS takes one answer and one wrong answer per pair, not lists of candidates")
    return torch.cat([p.answer for p in pairs]), torch.cat([p.wrong for p in pairs])


def run_das(model: Model, settings: DASSettings, out: RunWriter) -> DASRun:
    """Distributed alignment search (Geiger et al. 2023): a k-dimensional subspace of one site
    whose interchange interventions from each clean prompt into its corrupted one give the clean
    answer, with its interchange-intervention accuracy on training and held-out pairs, and the
    illusion check (Makelov et al. 2024)."""
    prompts = pairs_for(model, settings.data, settings.task, settings.n)
    pairs = token_pairs(model, prompts, "final", settings.answer_token)
    labels, base_labels = _labelled(pairs)
    site = str(model.site(settings.site or f"blocks.{model.n_layers // 2}.resid_post"))
    positions = settings.position_list()
    base, source = prompt_batch(model, pairs, "corrupt"), prompt_batch(model, pairs, "clean")
    options = {"positions": positions, "batch_size": settings.batch_size}
    train = lambda: Alignment(
        das(model, site, base, source, labels, k=settings.k, steps=settings.steps, lr=settings.lr,
            holdout=settings.holdout, seed=settings.seed, **options),
        answer_record(model, pairs, settings.answer_token),
    )  # fmt: skip
    where = f"{site}, positions {settings.positions}"
    description = f"A {settings.k}-dimensional subspace of {where}, trained for {settings.steps} steps."
    alignment = out.part("das", "Distributed alignment search", description, train)
    alignment.found.save(out.file("subspace.safetensors"), model=model.name)
    if not settings.illusion:
        return DASRun(alignment)

    def check() -> IllusionResult | Skipped:
        try:
            return illusion_check(model, site, alignment.found.basis, base, source, labels, base_labels=base_labels,
                                  min_effect=settings.min_effect, ratio=settings.ratio, **options)  # fmt: skip
        except LmscopeError as e:
            return Skipped(f"Illusion check not run: {e}")

    description = "The effect of the subspace, of its part the downstream weights read and of the rest."
    return DASRun(alignment, out.part("illusion", "Illusion check", description, check))


DAS = Command("das", DASSettings, run_das)

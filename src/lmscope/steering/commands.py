"""The commands of this package: ``lmscope probe`` and ``lmscope steer`` (settings and run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.core.corpus import load_corpus
from lmscope.reports.command import Command, RunWriter, option
from lmscope.reports.results import Result, Table
from lmscope.steering.directions import ProbeResult, load_examples, probe
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
from lmscope.steering.vectors import check_direction, load_direction


def numbers(spec: str, name: str, kind: type = float) -> list:
    """``"1,2,4"`` as numbers of ``kind``; a one-line error naming the option otherwise."""
    try:
        return [kind(x) for x in spec.split(",")]
    except ValueError:
        what = "numbers" if kind is float else "integers"
        raise LmscopeError(f"--{name}: expected comma-separated {what}, got {spec!r}") from None


# -- probe ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSettings:
    """``lmscope probe``: directions and probes per layer with held-out accuracy."""

    data: Path = option(help="JSONL: {text, label} or contrastive {positive, negative[, prompt]}")
    layers: str | None = option(None, "comma-separated layers (default: all)")
    site: str = option("resid_post", "per-layer site, e.g. resid_post, resid_mid, attn.out")
    position: str = option("last", "last, mean, or span ([[marked]] in each text)")
    test_fraction: float = option(0.25, "held-out fraction (pairs kept together)")
    seed: int = option(0, "split seed")
    save: Path | None = option(None, "write the directions (safetensors)")

    def __post_init__(self) -> None:
        if self.layers is not None:
            numbers(self.layers, "layers", int)


def run_probe(model: Model, settings: ProbeSettings, out: RunWriter) -> ProbeResult:
    """Difference-of-means, first-principal-component and logistic-regression probes per layer, with
    held-out accuracy per layer."""
    examples = load_examples(settings.data)
    layers = numbers(settings.layers, "layers", int) if settings.layers is not None else None
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

    pairs: Path = option(help="contrastive pairs (JSONL: positive, negative[, prompt])")
    eval: Path = option(help="JSONL: prompt, target[, opposite]")
    layers: str | None = option(None, "settings' layers, e.g. 6,9,12+15 (+ joins; default: every n/8 in the middle)")
    coeffs: str = option("1,2,4,8", "comma-separated coefficients")
    instruction: str = option("", "the prompting baseline's prefix")
    neutral: Path | None = option(None, "neutral prompts, one per line (default: bundled)")
    windows: int = option(4, "WikiText-2 windows for perplexity")
    window: int = option(64, "tokens per window")
    position: str = option("last", "where the vector is read: last, mean or span")
    max_kl: float = option(0.2, "choice: largest KL to unsteered allowed")
    max_ppl_rise: float = option(0.1, "choice: largest relative perplexity rise")
    samples: int = option(3, "prompts with sample generations")
    lineas: bool = option(False, "also learn LinEAS maps (negatives -> positives, unpaired)")
    lineas_steps: int = option(100, "LinEAS Adam steps")
    lineas_strengths: str = option("0.5,1", "LinEAS strengths to sweep")
    lineas_sparsity: float = option(1e-3, "LinEAS group-sparsity weight")
    save: Path | None = option(None, "write the vectors (safetensors)")
    gguf: Path | None = option(None, "write the chosen setting as a llama.cpp control vector")
    vectors: tuple[str, ...] = option((), "also sweep a precomputed direction: a --save file, an SNMF file's "
                                      "feature (FILE#j) or a dictionary's decoder row (DIR#j); repeatable",
                                      flag="--vectors")  # fmt: skip
    match_kl: float | None = option(None, "instead of --coeffs, each method's coefficient calibrated so its mean KL "
                                    "on the neutral prompts is this")  # fmt: skip

    def __post_init__(self) -> None:
        numbers(self.coeffs, "coeffs")
        numbers(self.lineas_strengths, "lineas-strengths")
        if self.match_kl is not None and not self.match_kl > 0:
            raise LmscopeError(f"--match-kl must be positive, got {self.match_kl}")

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
                                    samples=settings.samples))  # fmt: skip
    if settings.save is not None:
        meta = {"site": "resid_post", "method": "mean_diff", "position": settings.position, "data": examples.source}
        save_vectors(settings.save, vectors.vectors, model=model.name, **meta)
    setting = next((s for s in grid if s.name == result.chosen and not s.method), None)
    if settings.gguf is not None and setting is not None:
        chosen = {layer: setting.coeff * vectors.vectors[layer] for layer in setting.layers}
        export_control_vector(settings.gguf, chosen, model.hf.config.model_type)
    return result


STEER = Command("steer", SteerSettings, run_steer)

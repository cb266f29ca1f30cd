"""``lmscope temporal``: the Temporal Heads study end to end, part by part.

"Temporal Heads" (Park et al., ACL 2025, arXiv 2502.14258) on any supported model:

1. ``recall``    what the model knows: multiple-choice recall per category (:mod:`.recall`);
2. ``circuits``  one EAP-IG circuit per (temporal category, year) and per invariant category,
                 with faithfulness and CRS (:mod:`.circuits`); each saved as ``graph_*.json``
                 (and drawn as ``graph_*.png``) when done, reused by a rerun with the same
                 settings, so an interrupted study resumes;
3. ``heads``     temporal heads from the circuits' node sets (:mod:`.heads`);
4. ``ablation``  each temporal head zeroed alone and all together: recall and perplexity
                 (:mod:`.ablation`);
5. ``reading``   logit lens and direct logit attribution, numeric-year vs alias prompts
                 (:mod:`.reading`);
6. ``edit``      temporal knowledge editing through every head's values (:mod:`.edit`).

Each part's result is written to ``results.json``, its plots as PNG and ``report.html`` as soon
as it finishes (:class:`lmscope.reports.report.PartWriter`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmscope.circuits.graph import draw
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.core.progress import note, progress_bar
from lmscope.quant.corpus import load_corpus
from lmscope.reports.figures import Figure
from lmscope.reports.report import PartWriter
from lmscope.reports.results import Result, Table, header, output_dir
from lmscope.temporal.ablation import ablation
from lmscope.temporal.circuits import (
    CategoryCircuit,
    CircuitSettings,
    build_circuit,
    load_circuit,
    save_circuit,
    slug,
)
from lmscope.temporal.data import Category, PairSet, Problem, TemporalCategory, invariant_pairs, pairs_by_year
from lmscope.temporal.edit import default_experiments, load_experiments, temporal_edit
from lmscope.temporal.heads import INVARIANT, temporal_heads
from lmscope.temporal.reading import read_heads
from lmscope.temporal.recall import recall

PAPER = "Park et al., ACL 2025, arXiv:2502.14258"
QUICK_CATEGORIES = ("presidents", "roman")


@dataclass(frozen=True)
class TemporalSettings:
    """Every setting of the study; the defaults are the paper's (EAP-IG 100 steps integrated
    over k = 1..steps, top 5,000 edges, all pairs, all years, major ratio 0.9, recall with the
    question templates, BOS prepended, greedy editing with 50 new tokens).

    ``years``: the first n years of each temporal category (None: all); ``max_pairs``: pairs per
    circuit; ``recall_samples``: samples per category for recall and ablation (None: all);
    ``corpus``/``ppl_tokens``/``window``: the perplexity check (``corpus=None``: skipped);
    ``read_prompts``: facts per category for the lens; ``ablate_alone``: zero at most n heads alone
    (those in the most temporal circuits; None: every temporal head); ``edits``: a JSONL of experiments (None:
    the paper's 15), ``edit_experiments``: only the first n; ``edit``: run the sweep at all."""

    steps: int = 100
    schedule: str = "paper"
    top: int = 5000
    ratio: float = 0.9
    max_pairs: int | None = None
    years: int | None = None
    recall_samples: int | None = None
    templates: str = "prompt_templates_zs"
    chat: bool = True
    bos: bool = True
    corpus: str | None = "wikitext2"
    ppl_tokens: int = 8192
    window: int = 512
    read_prompts: int = 16
    ablate_alone: int | None = None
    edit: bool = True
    edits: str | None = None
    edit_experiments: int | None = None
    sample: bool = False
    seed: int = 42
    max_new_tokens: int = 50

    @property
    def circuits(self) -> CircuitSettings:
        return CircuitSettings(self.steps, self.schedule, self.top, self.max_pairs)


QUICK = TemporalSettings(
    steps=5,
    max_pairs=2,
    years=2,
    recall_samples=8,
    ppl_tokens=1024,
    window=256,
    read_prompts=4,
    edit_experiments=1,
    ablate_alone=3,
)


@dataclass
class StudyCircuits(Result):
    """Every circuit of the study (full graphs in ``graph_*.json``), the pair sets with no pairs
    and how many circuits were read back from an earlier run."""

    circuits: list[CategoryCircuit]
    empty: list[str] = field(default_factory=list)
    resumed: int = 0

    def to_json(self) -> dict:
        return {
            "circuits": [{**c.summary(), "file": f"graph_{c.slug}.json"} for c in self.circuits],
            "empty": self.empty,
            "resumed": self.resumed,
        }

    def text(self) -> str:
        if not self.circuits:
            return "No circuits."
        crs = [c.faithfulness.crs for c in self.circuits]
        resumed = f" ({self.resumed} read back from an earlier run)" if self.resumed else ""
        return (
            f"{len(self.circuits)} circuits{resumed}; CRS mean {sum(crs) / len(crs):.1f}, "
            f"min {min(crs):.1f}, max {max(crs):.1f}. Full graphs: graph_*.json."
        )

    def tables(self) -> list[Table]:
        tables = [Table("circuits: size and faithfulness (B full model, C circuit, CRS as the paper)",
                        [c.summary() for c in self.circuits])]  # fmt: skip
        if self.empty:
            tables.append(Table("pair sets without pairs (no circuit)", [{"pairs": name} for name in self.empty]))
        return tables

    def figures(self) -> list[Figure]:
        if not self.circuits:
            return []
        x = [c.name for c in self.circuits]
        series = {"CRS": [c.faithfulness.crs for c in self.circuits]}
        return [
            Figure("circuits_crs", "bars", "circuit faithfulness (CRS, 0-100)", "circuit", "CRS", x=x, series=series)
        ]


@dataclass
class Skipped(Result):
    """A part that did not run, and why."""

    reason: str

    def text(self) -> str:
        return self.reason


def limit(category: Category, n: int | None) -> Category:
    """``category`` with only its first ``n`` samples (all when None)."""
    return category if n is None else dataclasses.replace(category, samples=category.samples[:n])


def pair_sets(model: Model, categories: Sequence[Category], settings: TemporalSettings) -> list[tuple[str, PairSet]]:
    """``(group, pairs)`` of every circuit to build: per temporal category and year (group: the
    year), then per invariant category (group ``"invariant"``)."""
    out = []
    for c in categories:
        if isinstance(c, TemporalCategory):
            years = c.years if settings.years is None else c.years[: settings.years]
            by_year = pairs_by_year(model, c, years=years, bos=settings.bos)
            out += [(year, pairs) for year, pairs in by_year.years.items()]
    for c in categories:
        if not isinstance(c, TemporalCategory):
            out.append((INVARIANT, invariant_pairs(model, c, bos=settings.bos)))
    return out


def study_circuits(
    model: Model,
    categories: Sequence[Category],
    out: Path,
    settings: TemporalSettings,
    writer: PartWriter | None = None,
) -> StudyCircuits:
    """Build (or read back) every circuit of :func:`pair_sets`, saving each as it is done."""
    result = StudyCircuits([])
    sets = pair_sets(model, categories, settings)
    with progress_bar("temporal circuits", len(sets)) as advance:
        for group, pairs in sets:
            used = len(pairs) if settings.max_pairs is None else min(len(pairs), settings.max_pairs)
            if not used:
                result.empty.append(pairs.name)
                advance(1)
                continue
            path = out / f"graph_{slug(pairs.name)}.json"
            circuit = load_circuit(path, settings.circuits, used) if path.exists() else None
            if circuit is not None:
                result.resumed += 1
            else:
                circuit = build_circuit(model, pairs, group, settings.circuits)
                save_circuit(circuit, out)
                draw(circuit.circuit, out / f"graph_{circuit.slug}.png", title=circuit.name)
            result.circuits.append(circuit)
            if writer is not None:
                writer.update("circuits", result)
            advance(1)
    return result


@dataclass
class TemporalStudy:
    """The results of every finished part, by name, and the output directory."""

    out: Path
    results: dict[str, Result]
    payload: dict


def run_study(
    model: Model,
    categories: Sequence[Category],
    out: str | Path = "out/temporal",
    settings: TemporalSettings = TemporalSettings(),
    *,
    name: str = "",
    problems: Sequence[Problem] = (),
) -> TemporalStudy:
    """Run the six parts (module docstring) on ``categories`` and write ``results.json``,
    ``report.html``, ``graph_*.json`` and PNGs to ``out``, each part as it finishes.
    ``problems``: malformed rows found while loading, listed in the results."""
    temporal = [c for c in categories if isinstance(c, TemporalCategory)]
    if not temporal:
        raise LmscopeError("no temporal category selected: the study compares temporal with invariant circuits")
    out = output_dir(out)
    name = name or model.name
    info = {
        "paper": PAPER,
        "categories": [{"name": c.name, "kind": c.kind, "file": c.file, "samples": len(c.samples)} for c in categories],
        "problems": [str(p) for p in problems],
    }
    payload = {**header("temporal", name, model, asdict(settings)), **info}
    writer = PartWriter(out, f"lmscope temporal: {name}", payload, planned=6)
    results: dict[str, Result] = {}

    def part(key: str, title: str, description: str, run) -> Result:
        note(f"temporal: {key}")
        start = time.perf_counter()
        result = run()
        results[key] = result
        writer.add(key, title, description, result, time.perf_counter() - start)
        return result

    known = [limit(c, settings.recall_samples) for c in categories]
    options = {"templates": settings.templates, "chat": settings.chat, "bos": settings.bos}
    known_recall = part("recall", "What the model knows", "Multiple-choice recall per category (paper notebook 5).",
                        lambda: recall(model, known, **options))  # fmt: skip
    circuits = part(
        "circuits",
        "Circuits per year and per invariant category",
        f"EAP-IG ({settings.steps} steps, schedule {settings.schedule}), top {settings.top} edges, pruned; "
        "faithfulness and CRS as the paper's code.",
        lambda: study_circuits(model, categories, out, settings, writer),
    )
    sets = [c.node_set() for c in circuits.circuits]
    heads = part("heads", "Temporal heads", f"Major nodes at ratio {settings.ratio} (paper notebook 2).",
                 lambda: temporal_heads(sets, settings.ratio, model.n_layers, model.n_heads))  # fmt: skip

    def run_ablation() -> Result:
        corpus = None
        if settings.corpus is not None:
            corpus = load_corpus(model, settings.corpus, max_tokens=settings.ppl_tokens)
        return ablation(
            model, heads.heads, known, alone=heads.ranked()[: settings.ablate_alone], corpus=corpus, window=min(settings.window, len(corpus) if corpus else 1),
            recall_options=options, baseline=known_recall, on_row=lambda partial: writer.update("ablation", partial),
        )  # fmt: skip

    part("ablation", "Zero-ablating the temporal heads",
         "Each temporal head zeroed alone and all together: recall per category and perplexity.", run_ablation)  # fmt: skip

    def run_reading() -> Result:
        with_alias = [c for c in temporal if c.alias_time_templates]
        if not with_alias:
            return Skipped("No selected temporal category has alias templates: nothing to compare.")
        return read_heads(model, with_alias, heads.heads, per_category=settings.read_prompts, bos=settings.bos)

    part("reading", "Reading the heads: numeric vs alias years",
         "Logit lens and direct logit attribution at the answer position (paper notebook 3).", run_reading)  # fmt: skip

    def run_edit() -> Result:
        if not settings.edit:
            return Skipped("Editing not run (edit=False).")
        experiments = load_experiments(settings.edits) if settings.edits else default_experiments()
        if settings.edit_experiments is not None:
            experiments = experiments[: settings.edit_experiments]
        return temporal_edit(model, experiments, sample=settings.sample, seed=settings.seed,
                             max_new_tokens=settings.max_new_tokens)  # fmt: skip

    part("edit", "Editing through head values",
         "Every head's value edit per experiment: successes per head (paper notebook 7).", run_edit)  # fmt: skip
    return TemporalStudy(out, results, writer.payload)

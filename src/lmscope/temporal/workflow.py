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
as it finishes (:class:`lmscope.reports.command.RunWriter`); a rerun with the same settings reads
the finished parts back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from lmscope.circuits.attribution import SCHEDULES
from lmscope.circuits.commands import MAX_STEPS
from lmscope.circuits.graph import draw
from lmscope.core.corpus import BUNDLED, check_corpus, load_corpus
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.core.progress import note, progress_bar
from lmscope.reports.command import Command, RunWriter, option
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Skipped, Table
from lmscope.temporal.ablation import ablation
from lmscope.temporal.circuits import (
    CategoryCircuit,
    CircuitSettings,
    build_circuit,
    load_circuit,
    save_circuit,
    slug,
)
from lmscope.temporal.data import (
    Category,
    PairSet,
    Problem,
    TemporalCategory,
    invariant_pairs,
    pairs_by_year,
    select_categories,
)
from lmscope.temporal.edit import (
    EditExperiment,
    check_experiments,
    default_experiments,
    load_experiments,
    temporal_edit,
)
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

    ``categories``/``data``: which categories (comma-separated keys; files or folders in the
    paper's format, default the bundled ones); ``years``: the first n years of each temporal
    category (None: all); ``max_pairs``: pairs per circuit; ``recall_samples``: samples per
    category for recall and ablation (None: all); ``corpus``/``ppl_tokens``/``window``: the
    perplexity check (``corpus=None`` or ``"none"``: skipped); ``read_prompts``: facts per
    category for the lens; ``ablate_alone``: zero at most n heads alone (those in the most
    temporal circuits; None: every temporal head); ``edits``: a JSONL of experiments (None: the
    paper's 15), ``edit_experiments``: only the first n; ``edit``: run the sweep at all.
    Categories and edit experiments are read (and checked) when the settings are made."""

    categories: str | None = option(None, "comma-separated category keys, e.g. presidents,ceo,roman (default: all)")
    data: tuple[Path, ...] = option((), "category files or directories in the paper's format (repeatable)", path="any")
    steps: int = option(100, "EAP-IG steps", min=1, max=MAX_STEPS)
    schedule: str = option("paper", "EAP-IG schedule: paper (k=1..steps) or upstream (k=0..steps-1)",
                           choices=SCHEDULES)  # fmt: skip
    top: int = option(5000, "edges per circuit, by |score| (capped at the graph's)", min=1)
    ratio: float = option(0.9, "a node is major in >= ceil(ratio n) of a group's n circuits", min=0.01, max=1)
    max_pairs: int | None = option(None, "at most N pairs per circuit (default: all)", min=1)
    years: int | None = option(None, "only the first N years of each temporal category", min=1)
    recall_samples: int | None = option(None, "at most N samples per category for recall and ablation",
                                        flag="--samples", min=1)  # fmt: skip
    templates: str = option("prompt_templates_zs", "the recall prompts' template field")
    chat: bool = option(True, "wrap recall prompts in the chat template where the tokenizer has one")
    bos: bool = option(True, "prepend BOS (the paper's code does)")
    corpus: str | None = option("wikitext2", "perplexity corpus: wikitext2, a text or JSONL file, or none",
                                path="file", choices=(*BUNDLED, "none"))  # fmt: skip
    ppl_tokens: int = option(8192, "perplexity tokens", min=1)
    window: int = option(512, "perplexity window", min=2)
    read_prompts: int = option(16, "facts per category for the lens", min=1)
    ablate_alone: int | None = option(None, "zero at most N heads alone (default: every temporal head)", min=0)
    edit: bool = option(True, "run the value-editing sweep")
    edits: str | None = option(None, "JSONL of edit experiments (default: the paper's 15)", path="file")
    edit_experiments: int | None = option(None, "only the first N edit experiments", min=1)
    sample: bool = option(False, "sample when generating edits (default: greedy)")
    seed: int = option(42, "seed for --sample", min=0)
    max_new_tokens: int = option(50, "tokens generated per edit (the trigger window)", min=1, max=100_000)

    def __post_init__(self) -> None:
        if self.corpus == "none":
            object.__setattr__(self, "corpus", None)
        if self.corpus is not None:
            check_corpus(self.corpus)
        if self.edits is not None:
            object.__setattr__(self, "edits", str(self.edits))
            load_experiments(self.edits)  # bad experiments fail before the model loads
        self.selected()

    def selected(self) -> tuple[list[Category], list[Problem]]:
        """The chosen categories and the malformed rows found while reading them."""
        keys = [k.strip() for k in self.categories.split(",") if k.strip()] if self.categories else None
        return select_categories(keys, list(self.data) or None)

    @property
    def circuits(self) -> CircuitSettings:
        return CircuitSettings(self.steps, self.schedule, self.top, self.max_pairs)


QUICK = TemporalSettings(
    categories=",".join(QUICK_CATEGORIES),
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
    writer: RunWriter | None = None,
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
class TemporalStudy(Result):
    """The results of every finished part, by name, and the output directory."""

    out: Path
    results: dict[str, Result]

    def to_json(self) -> dict:
        return {name: result.to_json() for name, result in self.results.items()}

    def text(self) -> str:
        keys = ("recall", "circuits", "heads", "ablation", "edit")
        return "\n".join(f"{k}: {self.results[k].text()}" for k in keys if self.results[k].text())

    def tables(self) -> list[Table]:
        return self.results["recall"].tables()[:1]


def experiments(settings: TemporalSettings) -> list[EditExperiment]:
    """The edit experiments of ``settings``: its JSONL file or the paper's 15, the first
    ``edit_experiments`` of them."""
    chosen = load_experiments(settings.edits) if settings.edits else default_experiments()
    return chosen if settings.edit_experiments is None else chosen[: settings.edit_experiments]


def run_study(
    model: Model,
    categories: Sequence[Category] | None = None,
    out: str | Path | RunWriter = "out/temporal",
    settings: TemporalSettings = TemporalSettings(),
    *,
    name: str = "",
    problems: Sequence[Problem] = (),
) -> TemporalStudy:
    """Run the six parts (module docstring) on ``categories`` (default: the settings' choice)
    and write ``results.json``, ``report.html``, ``graph_*.json`` and PNGs to ``out`` (a folder,
    or a :class:`RunWriter`), each part as it finishes; a rerun with the same settings reads the
    finished parts back. ``problems``: malformed rows found while loading, listed in the results."""
    if categories is None:
        categories, problems = settings.selected()
    temporal = [c for c in categories if isinstance(c, TemporalCategory)]
    if not temporal:
        raise LmscopeError("no temporal category selected: the study compares temporal with invariant circuits")
    info = {
        "paper": PAPER,
        "categories": [{"name": c.name, "kind": c.kind, "file": c.file, "samples": len(c.samples)} for c in categories],
        "problems": [str(p) for p in problems],
    }
    for problem in problems:
        note(f"skipped: {problem}")
    if settings.edit:  # edit experiments that cannot run fail before the first part
        check_experiments(model, experiments(settings), settings.max_new_tokens)
    writer = out if isinstance(out, RunWriter) else RunWriter(out, "temporal", settings, model=model,
                                                               model_name=name or model.name)  # fmt: skip
    writer.payload.update(info)
    results: dict[str, Result] = {}

    def part(key: str, title: str, description: str, run) -> Result:
        results[key] = writer.part(key, title, description, run)
        return results[key]
    known = [limit(c, settings.recall_samples) for c in categories]
    options = {"templates": settings.templates, "chat": settings.chat, "bos": settings.bos}
    known_recall = part("recall", "What the model knows", "Multiple-choice recall per category (paper notebook 5).",
                        lambda: recall(model, known, **options))  # fmt: skip
    circuits = part(
        "circuits",
        "Circuits per year and per invariant category",
        f"EAP-IG ({settings.steps} steps, schedule {settings.schedule}), top {settings.top} edges, pruned; "
        "faithfulness and CRS as the paper's code.",
        lambda: study_circuits(model, categories, writer.out, settings, writer),
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
        return temporal_edit(model, experiments(settings), sample=settings.sample, seed=settings.seed,
                             max_new_tokens=settings.max_new_tokens)  # fmt: skip

    part("edit", "Editing through head values",
         "Every head's value edit per experiment: successes per head (paper notebook 7).", run_edit)  # fmt: skip
    if not isinstance(out, RunWriter):
        writer.finish()
    return TemporalStudy(writer.out, results)


def run_temporal(model: Model, settings: TemporalSettings, out: RunWriter) -> TemporalStudy:
    """Temporal Heads (Park et al., ACL 2025): recall, circuits per year, temporal heads, ablation, lens, editing."""
    return run_study(model, None, out, settings)


TEMPORAL = Command(
    "temporal", TemporalSettings, run_temporal,
    # --quick on other --data keeps all its categories
    presets={"quick": (lambda given: replace(QUICK, categories=None) if given.get("data") else QUICK,
                       "a small run: 2 categories, 2 years, 2 pairs, 5 steps, 1 edit")},  # fmt: skip
)  # fmt: skip

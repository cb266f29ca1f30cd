"""The commands of this package: ``lmscope locate``, ``circuit`` and ``heads`` (settings and run)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from lmscope.circuits.edges import edge_attribution
from lmscope.circuits.faithfulness import Faithfulness, faithfulness
from lmscope.circuits.graph import Circuit, draw, select
from lmscope.circuits.head_roles import head_roles
from lmscope.circuits.locate import LEVELS, METHODS, locate
from lmscope.circuits.metrics import METRICS
from lmscope.circuits.pairs import (
    ANSWER_TOKENS,
    PromptPair,
    TokenPair,
    answer_record,
    check_answer_token,
    shortened_note,
    load_pairs,
    tokenize_pairs,
)
from lmscope.circuits.scores import PatchResult
from lmscope.circuits.tasks import GENERATORS, pairs_for
from lmscope.core.errors import LmscopeError
from lmscope.core.memory import PeakMemory, model_budget
from lmscope.core.model import Model
from lmscope.core.progress import console
from lmscope.reports.command import Command, RunWriter, option
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table

MAX_STEPS = 10_000  # EAP-IG interpolation steps: far past any use (the papers use 5 to 100)
MAX_PAIRS = 100_000  # generated pairs, random sequences
MAX_LENGTH = 100_000  # tokens of a generated sequence (the model's context is checked when it runs)


def token_pairs(model: Model, prompts: list[PromptPair], align: str, answer_token: str) -> list[TokenPair]:
    """:func:`~lmscope.circuits.pairs.tokenize_pairs`, with a one-line note when answers of
    several tokens are scored by one."""
    pairs = tokenize_pairs(model, prompts, align, answer_token)
    note = shortened_note(pairs, answer_token)
    if note:
        console.print(note, soft_wrap=True, highlight=False, markup=False)
    return pairs


@dataclass(frozen=True)
class PairOptions:
    """Where the prompt pairs come from and how they are scored (shared by locate and circuit)."""

    data: Path | None = option(None, "prompt pairs (JSONL: clean, corrupt, answer, wrong_answer)", path="file")
    task: str | None = option(None, "built-in task: ioi, induction, capitals", choices=GENERATORS)
    n: int | None = option(None, "number of pairs to generate for --task", flag="--n", min=1, max=MAX_PAIRS)
    metric: str = option("logit_diff", "logit_diff, logprob, prob or kl", choices=METRICS)
    align: str = option("strict", "strict, or final: left-pad pairs of unequal length", choices=("strict", "final"))
    answer_token: str = option(
        "first",
        "how the metric scores an answer of several tokens: "
        + "; ".join(f"{k}: {v}" for k, v in ANSWER_TOKENS.items()),
    )

    def __post_init__(self) -> None:
        check_answer_token(self.answer_token)
        if self.data is not None:
            load_pairs(self.data)  # a bad pair file fails before the model loads

    def pairs(self, model: Model) -> list[TokenPair]:
        """The token pairs (one-line errors for a bad file, task, alignment or answer)."""
        return token_pairs(model, pairs_for(model, self.data, self.task, self.n), self.align, self.answer_token)

    def answers(self, model: Model, pairs: list[TokenPair]) -> dict:
        """The ``answers`` record of results.json (:func:`~lmscope.circuits.pairs.answer_record`)."""
        return answer_record(model, pairs, self.answer_token)


def memory_record(model: Model, budget: int, peak: PeakMemory) -> dict:
    """Device, working-memory budget and peak above the start, in bytes."""
    return {"device": str(model.device), "budget_bytes": budget, "peak_bytes": peak.peak}


# -- locate --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocateSettings(PairOptions):
    """``lmscope locate``: score every head, layer, position or expert by one method."""

    method: str = option("exact", f"{', '.join(METHODS)}", choices=METHODS)
    level: str = option("head", "head, layer (attention and MLP), position (residual) or expert (mixture-of-experts)",
                        choices=LEVELS)  # fmt: skip
    direction: str = option("denoising", "denoising or noising (exact only)", choices=("denoising", "noising"))
    steps: int = option(100, "EAP-IG interpolation steps", min=1, max=MAX_STEPS)
    top: int = option(10, "rows of the top table", min=1)


@dataclass
class Located(Result):
    """Scores of every component of one level, with the metric's baselines and the memory used."""

    results: list[PatchResult]
    memory: dict
    top: int = 10
    n_pairs: int = 0
    answers: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        first = self.results[0]
        return {
            "metric": {"name": first.metric, "clean": first.clean, "corrupt": first.corrupt},
            "n_pairs": self.n_pairs,
            "answers": self.answers,
            "memory": self.memory,
            "results": [r.to_json() for r in self.results],
        }

    def text(self) -> str:
        first = self.results[0]
        return f"{first.method} on {self.n_pairs} pairs: {first.text()}"

    def tables(self) -> list[Table]:
        rows = [{"component": r.component, **row} for r in self.results for row in r.rows()]
        rows = sorted(rows, key=lambda row: -abs(row["score"]))[: self.top]
        return [Table(f"top {len(rows)} components by |score|", rows)]

    def figures(self) -> list[Figure]:
        return [figure for r in self.results for figure in r.figures()]


def run_locate(model: Model, settings: LocateSettings, out: RunWriter) -> Located:
    """Find where a behaviour lives: patch or attribute every head, layer or position."""
    pairs = settings.pairs(model)
    budget = model_budget(model)

    def compute() -> Located:
        with PeakMemory(model.device) as peak:
            results = locate(model, pairs, settings.method, settings.level, settings.metric, settings.steps,
                             settings.direction, max_memory=budget)  # fmt: skip
        answers = settings.answers(model, pairs)
        return Located(results, memory_record(model, budget, peak), settings.top, len(pairs), answers)

    return out.part("locate", "Where the behaviour lives", f"{settings.method} scores per {settings.level}.", compute)


LOCATE = Command("locate", LocateSettings, run_locate, hidden_aliases=("patch",))


# -- circuit -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CircuitSettings(PairOptions):
    """``lmscope circuit``: EAP-IG edges, a pruned circuit and its faithfulness."""

    top: int | None = option(None, "keep the top N edges by |score|", min=1)
    threshold: float | None = option(None, "keep edges with |score| >= X", min=0)
    steps: int = option(100, "EAP-IG interpolation steps (1: plain EAP)", min=1, max=MAX_STEPS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.top is None) == (self.threshold is None):
            raise LmscopeError("give exactly one of --top N or --threshold X")


@dataclass
class CircuitResult(Result):
    """A pruned circuit, its faithfulness and every edge score."""

    circuit: Circuit
    faithfulness: Faithfulness
    edges: list[tuple[str, str, float]]
    metric: dict
    memory: dict
    answers: dict = field(default_factory=dict)

    def graph(self) -> dict:
        """``graph.json``: the circuit with its metric and faithfulness."""
        return {**self.circuit.to_json(), "metric": self.metric["name"], "faithfulness": self.faithfulness.to_json()}

    def to_json(self) -> dict:
        return {
            "metric": self.metric,
            "answers": self.answers,
            "memory": self.memory,
            "faithfulness": self.faithfulness.to_json(),
            "circuit": self.graph(),
            "edges": [{"from": u, "to": v, "score": s} for u, v, s in self.edges],
        }

    def text(self) -> str:
        f = self.faithfulness
        return (
            f"full model B = {f.baseline:.3f}, circuit C = {f.circuit:.3f}, corrupted = {f.corrupt:.3f}: "
            f"faithfulness {f.normalised:.3f}, CRS {f.crs:.1f}"
        )

    def tables(self) -> list[Table]:
        strongest = sorted(self.circuit.edges, key=lambda e: -abs(e[2]))[:15]
        caption = f"circuit: {len(self.circuit.edges)} edges, {len(self.circuit.nodes)} nodes (strongest 15)"
        return [Table(caption, [{"from": u, "to": v, "score": s} for u, v, s in strongest])]


def run_circuit(model: Model, settings: CircuitSettings, out: RunWriter) -> CircuitResult:
    """EAP-IG edge scores, a pruned circuit, its faithfulness and CRS, as JSON and a drawing."""
    pairs = settings.pairs(model)
    budget = model_budget(model)

    def compute() -> CircuitResult:
        with PeakMemory(model.device) as peak:
            scores = edge_attribution(model, pairs, settings.metric, settings.steps, max_memory=budget)
        chosen = select(scores, top=settings.top, threshold=settings.threshold)
        faith = faithfulness(model, pairs, chosen, settings.metric)
        metric = {"name": settings.metric, "clean": scores.clean, "corrupt": scores.corrupt}
        memory = memory_record(model, budget, peak)
        return CircuitResult(chosen, faith, list(scores.edges()), metric, memory, settings.answers(model, pairs))

    result = out.part("circuit", "Circuit", "EAP-IG edges pruned to a circuit, with its faithfulness.", compute)
    out.write_json("graph.json", result.graph())
    title = f"{model.name}: {len(result.circuit.edges)} edges, CRS {result.faithfulness.crs:.1f}"
    draw(result.circuit, out.file("circuit.png"), title)
    return result


CIRCUIT = Command("circuit", CircuitSettings, run_circuit)


# -- heads ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadsSettings:
    """``lmscope heads``: induction, previous-token and duplicate-token scores of every head."""

    length: int = option(30, "length of the repeated random sequence", min=2, max=MAX_LENGTH)
    batch: int = option(8, "number of sequences", min=1, max=MAX_PAIRS)


@dataclass
class _Renamed(Result):
    """A result whose figures are saved under other names (``heads``: induction.png, not
    heads_induction.png as in the scan)."""

    inner: Result
    prefix: str = field(default="heads_")

    def to_json(self) -> dict:
        return self.inner.to_json()

    def text(self) -> str:
        return self.inner.text()

    def tables(self) -> list[Table]:
        return self.inner.tables()

    def figures(self) -> list[Figure]:
        return [replace(f, name=f.name.removeprefix(self.prefix)) for f in self.inner.figures()]


def run_heads(model: Model, settings: HeadsSettings, out: RunWriter) -> Result:
    """Induction, previous-token and duplicate-token scores of every head."""
    compute = lambda: _Renamed(head_roles(model, batch=settings.batch, length=settings.length, loss=True))
    return out.part("heads", "Head roles", "Mean attention to the role's token on repeated random tokens.", compute)


HEADS = Command("heads", HeadsSettings, run_heads)

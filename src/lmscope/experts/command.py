"""``lmscope experts``: routing statistics and resection of a mixture-of-experts model (settings and run)."""

from __future__ import annotations

from dataclasses import dataclass

from lmscope.core.corpus import BUNDLED, check_corpus, load_corpus
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.experts.resection import Resection, resection
from lmscope.experts.routing import ExpertStats, expert_stats, moe_layers
from lmscope.reports.command import Command, RunWriter, option
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table


@dataclass(frozen=True)
class ExpertsSettings:
    """``lmscope experts``: the domains, how much of each, and the resection."""

    corpus: tuple[str, ...] = option(("wikitext2",), "a domain: text or JSONL file, or 'wikitext2' (repeatable)",
                                     path="file", choices=BUNDLED)  # fmt: skip
    tokens: int = option(8192, "tokens per corpus", min=1)
    window: int = option(256, "tokens per window", min=1)
    batch_size: int = option(4, "windows per forward", min=1, max=100_000)
    top: int = option(5, "top-activating tokens kept per expert", min=1)
    resect: int | None = option(None, "remove each domain's N most specialised experts", min=1)
    draws: int = option(3, "random resections to compare with (averaged)", min=1, max=10_000)
    seed: int = option(0, "seed of the random resections", min=0)

    def __post_init__(self) -> None:
        for source in self.corpus:
            check_corpus(source)  # a bad corpus file fails before the model loads
        if self.resect is not None and len(self.corpus) < 2:
            raise LmscopeError("--resect needs at least two --corpus domains (experts specialised to one of them)")


@dataclass
class ExpertsResult(Result):
    """Routing statistics, and the resection when one was asked for."""

    stats: ExpertStats
    resection: Resection | None = None

    def to_json(self) -> dict:
        return {"routing": self.stats.to_json(), "resection": self.resection.to_json() if self.resection else None}

    def text(self) -> str:
        return self.resection.text() if self.resection else self.stats.text()

    def tables(self) -> list[Table]:
        return self.stats.tables()[:1] + (self.resection.tables() if self.resection else [])

    def figures(self) -> list[Figure]:
        return []


def run_experts(model: Model, settings: ExpertsSettings, out: RunWriter) -> ExpertsResult:
    """Which experts do what: load, routing entropy, co-activation, top tokens, domain specialisation, resection."""
    moe_layers(model)  # a dense model fails before any corpus is read
    corpora = [load_corpus(model, source, max_tokens=settings.tokens) for source in settings.corpus]
    options = {"window": settings.window, "batch_size": settings.batch_size}
    stats = out.part("routing", "Expert routing", "Load, routing entropy, co-activation and top tokens per expert.",
                     lambda: expert_stats(model, corpora, top=settings.top, **options))  # fmt: skip
    if settings.resect is None:
        return ExpertsResult(stats)
    n, draws = settings.resect, settings.draws
    description = (
        f"Each domain's {n} most specialised experts removed (routing weight 0), against {n} random "
        f"experts ({draws} draws); mean next-token loss per domain."
    )
    compute = lambda: resection(
        model, corpora, stats, n, draws=draws, seed=settings.seed, on_row=lambda r: out.update("resection", r),
        earlier=out.partial("resection"), **options,
    )  # fmt: skip
    return ExpertsResult(stats, out.part("resection", "Expert resection", description, compute))


EXPERTS = Command("experts", ExpertsSettings, run_experts)

"""``lmscope lens``: the logit lens or a tuned lens over one text (settings and run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmscope.core.corpus import BUNDLED, check_corpus, load_corpus
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.readout.logit_lenses import LensResult, lens
from lmscope.readout.tuned import TunedLens, check_tuned_lens, load_tuned_lens, train_tuned_lens
from lmscope.reports.command import Command, RunWriter, argument, option
from lmscope.reports.results import Result


@dataclass(frozen=True)
class LensSettings:
    """``lmscope lens``: the text, the lens (logit, a saved tuned lens, or one trained here) and the readout."""

    text: str = argument(help="the text to read")
    tuned: Path | None = option(None, "a tuned lens saved by --train-tuned --save", path="file")
    train_tuned: bool = option(False, "train a tuned lens on --corpus first")
    corpus: str = option("wikitext2", "text or JSONL file, or the bundled 'wikitext2' (test split)", path="file",
                         choices=BUNDLED)  # fmt: skip
    tokens: int = option(8192, "corpus tokens for --train-tuned", min=1)
    steps: int = option(100, "Adam steps for --train-tuned", min=1, max=1_000_000)
    lr: float = option(1e-3, "learning rate for --train-tuned", min=0)
    save: Path | None = option(None, "write the trained tuned lens here", path="out")
    token: tuple[str, ...] = option((), "a token to follow instead of the next (repeatable)", flag="--token")
    position: int = option(-1, "position of the top-token table (-1: last)")
    top: int = option(5, "top tokens per layer", min=1)

    def __post_init__(self) -> None:
        if self.tuned is not None and self.train_tuned:
            raise LmscopeError("give --tuned PATH or --train-tuned, not both")
        if self.save is not None and not self.train_tuned:
            raise LmscopeError("--save writes a lens trained with --train-tuned")
        if self.tuned is not None:
            check_tuned_lens(self.tuned)  # a missing or foreign file fails before the model loads
        if self.train_tuned:
            check_corpus(self.corpus)


@dataclass
class TrainedLens(Result):
    """A tuned lens trained by the command, with what it was trained on."""

    lens: TunedLens
    corpus: str

    def to_json(self) -> dict:
        return {"corpus": self.corpus, **self.lens.info}


def run_lens(model: Model, settings: LensSettings, out: RunWriter) -> LensResult:
    """Logit lens, or tuned lens (Belrose et al. 2023), of TEXT: per layer and position, the next token's
    probability and rank, and the top tokens per layer."""
    n_pos = model.tokenize(settings.text)[0].shape[-1]  # the text and --position checked before anything runs
    if not -n_pos <= settings.position < n_pos:
        raise LmscopeError(f"--position {settings.position} out of range for a text of {n_pos} tokens")
    tuned = load_tuned_lens(model, settings.tuned) if settings.tuned is not None else None
    if settings.train_tuned:

        def train() -> TrainedLens:
            ids = load_corpus(model, settings.corpus, max_tokens=settings.tokens).tokens
            return TrainedLens(train_tuned_lens(model, ids, steps=settings.steps, lr=settings.lr), settings.corpus)

        tuned = out.part("tuned", "Tuned lens", "Translators trained on the corpus.", train).lens
        if settings.save is not None:
            tuned.save(settings.save)
    compute = lambda: lens(model, settings.text, tuned=tuned, tokens=list(settings.token) or None,
                           position=settings.position, top_k=settings.top)  # fmt: skip
    return out.part("lens", "Lens", "Per layer and position: probability and rank of the target.", compute)


LENS = Command("lens", LensSettings, run_lens)

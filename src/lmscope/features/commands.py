"""``lmscope features train`` and ``lmscope features eval`` (settings and runs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

from torch import Tensor

from lmscope.core import distributed
from lmscope.core.corpus import BUNDLED, Corpus, load_corpus
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.core.progress import note
from lmscope.features.dictionary import Dictionary
from lmscope.features.evaluation import DENSE, Evaluation, evaluate
from lmscope.features.formats import load_dictionaries, save_dictionary
from lmscope.features.harvest import HarvestSource, cached, dtype_of
from lmscope.features.training import Training, TrainSettings, train
from lmscope.reports.command import Command, RunWriter, check_settings, option

# The training text of a bundled corpus name: WikiText-2's validation split (its test split, the
# default evaluation text, never shares a token with it).
TRAINING_TEXT = {"wikitext2": "wikitext-2/valid.txt"}
DICTIONARIES = "dictionaries"


def _check_corpus(source: str) -> None:
    if source not in BUNDLED and not Path(source).is_file():
        raise LmscopeError(f"corpus not found: {source} (a text or JSONL file, or one of: {', '.join(BUNDLED)})")


def training_corpus(model: Model, source: str, max_tokens: int | None) -> Corpus:
    """The training text tokenised: a bundled name means its validation split."""
    if source in TRAINING_TEXT:
        path = Path(str(resources.files("lmscope") / "data" / TRAINING_TEXT[source]))
        return Corpus(f"{source} (validation split)", load_corpus(model, path, max_tokens=max_tokens).tokens)
    return load_corpus(model, source, max_tokens=max_tokens)


def evaluation_windows(model: Model, source: str, tokens: int, seq_len: int) -> tuple[Tensor, str]:
    """Windows [n, seq_len] of the evaluation text (a bundled name: its test split) covering ``tokens`` tokens."""
    n = max(1, math.ceil(tokens / seq_len))
    corpus = load_corpus(model, source, max_tokens=n * seq_len)
    name = f"{source} (test split)" if source in BUNDLED else corpus.name
    return corpus.windows(seq_len)[:n], name


@dataclass(frozen=True)
class TrainCommand(TrainSettings):
    """``lmscope features train``: the training settings, the activations' harvest and the output."""

    corpus: str = option(
        "wikitext2", "training text: text or JSONL file, or 'wikitext2' (the bundled validation split)"
    )
    seq_len: int = option(128, "tokens per harvested window", min=2, max=1_000_000)
    skip_first: int = option(1, "leave out the first positions of every window (an attention sink's outlier norms)")
    outlier: float = option(
        10.0, "leave out tokens whose norm exceeds this multiple of the median (massive activations; 0: none)"
    )
    harvest_batch: int = option(16, "windows per forward pass", min=1, max=100_000)
    buffer: int = option(65536, "tokens per shuffled block of activations", min=1)
    cache: Path | None = option(
        None, "cache the harvested activations as shards in this folder (reused when they match)"
    )
    store_dtype: str = option("float32", "activations held and cached as float32, float16 or bfloat16")
    eval_tokens: int = option(8192, "held-out tokens (the evaluation text) to evaluate the dictionaries on (0: none)",
                              min=0)  # fmt: skip
    eval_corpus: str = option(
        "wikitext2", "evaluation text: text or JSONL file, or 'wikitext2' (the bundled test split)"
    )
    format: str = option("auto", "saved format: saelens, sparsify, or auto (SAELens's where it has the architecture)",
                         choices=("auto", "saelens", "sparsify"))  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        check_settings(self)  # the declared ranges, also for settings made in Python
        dtype_of(self.store_dtype)
        _check_corpus(self.corpus)
        _check_corpus(self.eval_corpus)
        if not 0 <= self.skip_first < self.seq_len - 1:
            raise LmscopeError(f"skip_first must lie in [0, seq_len - 1), got {self.skip_first}")
        if self.outlier < 0:
            raise LmscopeError(f"outlier must be non-negative, got {self.outlier}")

    def training(self) -> TrainSettings:
        """The training settings alone."""
        return TrainSettings(**{f.name: getattr(self, f.name) for f in fields(TrainSettings)})

    def save_format(self, d: Dictionary) -> str:
        """The format ``d`` is saved in: SAELens's unless it lacks the architecture (group-max,
        top-k transcoders) or sparsify's was asked for."""
        if self.format != "auto":
            return self.format
        return "sparsify" if d.arch == "groupmax" or (d.transcoder and d.arch == "topk") else "saelens"


def activations(model: Model, settings: TrainCommand) -> HarvestSource:
    """The activation source of a training run: the sites over the training text's windows."""
    sites = list(dict.fromkeys(settings.site + settings.out_site))
    for site in sites:
        model.site(site)
    for name, target in settings.pairs():
        if model.site(target).layer < model.site(name).layer:
            raise LmscopeError(f"transcoder {name} -> {target} writes a layer before the one it reads")
    per_window = settings.seq_len - settings.skip_first
    wanted = None if settings.tokens is None else math.ceil(settings.tokens / per_window) * settings.seq_len
    corpus = training_corpus(model, settings.corpus, wanted)
    windows = corpus.windows(settings.seq_len)
    if settings.tokens is not None and windows.shape[0] * per_window < settings.tokens:
        note(f"features train: {corpus.name} has {windows.shape[0] * per_window} tokens; the run repeats them")
    return HarvestSource(
        model, sites, windows, block_windows=max(1, settings.buffer // per_window), batch_size=settings.harvest_batch,
        skip_first=settings.skip_first, outlier=settings.outlier, dtype=dtype_of(settings.store_dtype),
    )  # fmt: skip


def run_train(model: Model, settings: TrainCommand, out: RunWriter) -> Training | Evaluation:
    """Train sparse autoencoders or transcoders on activations harvested from the model (several sites in
    one pass), with SAELens's or sparsify's recipe; saves them in SAELens's format and evaluates them on
    held-out text."""
    source = activations(model, settings)
    if settings.cache is not None:
        key = {"model": model.name, "sites": list(source.names), "corpus": settings.corpus, "windows": source.windows.shape[0],
               "seq_len": settings.seq_len, "skip_first": settings.skip_first, "outlier": settings.outlier, "block_windows": source.block_windows}  # fmt: skip
        source = cached(source, settings.cache, source.dtype, key)

    def compute() -> Training:
        run = train(source, settings.training(), out.file("."), device=model.device, resume=not out.overwrite)
        for name, d in run.dictionaries.items():
            d.info["model_name"] = model.name
            folder = out.out / DICTIONARIES / name
            if distributed.is_main():
                save_dictionary(d, folder, settings.save_format(d), model=model)
            run.saved[name] = str(folder)
        return run

    training = out.part("training", "Training", "Per dictionary: FVU, L0 and dead fraction over training.", compute)
    if not settings.eval_tokens:
        return training
    windows, name = evaluation_windows(model, settings.eval_corpus, settings.eval_tokens, settings.seq_len)
    compute_eval = lambda: evaluate(
        model, training.dictionaries, windows, skip_first=settings.skip_first, outlier=settings.outlier, corpus=name
    )
    return out.part(
        "evaluation", "Evaluation", "Reconstruction, sparsity and downstream cost on held-out text.", compute_eval
    )


@dataclass(frozen=True)
class EvalSettings:
    """``lmscope features eval``: the dictionaries and the held-out text."""

    dict: Path = option(
        help="a dictionary folder (SAELens, sparsify, dictionary_learning, circuit-tracer), or a folder of them",
        path="dir",
    )
    corpus: str = option("wikitext2", "evaluation text: text or JSONL file, or 'wikitext2' (the bundled test split)")
    tokens: int = option(16384, "held-out tokens", min=1)
    seq_len: int = option(128, "tokens per window", min=2, max=1_000_000)
    skip_first: int = option(1, "leave out the first positions of every window (not spliced, not scored)")
    outlier: float = option(
        10.0, "leave out tokens whose norm exceeds this multiple of the median (massive activations; 0: none)"
    )
    batch_size: int = option(8, "windows per forward pass", min=1, max=100_000)
    dense: float = option(DENSE, "a feature firing on more than this fraction of tokens is dense", min=0, max=1)
    downstream: bool = option(True, "splice each dictionary in: CE loss recovered and KL (four forwards per batch)")

    def __post_init__(self) -> None:
        _check_corpus(self.corpus)
        if not 0 <= self.skip_first < self.seq_len - 1:
            raise LmscopeError(f"skip_first must lie in [0, seq_len - 1), got {self.skip_first}")
        if self.outlier < 0:
            raise LmscopeError(f"outlier must be non-negative, got {self.outlier}")
        if self.dense == 0:
            raise LmscopeError("--dense must be positive, not 0")


def run_eval(model: Model, settings: EvalSettings, out: RunWriter) -> Evaluation:
    """Evaluate dictionaries on held-out text: L0, FVU, cosine, L2 ratio, relative reconstruction bias, dead and
    dense features, feature density, and CE loss recovered and KL with each spliced into the model."""
    found = load_dictionaries(settings.dict)
    dictionaries = {name: d for name, d in found.items() if isinstance(d, Dictionary)}
    if not dictionaries:
        raise LmscopeError(
            f"{settings.dict}: no dictionary lmscope evaluates (a cross-layer transcoder is not one yet)"
        )
    windows, name = evaluation_windows(model, settings.corpus, settings.tokens, settings.seq_len)
    compute = lambda: evaluate(model, dictionaries, windows, batch_size=settings.batch_size,
                               skip_first=settings.skip_first, outlier=settings.outlier, dense=settings.dense, downstream=settings.downstream,
                               corpus=name)  # fmt: skip
    return out.part(
        "evaluation", "Evaluation", "Reconstruction, sparsity and downstream cost on held-out text.", compute
    )


TRAIN = Command("features train", TrainCommand, run_train)
EVAL = Command("features eval", EvalSettings, run_eval)

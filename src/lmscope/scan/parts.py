"""The parts of ``lmscope scan``: one :class:`Part` each in :data:`PARTS`.

A part's ``run(model, settings)`` returns a :class:`~lmscope.reports.results.Result`; the scan
saves its JSON under ``parts[name]`` in ``results.json``, its figures as PNG, and the report
draws its section from the result's text, tables and figures. Adding a part is adding an entry
to :data:`PARTS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from lmscope.circuits.commands import MAX_LENGTH, MAX_PAIRS
from lmscope.circuits.scores import PatchResult
from lmscope.core.corpus import load_corpus
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.quant.configs import parse_kv
from lmscope.quant.evaluation import QuantTable
from lmscope.quant.kv import KVNorms
from lmscope.reports.command import option
from lmscope.reports.figures import Figure
from lmscope.reports.results import ModelCard, Result, Table

KV_CONFIGS = ("fp", "k8v8", "k4v4", "k4v2", "k2v4", "k2v2")


@dataclass(frozen=True)
class ScanSettings:
    """How much data each part uses (tokens of WikiText-2 test, IOI pairs, ...)."""

    stats_tokens: int = option(16384, "WikiText-2 tokens for the outlier statistics", min=1)
    kv_tokens: int = option(4096, "tokens for the key and value norms", min=1)
    ppl_tokens: int = option(32768, "tokens for perplexity under KV quantisation", min=1)
    window: int = option(512, "tokens per window", min=2)
    kv_configs: tuple[str, ...] = option(KV_CONFIGS, "KV settings to compare (repeatable)", flag="--kv", parse=parse_kv)
    head_batch: int = option(8, "random sequences for the head roles", min=1, max=MAX_PAIRS)
    head_length: int = option(30, "length of each repeated random sequence", min=2, max=MAX_LENGTH)
    ioi_pairs: int = option(40, "IOI pairs for the circuit part", min=1, max=MAX_PAIRS)


FULL = ScanSettings()
QUICK = ScanSettings(stats_tokens=2048, kv_tokens=1024, ppl_tokens=4096, ioi_pairs=8)


@dataclass(frozen=True)
class Part:
    """One part of the scan: its key in ``results.json``, the report's section title and
    description, and what runs it."""

    name: str
    title: str
    description: str
    run: Callable[[Model, ScanSettings], Result]


# -- the parts -------------------------------------------------------------------------------


def model_card(model: Model, settings: ScanSettings) -> ModelCard:
    """The model card."""
    return ModelCard.of(model)


def outliers(model: Model, settings: ScanSettings) -> Result:
    """Outlier statistics of the residual stream on WikiText-2 (in-context protocol)."""
    from lmscope.quant.outliers import activation_stats

    corpus = load_corpus(model, "wikitext2", max_tokens=settings.stats_tokens)
    return activation_stats(model, corpus, window=min(settings.window, len(corpus))).summary(model.tokenizer)


QUANT_PROTOCOL = (
    "KV cache fake-quantised (asymmetric min/max, per token, groups of 64 channels, keys after the rotary "
    "embedding); perplexity over non-overlapping windows of WikiText-2 test"
)


@dataclass
class KeysAndValues(Result):
    """K vs V norms (activations and weights) and perplexity with the KV cache fake-quantised."""

    norms: KVNorms
    quant: QuantTable
    protocol: str = QUANT_PROTOCOL

    def to_json(self) -> dict:
        return {
            "norms": self.norms.activations.to_json(),
            "weights": self.norms.weights,
            "quant": self.quant.rows,
            "quant_protocol": self.protocol,
        }

    def tables(self) -> list[Table]:
        return [replace(table, caption=f"KV quantisation: {self.protocol}") for table in self.quant.tables()]

    def figures(self) -> list[Figure]:
        return self.norms.figures() + self.quant.figures()


def keys_and_values(model: Model, settings: ScanSettings) -> KeysAndValues:
    """K/V norms on ``kv_tokens`` tokens, perplexity under each of ``kv_configs`` on ``ppl_tokens``."""
    from lmscope.quant.configs import QuantConfig
    from lmscope.quant.evaluation import quant_table
    from lmscope.quant.kv import kv_norms

    corpus = load_corpus(model, "wikitext2", max_tokens=max(settings.kv_tokens, settings.ppl_tokens))
    small = corpus.head(settings.kv_tokens)
    norms = kv_norms(model, small, window=min(settings.window, len(small)))
    configs = [QuantConfig(parse_kv(spec)) for spec in settings.kv_configs]
    table = quant_table(model, corpus, configs, window=min(settings.window, len(corpus)))
    return KeysAndValues(norms, table)


def heads(model: Model, settings: ScanSettings) -> Result:
    """Head role scores and the loss on repeated random tokens."""
    from lmscope.circuits.head_roles import head_roles

    return head_roles(model, batch=settings.head_batch, length=settings.head_length, loss=True)


@dataclass
class IOICircuit(Result):
    """Exact patching of every head's output on ``n_pairs`` IOI pairs."""

    patching: PatchResult
    n_pairs: int

    def to_json(self) -> dict:
        r = self.patching
        return {
            "task": "ioi",
            "n_pairs": self.n_pairs,
            "metric": r.metric,
            "clean": r.clean,
            "corrupt": r.corrupt,
            "scores": r.scores[:, 0, :].tolist(),
            "top": [{k: row[k] for k in ("layer", "head", "score")} for row in r.top(10)],
        }

    def text(self) -> str:
        r = self.patching
        return f"{self.n_pairs} IOI pairs; logit difference clean {r.clean:.3f}, corrupted {r.corrupt:.3f}."

    def tables(self) -> list[Table]:
        return [Table("top heads by |score|", self.to_json()["top"])]

    def figures(self) -> list[Figure]:
        return [
            self.patching.figure(
                "circuit_ioi_heads",
                f"IOI: activation patching of each head's output (denoising, {self.n_pairs} pairs)",
                "normalised logit difference",
            )
        ]


def ioi_circuit(model: Model, settings: ScanSettings) -> IOICircuit:
    """Exact patching of every head on ``ioi_pairs`` built-in IOI pairs."""
    from lmscope.circuits.patching import activation_patching
    from lmscope.circuits.tasks import ioi

    if model.tokenizer is None:
        raise LmscopeError("the IOI circuit part needs a tokenizer")
    pairs = ioi(model, n=settings.ioi_pairs)
    return IOICircuit(activation_patching(model, pairs, component="head"), len(pairs))


def certificate(model: Model, settings: ScanSettings) -> Result:
    """``lmscope verify``'s certificate: are lmscope's hooks exact on this model?"""
    from lmscope.verify import certify

    return certify(model)


PARTS: list[Part] = [
    Part(
        "verify",
        "Correctness certificate",
        "lmscope verify: hooked logits bitwise equal to the plain forward, residual stream, lens, attention "
        "pattern, q/k/v and head outputs against hand computations, batching, KV cache, SDPA vs eager, "
        "self-patching (every number below relies on these).",
        certificate,
    ),
    Part("model", "Model", "What was loaded.", model_card),
    Part(
        "outliers",
        "Activation outliers",
        "Excess kurtosis of each hidden state over its channels, as Outlier-Safe Pre-Training computes it "
        "(per token, mean(x^4)/std(x)^4 - 3 clamped at 0, averaged over tokens), on running WikiText-2 text. "
        "Massive activations (Sun et al. 2024): |x| > 100 and > 1000 x the median |x| of the hidden state.",
        outliers,
    ),
    Part(
        "kv",
        "Keys and values",
        "Norms of the cached keys (after the rotary embedding) and values over WikiText-2 tokens, of W_k and "
        "W_v, and perplexity with the KV cache fake-quantised. KV-AdaQuant: keys have larger norms than values "
        "and need more bits.",
        keys_and_values,
    ),
    Part(
        "heads",
        "Attention heads",
        "Mean attention of each head on repeated random token sequences (R R) to the token an induction, "
        "previous-token or duplicate-token head attends to.",
        heads,
    ),
    Part(
        "circuit",
        "A circuit: indirect object identification",
        "Exact activation patching of every head's output from the clean into the corrupted run "
        "(denoising); 1 = restores the clean logit difference, 0 = no effect.",
        ioi_circuit,
    ),
]

"""The commands of this package: ``lmscope outliers``, ``kv`` and ``quant`` (settings and run)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from lmscope.core.corpus import BUNDLED, check_corpus, load_corpus
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.core.sites import parse_site
from lmscope.quant import QuantConfig
from lmscope.quant.configs import AXES, SCHEMES, QuantConfigs, parse_kv_specs, quant_configs
from lmscope.quant.evaluation import QuantTable, load_choices, quant_table
from lmscope.quant.kv import KVNorms, kv_norms
from lmscope.quant.outliers import OutlierSummary, activation_stats, residual_sites
from lmscope.quant.rotation import MODES, check
from lmscope.reports.command import Command, RunWriter, option

CORPUS_HELP = "text or JSONL file, or the bundled 'wikitext2' (test split)"
CORPUS = {"path": "file", "choices": BUNDLED}  # a corpus option's checks: a bundled name or a file
MAX_BITS = 16


@dataclass(frozen=True)
class OutliersSettings:
    """``lmscope outliers``: OSP excess kurtosis, max |x| and massive activations."""

    corpus: str = option("wikitext2", CORPUS_HELP, **CORPUS)
    tokens: int = option(4096, "number of corpus tokens", min=1)
    window: int = option(512, "tokens per window", min=1)
    osp_protocol: bool = option(False, "OSP's protocol: every token as its own sequence")
    site: tuple[str, ...] = option((), "another site to measure (repeatable)", flag="--site", parse=parse_site)

    def __post_init__(self) -> None:
        check_corpus(self.corpus)  # a bad corpus file fails before the model loads


def run_outliers(model: Model, settings: OutliersSettings, out: RunWriter) -> OutlierSummary:
    """Activation outliers: OSP excess kurtosis per hidden state, max |x|, massive activations."""
    for name in settings.site:
        model.site(name)  # unknown sites and layers fail before the corpus is read
    text = load_corpus(model, settings.corpus, max_tokens=settings.tokens)
    if not settings.osp_protocol:
        text.windows(settings.window)  # a corpus shorter than one window fails before any output
    protocol = "osp" if settings.osp_protocol else "in-context"
    sites = residual_sites(model.n_layers)
    sites += [s for s in settings.site if s not in sites]
    compute = lambda: activation_stats(model, text, sites=sites, protocol=protocol, window=settings.window).summary(
        model.tokenizer
    )
    description = f"OSP excess kurtosis, max |x| and massive activations ({protocol}, {len(text)} tokens)."
    return out.part("outliers", "Activation outliers", description, compute)


OUTLIERS = Command("outliers", OutliersSettings, run_outliers)


@dataclass(frozen=True)
class KVSettings:
    """``lmscope kv``: key vs value norms and spectra."""

    corpus: str = option("wikitext2", CORPUS_HELP, **CORPUS)
    tokens: int = option(2048, "number of corpus tokens", min=1)
    window: int = option(512, "tokens per window", min=1)

    def __post_init__(self) -> None:
        check_corpus(self.corpus)  # a bad corpus file fails before the model loads


def run_kv(model: Model, settings: KVSettings, out: RunWriter) -> KVNorms:
    """Key vs value norms and singular-value spectra per layer and KV head, and W_k / W_v norms."""
    text = load_corpus(model, settings.corpus, max_tokens=settings.tokens)
    text.windows(settings.window)  # a corpus shorter than one window fails before any output
    compute = lambda: kv_norms(model, text, window=settings.window)
    return out.part("kv", "Keys and values", f"Norms of keys and values over {len(text)} tokens.", compute)


KV = Command("kv", KVSettings, run_kv)


def _kv_specs(spec: str) -> None:
    """Check ``--kv``: at least one comma-separated setting, each ``kNvM`` or ``fp``."""
    if not parse_kv_specs(spec) or any(not part.strip() for part in spec.split(",")):
        raise LmscopeError(f"bad --kv {spec!r}: expected comma-separated settings such as k4v2,k2v4,fp")


@dataclass(frozen=True)
class QuantSettings:
    """``lmscope quant``: perplexity (and multiple-choice accuracy) under simulated quantisation."""

    kv: str = option("k8v8,k4v4,k4v2,k2v4,k2v2", "comma-separated KV settings, e.g. k4v2,k2v4,k4v4",
                     parse=_kv_specs)  # fmt: skip
    weights: int | None = option(None, "weight bits (symmetric per channel)", min=2, max=MAX_BITS)
    weight_group: int | None = option(None, "weight group size (inputs)", min=1)
    acts: int | None = option(None, "activation bits (per token, inputs of linear layers)", min=2, max=MAX_BITS)
    budget: float | None = option(None, "average KV bits: add per-layer allocations", min=2, max=8)
    group: int = option(64, "KV group size (channels per token, or tokens per channel)", min=1)
    k_axis: str = option("token", "key quantisation axis: token or channel", choices=AXES)
    v_axis: str = option("token", "value quantisation axis: token or channel", choices=AXES)
    kv_window: int = option(0, "most recent tokens kept in full precision", min=0)
    scheme: str = option("minmax", "minmax (the settings above) or osp: Outlier-Safe Pre-Training's W/A/KV setting",
                         choices=SCHEMES)  # fmt: skip
    bits: int = option(4, "--scheme osp: bits of weights, activations, keys and values", min=2, max=8)
    rotate: bool = option(False, "add each quantised setting with a Hadamard rotation fused in")
    rotation: str = option("quarot", "--rotate: quarot (residual stream, heads, MLP) or ffn (MLP only, OSP's)",
                           choices=MODES)  # fmt: skip
    corpus: str = option("wikitext2", CORPUS_HELP, **CORPUS)
    tokens: int = option(4096, "number of corpus tokens", min=1)
    window: int = option(512, "tokens per window", min=1)
    stride: int | None = option(None, "perplexity window stride (default: the window)", min=1)
    choices: Path | None = option(None, "multiple-choice JSONL: context, choices, answer", path="file")

    def __post_init__(self) -> None:
        self.kv_configs()  # bad specs fail before the model loads
        QuantConfig(scheme=self.scheme, rotation=self.rotation)
        check_corpus(self.corpus)
        if self.choices is not None:
            load_choices(self.choices)

    def kv_configs(self) -> list:
        return parse_kv_specs(self.kv, group_size=self.group, k_axis=self.k_axis, v_axis=self.v_axis,
                              window=self.kv_window)  # fmt: skip

    def plan(self, model: Model, text) -> QuantConfigs:
        """The configurations to compare, in order."""
        if self.scheme == "osp":  # OSP's setting replaces the KV / weight / activation settings
            plan = QuantConfigs([QuantConfig(), QuantConfig.osp(self.bits)])
        else:
            plan = quant_configs(
                model, self.kv_configs(), weight_bits=self.weights, weight_group=self.weight_group,
                act_bits=self.acts, budget=self.budget, corpus=text, window=self.window, group_size=self.group,
                k_axis=self.k_axis, v_axis=self.v_axis, kv_window=self.kv_window,
            )  # fmt: skip
        if self.rotate:
            plan.configs += [replace(config, rotation=self.rotation) for config in plan.configs[1:]]
        return plan


def run_quant(model: Model, settings: QuantSettings, out: RunWriter) -> QuantTable:
    """Perplexity (and multiple-choice accuracy) under simulated KV / weight / activation quantisation."""
    items = load_choices(settings.choices) if settings.choices is not None else None
    if items is not None:  # every choice fits the model, before the first part is written
        model.check_texts([item.context + choice for item in items for choice in item.choices], str(settings.choices))
    if settings.rotate:
        check(model, settings.rotation)
    text = load_corpus(model, settings.corpus, max_tokens=settings.tokens)
    text.windows(settings.window, settings.stride)  # a corpus shorter than one window fails before any output
    plan = out.part("configs", "Settings compared", "The quantisation settings and KV bit allocations.",
                    lambda: settings.plan(model, text))  # fmt: skip

    def compute() -> QuantTable:
        return quant_table(model, text, plan.configs, window=settings.window, stride=settings.stride, choices=items,
                           on_row=lambda partial: out.update("quant", partial))  # fmt: skip

    return out.part("quant", "Simulated quantisation", f"Perplexity on {len(text)} tokens per setting.", compute)


QUANT = Command("quant", QuantSettings, run_quant)

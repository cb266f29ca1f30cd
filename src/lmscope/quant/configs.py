"""The quantisation settings to compare, from short specs: KV settings such as ``k4v2,k2v4``,
weight and activation bits, and per-layer KV bit allocations for an average budget (what
``lmscope quant`` evaluates)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.quant.corpus import Corpus
from lmscope.quant.fake import KVQuant, QuantConfig, budget_kv, parse_kv
from lmscope.reports.results import Result, Table

ALLOCATION_TOKENS = 2048  # corpus tokens whose K/V norms drive the allocation from measured norms


def parse_kv_specs(specs: str | Sequence[str], **options) -> list[KVQuant]:
    """One :class:`KVQuant` per spec of a comma-separated string (``"k4v2,k2v4"``) or a list;
    ``options`` (``group_size``, ``k_axis``, ``v_axis``, ``window``) apply to each."""
    if isinstance(specs, str):
        specs = specs.split(",")
    return [parse_kv(spec, **options) for spec in specs if spec.strip()]


@dataclass
class QuantConfigs(Result):
    """The configs to evaluate, in order, without repeated names, and the per-layer (K, V) bits
    of the budget allocations with the number of tokens whose K/V norms the allocation from
    measured norms used (``allocation_tokens``; None without a budget)."""

    configs: list[QuantConfig]
    budget: float | None = None
    allocations: dict[str, dict[int, tuple]] = field(default_factory=dict)
    allocation_tokens: int | None = None

    def to_json(self) -> dict:
        """``allocations`` (config -> layer -> [K bits, V bits]) and ``allocation_tokens``, with a budget."""
        if self.budget is None:
            return {}
        allocations = {name: {str(k): list(v) for k, v in layers.items()} for name, layers in self.allocations.items()}
        return {"allocations": allocations, "allocation_tokens": self.allocation_tokens}

    def tables(self) -> list[Table]:
        """Per layer, the K and V bits of each allocation."""
        if not self.allocations:
            return []
        layers = sorted({layer for alloc in self.allocations.values() for layer in alloc})
        rows = [
            {"layer": layer, **{f"{name} K/V": "/".join(map(str, a[layer])) for name, a in self.allocations.items()}}
            for layer in layers
        ]
        return [Table(f"KV bit allocations for an average of {self.budget:g} bits", rows)]


def quant_configs(
    model: Model,
    kv: Sequence[KVQuant] = (),
    *,
    weight_bits: int | None = None,
    weight_group: int | None = None,
    act_bits: int | None = None,
    budget: float | None = None,
    corpus: Corpus | None = None,
    window: int = 512,
    group_size: int | None = 64,
    k_axis: str = "token",
    v_axis: str = "token",
    kv_window: int = 0,
) -> QuantConfigs:
    """The configs ``lmscope quant`` compares: full precision; weights/activations alone (when
    ``weight_bits`` or ``act_bits`` is set); then each KV setting of ``kv`` with those weight and
    activation settings. With a ``budget`` (average KV bits), two per-layer allocations are added
    (:func:`lmscope.quant.fake.budget_kv`): from the W_k/W_v norms, and from the K/V norms
    measured on the first :data:`ALLOCATION_TOKENS` tokens of ``corpus`` (windows of at most
    ``window``); ``group_size``, ``k_axis``, ``v_axis`` and ``kv_window`` (tokens kept in full
    precision) set up the allocations' KV quantisation as :class:`~lmscope.quant.fake.KVQuant`'s.
    A name repeated (e.g. ``fp`` with ``weights=4`` names fp-W4 twice) is kept once, first."""
    from lmscope.quant.kv import kv_stats

    kv = list(kv)
    options = {"group_size": group_size, "k_axis": k_axis, "v_axis": v_axis, "window": kv_window}
    allocation_tokens = None
    if budget is not None:
        if corpus is None:
            raise LmscopeError("a KV bit budget needs a corpus to measure the key and value norms on")
        kv.append(budget_kv(model, budget, "weights", **options))
        sample = corpus.head(ALLOCATION_TOKENS)
        summary = kv_stats(model, sample, window=min(window, ALLOCATION_TOKENS)).summary()
        allocation_tokens = summary.n_tokens
        kv.append(budget_kv(model, budget, "activations", summary, **options))
    wa = {"weight_bits": weight_bits, "weight_group": weight_group, "act_bits": act_bits}
    configs = [QuantConfig(), *([QuantConfig(**wa)] if weight_bits or act_bits else [])]
    configs += [QuantConfig(setting, **wa) for setting in kv]
    unique: dict[str, QuantConfig] = {}
    for config in configs:
        unique.setdefault(config.name, config)
    allocations = {setting.name: dict(setting.layers) for setting in kv if setting.layers} if budget is not None else {}
    return QuantConfigs(list(unique.values()), budget, allocations, allocation_tokens)

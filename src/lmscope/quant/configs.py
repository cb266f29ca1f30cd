"""Quantisation settings: what to fake-quantise and how (:class:`KVQuant` for the KV cache,
:class:`QuantConfig` for KV cache, weights and activations together), per-layer KV bit allocations
for an average budget, and the list of settings to compare from short specs (KV settings such as
``k4v2,k2v4``, weight and activation bits, budgets: what ``lmscope quant`` evaluates).
:func:`lmscope.quant.simulate.quantized` runs a model under a :class:`QuantConfig`."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.core.corpus import Corpus
from lmscope.quant.kv import KVSummary, kv_stats, weight_norms
from lmscope.quant.rotation import MODES
from lmscope.reports.results import Result, Table

ALLOCATION_TOKENS = 2048  # corpus tokens whose K/V norms drive the allocation from measured norms
AXES = ("token", "channel")

# -- one setting ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KVQuant:
    """KV-cache fake quantisation. ``None`` bits keep full precision; ``layers`` overrides
    ``(k_bits, v_bits)`` per layer; the axes, groups and full-precision window are those of
    :func:`lmscope.quant.apply.kv_attention`."""

    k_bits: int | None = None
    v_bits: int | None = None
    group_size: int | None = 64
    k_axis: str = "token"
    v_axis: str = "token"
    window: int = 0
    layers: Mapping[int, tuple[int | None, int | None]] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self):
        for b in (self.k_bits, self.v_bits, *(b for pair in self.layers.values() for b in pair)):
            if b is not None and not 1 <= b <= 8:
                raise LmscopeError(f"KV bits must be between 1 and 8, got {b}")
        for axis in (self.k_axis, self.v_axis):
            if axis not in AXES:
                raise LmscopeError(f"unknown quantisation axis {axis!r} (choose from {', '.join(AXES)})")
        if self.window < 0 or (self.group_size is not None and self.group_size < 1):
            raise LmscopeError("window must be >= 0 and group size >= 1")

    def bits(self, layer: int) -> tuple[int | None, int | None]:
        """``(k_bits, v_bits)`` of ``layer``."""
        return self.layers.get(layer, (self.k_bits, self.v_bits))

    @property
    def name(self) -> str:
        """The row name: ``K4V2``, ``fp``, or the label of a per-layer allocation (``mixed``)."""
        if self.layers:
            return self.label or "mixed"
        if self.k_bits is None and self.v_bits is None:
            return "fp"
        return f"K{self.k_bits or 'fp'}V{self.v_bits or 'fp'}"


_KV_SPEC = re.compile(r"^k(\d|fp)v(\d|fp)$")


def parse_kv(spec: str, **options) -> KVQuant:
    """``"k4v2"`` -> KVQuant(4, 2); ``"fp"`` (or ``"fp16"``, ``"none"``) -> full precision."""
    text = spec.strip().lower()
    if text in ("fp", "fp16", "fp32", "none", "full"):
        return KVQuant(**options)
    match = _KV_SPEC.match(text)
    if not match:
        raise LmscopeError(f"bad KV quantisation {spec!r}: expected e.g. k4v2, k8v8 or fp")
    k, v = (None if b == "fp" else int(b) for b in match.groups())
    return KVQuant(k, v, **options)


SCHEMES = ("minmax", "osp")
_ROTATION_NAMES = {"quarot": "+QuaRot", "ffn": "+FFN-Had"}  # row-name suffixes of the rotation modes


@dataclass(frozen=True)
class QuantConfig:
    """A full simulated-quantisation setting: KV cache, weights and activations (None = off).

    ``scheme``: ``"minmax"`` (the min/max and round-to-nearest quantisers of :mod:`lmscope.quant.kernels`) or ``"osp"`` (Outlier-Safe Pre-Training's
    W/A/KV setting, :mod:`lmscope.quant.osp`: weight, activation and K/V bits from ``weight_bits``,
    ``act_bits`` and ``kv``, the rest of the scheme fixed). ``rotation``: ``"quarot"`` or ``"ffn"``
    fuses that Hadamard rotation (:func:`lmscope.quant.rotation.rotated`, signs from ``seed``)
    into the model before quantising."""

    kv: KVQuant = field(default_factory=KVQuant)
    weight_bits: int | None = None
    weight_group: int | None = None
    act_bits: int | None = None
    act_group: int | None = None
    scheme: str = "minmax"
    rotation: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise LmscopeError(f"unknown quantisation scheme {self.scheme!r} (choose from {', '.join(SCHEMES)})")
        if self.rotation is not None and self.rotation not in MODES:
            raise LmscopeError(f"unknown rotation {self.rotation!r} (choose from {', '.join(MODES)})")

    @classmethod
    def osp(cls, bits: int = 4, *, rotation: str | None = None, seed: int = 0) -> QuantConfig:
        """OSP's W``bits``A``bits``KV``bits`` (its W4A4KV4 at 4), optionally with a rotation."""
        if not 2 <= bits <= 8:
            raise LmscopeError(f"OSP quantisation bits must be between 2 and 8, got {bits}")
        kv = KVQuant(bits, bits, group_size=128)  # keys per token in groups of 128 (values per head)
        return cls(kv, weight_bits=bits, act_bits=bits, scheme="osp", rotation=rotation, seed=seed)

    @property
    def name(self) -> str:
        """The row name: ``K4V2-W4-A8`` (min/max) or ``W4A4KV4`` (OSP), then the rotation's suffix."""
        if self.scheme == "osp":
            k, v = self.kv.k_bits, self.kv.v_bits
            kv = f"KV{k or 'fp'}" if k == v else f"K{k or 'fp'}V{v or 'fp'}"
            parts = [f"W{self.weight_bits or 'fp'}A{self.act_bits or 'fp'}{kv}"]
        else:
            parts = [self.kv.name]
            if self.weight_bits:
                parts.append(f"W{self.weight_bits}")
            if self.act_bits:
                parts.append(f"A{self.act_bits}")
        return "-".join(parts) + _ROTATION_NAMES.get(self.rotation, "")


def osp_w4a4kv4(rotation: str | None = None, seed: int = 0) -> QuantConfig:
    """Outlier-Safe Pre-Training's 4-bit setting W4A4KV4 (:mod:`lmscope.quant.osp`), "with
    Hadamard rotation" when ``rotation`` is ``"quarot"`` (or OSP's ``"ffn"``)."""
    return QuantConfig.osp(4, rotation=rotation, seed=seed)


# -- bit allocation -------------------------------------------------------------------------


def allocate_kv_bits(
    k_scales: list[float], v_scales: list[float], budget: float, *, min_bits: int = 1, max_bits: int = 8
) -> list[tuple[int, int]]:
    """Per-layer ``(k_bits, v_bits)`` with average ``budget`` bits over all 2L tensors that
    minimise the summed error model ``sum s^2 * 2^(-2b)`` (KV-AdaQuant's allocation, with s a
    norm of the layer's keys or values, or of W_k / W_v).

    Greedy: start every tensor at ``min_bits`` and give one bit at a time to the tensor whose
    error drops most (``0.75 * s^2 * 2^(-2b)``); since each tensor's gain shrinks with every
    bit, the greedy choice is optimal for this separable convex model.
    """
    n = len(k_scales)
    if len(v_scales) != n or n == 0:
        raise LmscopeError("need one key and one value scale per layer")
    if not min_bits <= budget <= max_bits:
        raise LmscopeError(f"budget {budget} must lie between {min_bits} and {max_bits} bits")
    scales = [float(s) ** 2 for s in (*k_scales, *v_scales)]
    bits = [min_bits] * (2 * n)
    for _ in range(round(budget * 2 * n) - min_bits * 2 * n):
        gains = [s * 0.75 * 4.0 ** (-b) if b < max_bits else -1.0 for s, b in zip(scales, bits)]
        best = max(range(2 * n), key=gains.__getitem__)
        bits[best] += 1
    return list(zip(bits[:n], bits[n:]))


def budget_kv(
    model: Model,
    budget: float,
    source: str = "weights",
    kv_summary: KVSummary | None = None,
    min_bits: int = 2,
    **options,
) -> KVQuant:
    """A per-layer KV configuration from :func:`allocate_kv_bits` for an average of ``budget``
    bits (at least ``min_bits`` per tensor: 1-bit keys or values break most models), with scales
    the Frobenius norms of W_k/W_v (``source="weights"``) or of the measured
    keys/values (``source="activations"``, from :meth:`lmscope.quant.kv.KVStats.summary`)."""
    if source == "weights":
        norms = weight_norms(model)
        k, v = norms["k"]["frobenius"], norms["v"]["frobenius"]
    elif source == "activations" and kv_summary is not None:
        k, v = kv_summary.keys["frobenius"], kv_summary.values["frobenius"]
    else:
        raise LmscopeError("budget allocation needs source='weights' or source='activations' with a KV summary")
    allocation = allocate_kv_bits(k, v, budget, min_bits=min_bits)
    return KVQuant(layers=dict(enumerate(allocation)), label=f"alloc-{source}-{budget:g}b", **options)


# -- the settings to compare ----------------------------------------------------------------


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
    (:func:`budget_kv`): from the W_k/W_v norms, and from the K/V norms
    measured on the first :data:`ALLOCATION_TOKENS` tokens of ``corpus`` (windows of at most
    ``window``); ``group_size``, ``k_axis``, ``v_axis`` and ``kv_window`` (tokens kept in full
    precision) set up the allocations' KV quantisation as :class:`KVQuant`'s.
    A name repeated (e.g. ``fp`` with ``weights=4`` names fp-W4 twice) is kept once, first."""
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

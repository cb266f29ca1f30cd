"""Simulated quantisation: fake-quantise the KV cache, weights and activations of a model.

Fake quantisation rounds a tensor to a b-bit grid and maps it straight back to floats, so a
normal forward pass shows what the quantised model would compute:

- **asymmetric min/max** (KV cache, activations), per group of ``g`` consecutive elements
  along the quantisation axis: ``scale = (max - min) / (2^b - 1)``,
  ``q = clamp(round((x - min) / scale), 0, 2^b - 1)``, ``x' = q * scale + min``;
- **symmetric round-to-nearest** (weights), per output channel (and group of ``g`` inputs):
  ``scale = max|w| / (2^(b-1) - 1)``, ``q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1)``,
  ``w' = q * scale``.

The KV cache is simulated on the keys (after the rotary embedding, as the cache stores them)
and values of every layer, through the attention replacement of :class:`~lmscope.core.hooks.HookSession`.
Per token (``axis="token"``), each token's channels form groups of ``group_size`` (KIVI's
value quantisation; a group of 64 is one head of SmolLM2); per channel (``axis="channel"``),
each channel is quantised over groups of ``group_size`` consecutive tokens (KIVI's key
quantisation, Liu et al. 2024), and a query sees the tokens of a group that is not complete
yet in full precision, as KIVI's cache holds them (so no statistic sees a later token). With
``window = w > 0`` each query attends to the ``w`` most recent keys and values (itself
included) in full precision and to older ones quantised, as a cache with a full-precision
residual window does. Both are exact: attention runs over the concatenation [quantised; full
precision] of the keys and values with a mask that picks one copy of each.

Weights: every linear layer inside the transformer blocks (not embeddings, not the
unembedding). Activations: the inputs of those layers, per token, asymmetric.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lmscope.core.errors import LmscopeError
from lmscope.core.hookpoints import point_modules
from lmscope.core.hooks import Hook, hooked
from lmscope.core.model import Model
from lmscope.core.weights import transformed
from lmscope.quant.rotation import MODES, rotated

if TYPE_CHECKING:
    from lmscope.quant.kv import KVSummary

AXES = ("token", "channel")


def fake_quant_asym(x: Tensor, bits: int, dim: int = -1, group_size: int | None = None) -> Tensor:
    """Asymmetric min/max fake quantisation of ``x`` (any shape) with statistics over groups of
    ``group_size`` consecutive elements along ``dim`` (the whole axis if None)."""
    return _grouped(x, dim, group_size, lambda g: _asym(g, bits))


def fake_quant_sym(x: Tensor, bits: int, dim: int = -1, group_size: int | None = None) -> Tensor:
    """Symmetric round-to-nearest fake quantisation over groups along ``dim`` (as above)."""
    if bits < 2:
        raise LmscopeError("symmetric quantisation needs at least 2 bits")
    return _grouped(x, dim, group_size, lambda g: _sym(g, bits))


def _asym(g: Tensor, bits: int) -> Tensor:
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp(min=torch.finfo(g.dtype).tiny)
    return ((g - lo) / scale).round().clamp(0, levels) * scale + lo


def _sym(g: Tensor, bits: int) -> Tensor:
    qmax = 2 ** (bits - 1) - 1
    scale = (g.abs().amax(-1, keepdim=True) / qmax).clamp(min=torch.finfo(g.dtype).tiny)
    return (g / scale).round().clamp(-qmax - 1, qmax) * scale


def _grouped(x: Tensor, dim: int, group_size: int | None, fn) -> Tensor:
    """Apply ``fn`` to groups [..., n_groups, group_size] along ``dim``; a last partial group is
    padded by repeating its last element (which changes neither min nor max). The arithmetic
    runs in float32 (at least) whatever ``x``'s dtype; the result has ``x``'s dtype."""
    moved = x.movedim(dim, -1).to(torch.promote_types(x.dtype, torch.float32))
    n = moved.shape[-1]
    g = group_size or n
    pad = (-n) % g
    if pad:
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], -1)
    out = fn(moved.unflatten(-1, (-1, g))).flatten(-2)[..., :n]
    return out.movedim(-1, dim).to(x.dtype)


# -- configurations -----------------------------------------------------------------------


@dataclass(frozen=True)
class KVQuant:
    """KV-cache fake quantisation. ``None`` bits keep full precision; ``layers`` overrides
    ``(k_bits, v_bits)`` per layer."""

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


# -- KV cache -------------------------------------------------------------------------------


def _quant_kv(x: Tensor, bits: int | None, axis: str, group_size: int | None) -> Tensor:
    """Fake-quantise keys or values [batch, n_kv_heads, pos, d_head] along ``axis``."""
    if bits is None:
        return x
    if axis == "token":  # each token's channels, all heads side by side, in groups
        flat = x.transpose(1, 2).flatten(2)
        return fake_quant_asym(flat, bits, -1, group_size).unflatten(-1, x.shape[1:2] + x.shape[3:]).transpose(1, 2)
    return fake_quant_asym(x, bits, 2, group_size)  # each channel over groups of tokens


def kv_attention(config: KVQuant):
    """An attention replacement (for :meth:`Model.hooks`) that attends to fake-quantised keys
    and values as ``config`` describes."""
    channel = "channel" in (config.k_axis, config.v_axis)

    def attention(module, base, query, key, value, attention_mask, **kwargs):
        k_bits, v_bits = config.bits(module.layer_idx)
        qk = _quant_kv(key, k_bits, config.k_axis, config.group_size)
        qv = _quant_kv(value, v_bits, config.v_axis, config.group_size)
        if (config.window == 0 and not channel) or (k_bits is None and v_bits is None):
            return base(module, query, qk, qv, attention_mask, **kwargs)
        group = (config.group_size or key.shape[2]) if channel else None
        mask = _recent_mask(attention_mask, query.shape[2], key.shape[2], config.window, group, query.device)
        return base(module, query, torch.cat([qk, key], 2), torch.cat([qv, value], 2), mask, **kwargs)

    return attention


def _recent_mask(mask: Tensor | None, n_q: int, n_k: int, window: int, group: int | None, device) -> Tensor:
    """Mask over [quantised keys; full-precision keys] [batch|1, 1, n_q, 2 n_k]: query i sees the
    full-precision copy of key j when j is among the ``window`` most recent (i - j < window) or,
    with per-channel groups of ``group`` tokens, when j's group is not complete at i (KIVI keeps
    such tokens in full precision, and a group's statistics must not see tokens after i); else
    the quantised copy. Only keys the model's own ``mask`` allows (causal if None) are seen."""
    i = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    j = torch.arange(n_k, device=device)[None, :]
    recent = (i - j) < window
    if group is not None:
        recent = recent | (j >= (i + 1) // group * group)
    if mask is None:
        allowed = (j <= i)[None, None]
    elif mask.dtype == torch.bool:
        allowed = mask[..., :n_k]
    else:
        allowed = mask[..., :n_k] == 0
    both = torch.cat([allowed & ~recent, allowed & recent], -1)
    if mask is None or mask.dtype == torch.bool:
        return both
    return torch.zeros(both.shape, dtype=mask.dtype, device=device).masked_fill(~both, torch.finfo(mask.dtype).min)


# -- weights and activations ----------------------------------------------------------------


def block_linears(model: Model) -> list[nn.Module]:
    """The linear layers inside the transformer blocks (``nn.Linear`` or GPT-2's ``Conv1D``)."""
    return [m for layer in range(model.n_layers) for m in point_modules(model, "linears.in", layer)]


@contextlib.contextmanager
def quantized_weights(
    model: Model, bits: int, group_size: int | None = None, quantiser: Callable[..., Tensor] = fake_quant_sym
) -> Iterator[None]:
    """Fake-quantise the block linear weights (symmetric, per output channel, groups of
    ``group_size`` inputs; ``quantiser(w, bits, in_dim, group_size)``, :func:`fake_quant_sym` or
    :func:`lmscope.quant.osp.fake_quant_sym_mse`): in place, the originals restored on exit (also
    after an error); weights accelerate has offloaded to the CPU or disk are quantised as each
    forward loads them (:func:`lmscope.core.weights.transformed`)."""
    with contextlib.ExitStack() as stack:
        for linear in block_linears(model):
            in_dim = 0 if type(linear).__name__ == "Conv1D" else 1  # Conv1D stores [in, out]
            quantize = lambda w, d=in_dim: quantiser(w, bits, d, group_size)
            stack.enter_context(transformed(linear, quantize))
        yield


def quantized_activations(model: Model, bits: int, group_size: int | None = None) -> contextlib.AbstractContextManager:
    """Fake-quantise the inputs of the block linear layers per token (asymmetric), inside the
    returned context."""
    quantise = lambda x: fake_quant_asym(x, bits, -1, group_size)
    return hooked(model, [Hook("linears.in", layer, quantise) for layer in range(model.n_layers)])


SCHEMES = ("minmax", "osp")
_ROTATION_NAMES = {"quarot": "+QuaRot", "ffn": "+FFN-Had"}  # row-name suffixes of the rotation modes


@dataclass(frozen=True)
class QuantConfig:
    """A full simulated-quantisation setting: KV cache, weights and activations (None = off).

    ``scheme``: ``"minmax"`` (this module's quantisers) or ``"osp"`` (Outlier-Safe Pre-Training's
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


@contextlib.contextmanager
def quantized(model: Model, config: QuantConfig) -> Iterator[None]:
    """Run forwards of ``model`` under ``config`` inside this context (the rotation first, then the
    quantisation); everything is undone on exit."""
    with contextlib.ExitStack() as stack:
        if config.rotation is not None:
            stack.enter_context(rotated(model, config.seed, config.rotation))
        if config.scheme == "osp":
            from lmscope.quant.osp import osp_quantized  # osp builds on this module

            kv = config.kv
            bits = (config.weight_bits, config.act_bits, kv.k_bits, kv.v_bits)
            stack.enter_context(osp_quantized(model, *bits, k_group=kv.group_size))
        else:
            if config.weight_bits:
                stack.enter_context(quantized_weights(model, config.weight_bits, config.weight_group))
            if config.act_bits:
                stack.enter_context(quantized_activations(model, config.act_bits, config.act_group))
            if config.kv.k_bits is not None or config.kv.v_bits is not None or config.kv.layers:
                stack.enter_context(model.hooks(attention=kv_attention(config.kv)))
        yield


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
    bits (at least ``min_bits`` per tensor: 1-bit keys or values break most models), with scales the Frobenius norms of W_k/W_v (``source="weights"``) or of the measured
    keys/values (``source="activations"``, from :meth:`lmscope.quant.kv.KVStats.summary`)."""
    from lmscope.quant.kv import weight_norms

    if source == "weights":
        norms = weight_norms(model)
        k, v = norms["k"]["frobenius"], norms["v"]["frobenius"]
    elif source == "activations" and kv_summary is not None:
        k, v = kv_summary.keys["frobenius"], kv_summary.values["frobenius"]
    else:
        raise LmscopeError("budget allocation needs source='weights' or source='activations' with a KV summary")
    allocation = allocate_kv_bits(k, v, budget, min_bits=min_bits)
    return KVQuant(layers=dict(enumerate(allocation)), label=f"alloc-{source}-{budget:g}b", **options)

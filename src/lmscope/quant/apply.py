"""Apply fake quantisation (:mod:`lmscope.quant.kernels`) to a model: its KV cache, the weights
of its block linear layers and their inputs, inside context managers that undo everything on exit.

The KV cache is simulated on the keys (after the rotary embedding, as the cache stores them)
and values of every layer, through the attention replacement of :class:`~lmscope.core.hooks.HookSession`
(:func:`kv_attention`), asymmetric min/max. Per token (``axis="token"``), each token's channels
form groups of ``group_size`` (KIVI's value quantisation; a group of 64 is one head of SmolLM2);
per channel (``axis="channel"``), each channel is quantised over groups of ``group_size``
consecutive tokens (KIVI's key quantisation, Liu et al. 2024), and a query sees the tokens of a
group that is not complete yet in full precision, as KIVI's cache holds them (so no statistic
sees a later token). With ``window = w > 0`` each query attends to the ``w`` most recent keys and
values (itself included) in full precision and to older ones quantised, as a cache with a
full-precision residual window does. Both are exact: attention runs over the concatenation
[quantised; full precision] of the keys and values with a mask that picks one copy of each.

Weights (:func:`quantized_weights`): every linear layer inside the transformer blocks (not
embeddings, not the unembedding), symmetric round-to-nearest per output channel. Activations
(:func:`quantized_activations`): the inputs of those layers, per token, asymmetric.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from lmscope.core.hookpoints import point_modules
from lmscope.core.hooks import Hook, hooked
from lmscope.core.model import Model
from lmscope.core.modules import is_conv1d
from lmscope.core.weights import transformed
from lmscope.quant.configs import KVQuant
from lmscope.quant.kernels import fake_quant_asym, fake_quant_sym

# -- KV cache -------------------------------------------------------------------------------


def _quant_kv(x: Tensor, bits: int | None, axis: str, group_size: int | None) -> Tensor:
    """Fake-quantise keys or values [batch, n_kv_heads, pos, d_head] along ``axis``."""
    if bits is None:
        return x
    if axis == "token":  # each token's channels, all heads side by side, in groups
        flat = x.transpose(1, 2).flatten(2)
        return fake_quant_asym(flat, bits, -1, group_size).unflatten(-1, x.shape[1:2] + x.shape[3:]).transpose(1, 2)
    return fake_quant_asym(x, bits, 2, group_size)  # each channel over groups of tokens


def kv_attention(config: KVQuant) -> Callable:
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
    :func:`~lmscope.quant.kernels.fake_quant_sym_mse`): in place, the originals restored on exit (also
    after an error); weights accelerate has offloaded to the CPU or disk are quantised as each
    forward loads them (:func:`lmscope.core.weights.transformed`)."""
    with contextlib.ExitStack() as stack:
        for linear in block_linears(model):
            in_dim = 0 if is_conv1d(linear) else 1  # Conv1D stores [in, out]
            quantize = lambda w, d=in_dim: quantiser(w, bits, d, group_size)
            stack.enter_context(transformed(linear, quantize))
        yield


def quantized_activations(model: Model, bits: int, group_size: int | None = None) -> contextlib.AbstractContextManager:
    """Fake-quantise the inputs of the block linear layers per token (asymmetric), inside the
    returned context."""
    quantise = lambda x: fake_quant_asym(x, bits, -1, group_size)
    return hooked(model, [Hook("linears.in", layer, quantise) for layer in range(model.n_layers)])

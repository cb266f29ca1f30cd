"""The 4-bit setting of Outlier-Safe Pre-Training's evaluation (Park et al. 2025, arXiv 2506.19697),
W4A4KV4, as its code runs it (dmis-lab/Outlier-Safe-Pre-Training ``scripts/1_eval_ppl_rtn.sh``:
``--w_bits 4 --a_bits 4 --k_bits 4 --v_bits 4 --w_clip --w_rtn --a_asym --k_asym --v_asym
--k_groupsize 128 --v_groupsize 128``; its quantisers are QuaRot's, spcl/QuaRot ``fake_quant``):

- **weights**: every linear layer of the blocks (not the embedding, not the unembedding),
  symmetric round-to-nearest per output channel, the clipping range chosen by GPTQ's MSE search
  (:func:`lmscope.quant.kernels.fake_quant_sym_mse`);
- **activations**: the inputs of those layers, asymmetric per token (QuaRot's ``ActQuantizer``,
  :func:`lmscope.quant.kernels.fake_quant_zero_point`); the attention output projection's input
  in groups of one head (``o_proj``: ``groupsize = head_dim``); the unembedding's input in full
  precision;
- **keys**, after the rotary embedding: queries and keys both rotated per head by the Hadamard
  matrix of order d_head (``QKRotationWrapper``, applied whenever keys are quantised, with or
  without :mod:`lmscope.quant.rotation`), then asymmetric per token in groups of 128 channels of
  the token's concatenated heads (``--k_groupsize 128``: one head at OSP's d_head = 128);
- **values**: asymmetric per token per head (the value projection's output quantiser with
  ``groupsize = head_dim``).

Inside :func:`osp_quantized` every forward of the model runs so. With a rotation of
:mod:`lmscope.quant.rotation` fused first (``QuantConfig.osp(rotation=...)``) it is the setting
"with Hadamard rotation". OSP's README evaluates two: "+ FFN Had", the Hadamard on the MLP's
hidden states only (``scripts/2_eval_ppl_rtn_had.sh``, ``--rotate_down_proj``: rotation
``"ffn"``), and "+ QuaRot", the full rotation (``scripts/4_eval_ppl_quarot.sh``, ``--rotate``,
with GPTQ weights there: rotation ``"quarot"``, with round-to-nearest weights here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.hookpoints import point_modules
from lmscope.core.hooks import Hook, hooked
from lmscope.core.model import Model
from lmscope.quant.apply import quantized_weights
from lmscope.quant.hadamard import hadamard
from lmscope.quant.kernels import fake_quant_sym_mse, fake_quant_zero_point

K_GROUP = 128  # OSP's --k_groupsize


def osp_activations(model: Model, bits: int) -> contextlib.AbstractContextManager:
    """Block linear inputs per token (0 in range), the output projection's per head (groups of
    d_head, QuaRot's grouped path), asymmetric."""
    per_token = lambda x: fake_quant_zero_point(x, bits, -1)
    hooks = []
    for layer in range(model.n_layers):
        o_proj = point_modules(model, "attn.z", layer)
        d_head = model.d_head_of(layer)
        per_head = lambda x, d=d_head: fake_quant_zero_point(x, bits, -1, d, include_zero=False)
        for linear in point_modules(model, "linears.in", layer):
            fn = per_head if any(linear is o for o in o_proj) else per_token
            hooks.append(Hook("linears.in", layer, fn, modules=(linear,)))
    return hooked(model, hooks)


def osp_kv_attention(k_bits: int | None, v_bits: int | None, k_group: int | None = K_GROUP) -> Callable:
    """An attention replacement (for :meth:`Model.hooks`): queries and keys [batch, heads, pos,
    d_head] rotated by the Hadamard matrix of order d_head, keys quantised per token in groups
    of ``k_group`` channels of the concatenated heads (0 in range), values per token per head."""
    cast: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}

    def rotate(x: Tensor) -> Tensor:
        key = (x.shape[-1], x.dtype, x.device)
        if key not in cast:
            cast[key] = hadamard(x.shape[-1]).to(dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        h = cast[key]
        return (x.to(h.dtype) @ h).to(x.dtype)

    def attention(module, base, query, key, value, attention_mask, **kwargs):
        if k_bits is not None:
            query, key = rotate(query), rotate(key)
            flat = key.transpose(1, 2).flatten(2)  # [batch, pos, kv_heads * d_head]
            flat = fake_quant_zero_point(flat, k_bits, -1, k_group)
            key = flat.unflatten(-1, key.shape[1:2] + key.shape[3:]).transpose(1, 2)
        if v_bits is not None:
            value = fake_quant_zero_point(value, v_bits, -1, include_zero=False)
        return base(module, query, key, value, attention_mask, **kwargs)

    return attention


@contextlib.contextmanager
def osp_quantized(
    model: Model,
    weight_bits: int | None = 4,
    act_bits: int | None = 4,
    k_bits: int | None = 4,
    v_bits: int | None = 4,
    k_group: int | None = K_GROUP,
) -> Iterator[None]:
    """Run forwards of ``model`` in OSP's W/A/KV setting (module docstring; None bits: full
    precision) inside this context; everything is undone on exit."""
    for bits in (weight_bits, act_bits, k_bits, v_bits):
        if bits is not None and not 2 <= bits <= 8:
            raise LmscopeError(f"OSP quantisation bits must be between 2 and 8, got {bits}")
    with contextlib.ExitStack() as stack:
        if weight_bits is not None:  # per output channel, MSE-clipped
            stack.enter_context(quantized_weights(model, weight_bits, quantiser=fake_quant_sym_mse))
        if act_bits is not None:
            stack.enter_context(osp_activations(model, act_bits))
        if k_bits is not None or v_bits is not None:
            stack.enter_context(model.hooks(attention=osp_kv_attention(k_bits, v_bits, k_group)))
        yield

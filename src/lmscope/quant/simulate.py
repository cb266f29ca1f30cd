"""Run a model under a :class:`~lmscope.quant.configs.QuantConfig`: its Hadamard rotation
(:mod:`lmscope.quant.rotation`) fused first, then its scheme's fake quantisation, min/max
(:mod:`lmscope.quant.apply`) or Outlier-Safe Pre-Training's (:mod:`lmscope.quant.osp`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from lmscope.core.model import Model
from lmscope.quant.apply import kv_attention, quantized_activations, quantized_weights
from lmscope.quant.configs import QuantConfig
from lmscope.quant.osp import osp_quantized
from lmscope.quant.rotation import rotated


@contextlib.contextmanager
def quantized(model: Model, config: QuantConfig) -> Iterator[None]:
    """Run forwards of ``model`` under ``config`` inside this context (the rotation first, then the
    quantisation); everything is undone on exit."""
    with contextlib.ExitStack() as stack:
        if config.rotation is not None:
            stack.enter_context(rotated(model, config.seed, config.rotation))
        if config.scheme == "osp":
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

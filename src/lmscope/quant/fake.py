"""Deprecated: the old home of simulated quantisation, kept for one release. Import from
:mod:`lmscope.quant.kernels` (quantisers), :mod:`lmscope.quant.configs` (settings, bit
allocation), :mod:`lmscope.quant.apply` (weights, activations, KV attention) and
:mod:`lmscope.quant.simulate` (:func:`~lmscope.quant.simulate.quantized`), or from
:mod:`lmscope.quant`."""

from lmscope.quant.apply import block_linears, kv_attention, quantized_activations, quantized_weights
from lmscope.quant.configs import (
    AXES,
    SCHEMES,
    KVQuant,
    QuantConfig,
    allocate_kv_bits,
    budget_kv,
    osp_w4a4kv4,
    parse_kv,
)
from lmscope.quant.kernels import fake_quant_asym, fake_quant_sym
from lmscope.quant.simulate import quantized

__all__ = [
    "AXES",
    "SCHEMES",
    "KVQuant",
    "QuantConfig",
    "allocate_kv_bits",
    "block_linears",
    "budget_kv",
    "fake_quant_asym",
    "fake_quant_sym",
    "kv_attention",
    "osp_w4a4kv4",
    "parse_kv",
    "quantized",
    "quantized_activations",
    "quantized_weights",
]

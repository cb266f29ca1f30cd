"""Is this model quantisation-friendly: corpora, streaming activation statistics (outliers), key
and value norms, simulated quantisation (quantisers :mod:`lmscope.quant.kernels`, settings
:mod:`lmscope.quant.configs`, application :mod:`lmscope.quant.apply` and
:mod:`lmscope.quant.simulate`) and evaluation under it."""

from lmscope.quant.apply import kv_attention, quantized_activations, quantized_weights
from lmscope.quant.configs import AXES, KVQuant, QuantConfig, allocate_kv_bits, budget_kv, parse_kv
from lmscope.quant.kernels import fake_quant_asym, fake_quant_sym
from lmscope.quant.simulate import quantized

__all__ = [
    "AXES",
    "KVQuant",
    "QuantConfig",
    "allocate_kv_bits",
    "budget_kv",
    "fake_quant_asym",
    "fake_quant_sym",
    "kv_attention",
    "parse_kv",
    "quantized",
    "quantized_activations",
    "quantized_weights",
]

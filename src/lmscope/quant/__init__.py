"""Is this model quantisation-friendly: corpora, streaming activation statistics (outliers), key
and value norms, simulated quantisation (:mod:`lmscope.quant.fake`) and evaluation under it."""

from lmscope.quant.fake import (
    AXES,
    KVQuant,
    QuantConfig,
    allocate_kv_bits,
    budget_kv,
    fake_quant_asym,
    fake_quant_sym,
    kv_attention,
    parse_kv,
    quantized,
    quantized_activations,
    quantized_weights,
)

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

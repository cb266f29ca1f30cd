"""Tiny random models of every family in lmscope's table, from transformers config classes (no
download): the family matrix of ``lmscope verify`` (tests/verify, scripts/family_matrix.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import lmscope

# Sizes set on every config that has the attribute (directly or through its attribute_map).
SMALL = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "moe_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "shared_expert_intermediate_size": 32,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "n_group": 2,
    "topk_group": 1,
    "sliding_window": 5,
    "ffn_hidden_size": 96,
    "n_positions": 64,
    "n_ctx": 64,
    "rotary_dim": 8,
    "word_embed_proj_dim": 64,
}
# Per family: sizes left at the config's own value (they are derived from others) or extra settings.
_MLA = {"head_dim": 8, "num_key_value_heads": 4}  # latent attention: the rotary part of q/k; k/v per head
_MUP = {"residual_multiplier": 0.5, "embedding_multiplier": 4.0, "logits_scaling": 2.0}  # not the no-op 1s
# Hybrid layers: linear attention (gated delta rule, small heads) around a full-attention layer.
_HYBRID = {
    "layer_types": ["linear_attention", "full_attention", "linear_attention"],
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
}
KEEP: dict[str, set] = {}
EXTRA: dict[str, dict] = {
    "deepseek_v2": _MLA,
    "deepseek_v3": _MLA,
    "minicpm3": _MLA,  # scale_emb, scale_depth, dim_model_base stay MiniCPM3-4B's (12, 1.4, 256)
    "granite": _MUP,
    "granitemoe": _MUP,
    "granitemoeshared": _MUP,
    "hyperclovax": _MUP,
    "qwen2_moe": {"mlp_only_layers": [0]},  # a dense layer among MoE layers
    "qwen3_5_text": _HYBRID,
    "qwen3_5_moe_text": _HYBRID,
    "gemma4_text": {"num_hidden_layers": 5},
}
# Per family: constructor arguments (sub-configs, and what __post_init__ copies into them: DBRX's
# ffn_config.hidden_size is set from d_model there).
INIT: dict[str, dict] = {
    "dbrx": {
        "d_model": 64,
        # clip_qkv small enough that q/k/v are clamped; rope_theta is read (not used) by DbrxAttention
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 0.5, "rope_theta": 10000.0},
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
    },
    # Gemma 4: sliding-window layers (head_dim 16, 2 KV heads) and full-attention layers with larger
    # heads (32), one KV head and values equal to keys; the last two layers reuse the keys and values
    # of the last earlier layer of their kind (3 <- 2, 4 <- 1); a per-layer input branch of width 8.
    # Per-layer sizes are resolved at construction, so they are given here.
    "gemma4_text": {
        "num_hidden_layers": 5,
        "layer_types": [
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
        ],
        "global_head_dim": 32,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "num_kv_shared_layers": 2,
        "hidden_size_per_layer_input": 8,
        "vocab_size_per_layer_input": 96,
    },
}


def _random_layer_scalars(hf) -> None:
    """Gemma 4: each layer's output scale (``layer_scalar``, initialised to the no-op 1) drawn from [0.5, 1.5]."""
    for layer in hf.model.layers:
        layer.layer_scalar.uniform_(0.5, 1.5)


# Per family: changes to the constructed model (values its initialisation leaves at a no-op).
TWEAK: dict[str, Callable] = {"gemma4_text": _random_layer_scalars}


def _has(config, key: str) -> bool:
    """Whether ``config`` has attribute ``key`` (directly or through its attribute_map); a
    heterogeneous config (Gemma 4) refuses to read its per-layer attributes globally, but has them."""
    try:
        return hasattr(config, key) or key in getattr(config, "attribute_map", {})
    except RuntimeError:
        return key in (config.per_layer_attributes or ())


def tiny_config(model_type: str):
    """A small config of ``model_type`` (3 layers, d_model 64, 4 heads, 4 experts where MoE)."""
    extra = EXTRA.get(model_type, {})
    config = CONFIG_MAPPING[model_type](**INIT.get(model_type, {}))
    keep = KEEP.get(model_type, set())
    for key, value in {**SMALL, **extra}.items():
        if key in keep:
            continue
        if _has(config, key):
            try:
                setattr(config, key, value)
            except (AttributeError, ValueError, TypeError):
                pass
    if isinstance(getattr(config, "layer_types", None), list):  # derived at init for the default depth
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    return config


def tiny_family_model(model_type: str, seed: int = 0) -> lmscope.Model:
    """A random model of ``model_type``; weights scaled up so attention and routing are not flat."""
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim >= 2:
                p.mul_(3.0)
        if model_type in TWEAK:
            TWEAK[model_type](hf)
    return lmscope.Model(hf, tokenizer=None, source=f"tiny {model_type}", name=f"tiny-{model_type}")


def table_families() -> list[str]:
    """Every ``model_type`` in lmscope's family table."""
    from lmscope.core.families import FAMILIES

    return sorted(FAMILIES)


MATRIX_START, MATRIX_END = "<!-- family-matrix:start -->", "<!-- family-matrix:end -->"


def render_matrix(certificates: dict) -> str:
    """The family matrix of docs/models.md: one row per family (``lmscope verify`` on its tiny model, each
    check's result), then the families left out with the reason."""
    from lmscope.core.families import FAMILIES, LEFT_OUT
    from lmscope.verify import CHECKS

    mark = {"pass": "✓", "fail": "✗", "n/a": "–"}
    names = list(CHECKS)
    passed = sum(c.passed for c in certificates.values())
    moe = sum(1 for name in certificates if FAMILIES[name].experts)
    lines = [
        MATRIX_START,
        (
            f"{passed} of {len(certificates)} families pass `lmscope verify` ({moe} mixture-of-experts); "
            "✓ pass, ✗ fail, – not applicable. Generated by `python scripts/family_matrix.py` "
            "(tests/verify checks it is current)."
        ),
        "",
        "| family | result | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for family, cert in sorted(certificates.items()):
        status = {c.name: c.status for c in cert.checks}
        cells = [mark[status[n]] for n in names]
        lines.append(f"| {family} | {'pass' if cert.passed else 'FAIL'} | " + " | ".join(cells) + " |")
    lines += ["", "Left out:", ""]
    lines += [f"- {name}: {reason}" for name, reason in sorted(LEFT_OUT.items())]
    return "\n".join(lines + [MATRIX_END])

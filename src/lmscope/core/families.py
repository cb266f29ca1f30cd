"""Architecture support as data: where each canonical site lives in each model family.

One :class:`Family` entry per Hugging Face ``config.model_type``. Module paths of the
whole model are relative to the root ``*ForCausalLM`` module; per-layer paths are
relative to one decoder layer. Adding a family is adding an entry to :data:`FAMILIES`
(most decoder-only models look like ``LLAMA``; start from it with ``replace``).

Fields
------
layers, embed, final_norm, unembed
    ModuleList of decoder layers, token embedding, final norm, unembedding.
attn
    The attention module (its ``forward`` calls the attention interface with q, k, v
    after rotary embedding; that is where ``attn.q/k/v/pattern`` are read).
o_proj
    Output projection; its input is ``attn.z`` (heads concatenated), its output ``attn.out``.
attn_contrib
    The module whose output is what the layer adds to the residual stream after
    attention (the attention itself, or a post-attention norm / dropout). Used for
    ``resid_mid`` = ``resid_pre`` + contribution.
mlp, mlp_down
    The MLP and its down projection (whose input is the neuron activation ``mlp.post``).
attn_norm, mlp_norm
    The norms between the residual stream and the attention / MLP inputs (``None`` when
    the block reads the residual directly, as OLMo 2 does).
q_proj, k_proj, v_proj / qkv_proj, qkv_layout
    Projection weights. Fused ``qkv_proj`` is split either as ``"concat"`` (q | k | v
    along the output) or ``"per_head"`` (GPT-NeoX: per head, q | k | v).
conv1d
    Weights are stored (in, out) as in GPT-2's ``Conv1D`` rather than ``nn.Linear``'s (out, in).
parallel_residual
    Config attribute that, when true, makes attention and MLP read the same residual
    (no ``resid_mid`` exists).
mlp_contrib
    The module whose output the layer adds to the residual stream after the MLP (the MLP, or
    a post-feedforward norm).
k_norm
    The key norm inside attention, where the model has one (a path the model may lack).

Where a tensor is read or written on these modules is the other table,
:mod:`lmscope.core.hookpoints`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Family:
    layers: str
    embed: str
    final_norm: str
    unembed: str
    attn: str
    o_proj: str
    attn_contrib: str
    mlp: str
    mlp_down: str
    attn_norm: str | None
    mlp_norm: str | None
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    qkv_proj: str | None = None
    qkv_layout: str = "concat"
    conv1d: bool = False
    parallel_residual: str | None = None
    mlp_contrib: str = "mlp"
    k_norm: str | None = None


LLAMA = Family(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    attn="self_attn",
    o_proj="self_attn.o_proj",
    attn_contrib="self_attn",
    mlp="mlp",
    mlp_down="mlp.down_proj",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    k_norm="self_attn.k_norm",  # present in Qwen 3, Gemma 3, OLMo 2
)

# Gemma 2/3 normalise the attention output before adding it to the residual, and the
# MLP input with a separate pre-feedforward norm.
GEMMA2 = replace(
    LLAMA,
    attn_contrib="post_attention_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    mlp_contrib="post_feedforward_layernorm",
)
# OLMo 2 normalises attention and MLP outputs only (no norm on their inputs).
OLMO2 = replace(
    LLAMA,
    attn_contrib="post_attention_layernorm",
    attn_norm=None,
    mlp_norm=None,
    mlp_contrib="post_feedforward_layernorm",
)

FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": LLAMA,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA2,
    "olmo2": OLMO2,
    "phi3": replace(
        LLAMA,
        attn_contrib="resid_attn_dropout",
        q_proj=None,
        k_proj=None,
        v_proj=None,
        qkv_proj="self_attn.qkv_proj",
    ),
    "gpt2": Family(
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn="attn",
        o_proj="attn.c_proj",
        attn_contrib="attn",
        mlp="mlp",
        mlp_down="mlp.c_proj",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        qkv_proj="attn.c_attn",
        conv1d=True,
    ),
    "gpt_neox": Family(
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        attn="attention",
        o_proj="attention.dense",
        attn_contrib="post_attention_dropout",
        mlp="mlp",
        mlp_down="mlp.dense_4h_to_h",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        qkv_proj="attention.query_key_value",
        qkv_layout="per_head",
        parallel_residual="use_parallel_residual",
    ),
}

# Names users know the families by, where ``model_type`` differs.
ALIASES = {"gemma3": "gemma3_text"}


def family_for(model_type: str) -> Family:
    """The table entry for a ``config.model_type``; a clear error if it has none."""
    from lmscope.core.errors import LmscopeError

    key = ALIASES.get(model_type, model_type)
    if key not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise LmscopeError(
            f"model family '{model_type}' is not supported (supported: {supported}); "
            "add an entry to FAMILIES in lmscope/families.py"
        )
    return FAMILIES[key]

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
mlp, mlp_down, mlp_up
    The MLP and its down projection (whose input is the neuron activation ``mlp.post``).
    ``mlp`` is ``None`` where the MLP's linears sit directly in the layer (OPT, XGLM, BioGPT):
    then ``mlp.in`` is the input of ``mlp_up`` (the first linear) and ``mlp.out`` the output of
    ``mlp_down``. In a mixture-of-experts layer ``mlp`` is the sparse block and ``mlp_down`` is
    absent (there is no single neuron activation).
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
    (no ``resid_mid`` exists); ``True`` where they always do (GPT-J, Phi, Cohere).
mlp_contrib
    The module whose output the layer adds to the residual stream after the MLP (the MLP, or
    a post-feedforward norm).
k_norm, q_norm
    The key / query norms inside attention, where the model has them (paths a model may lack).
pos_embed
    A learned position embedding added to the token embedding (GPT-2, OPT), if any.
attn_interface
    Whether attention runs through transformers' attention interface, where lmscope reads
    ``attn.q/k/v/pattern``; families that compute attention inline (GPT-Neo, GPT-J, BLOOM, Falcon,
    MPT, CodeGen) have every other site but not those.
router, experts
    Mixture-of-experts layers: the router (whose output is the router logits, or a tuple
    starting with them) and the experts module, called as ``experts(hidden [tokens, d_model],
    top_k_index [tokens, k], top_k_weights [tokens, k])`` as transformers 5 MoE blocks do.
    A layer without these modules is dense (DeepSeek's first layers, Qwen's ``mlp_only_layers``).
monet_router, monet_experts
    Monet layers (Park et al. 2025; remote code, entered through a ``--families`` file): the router
    (two linear maps to [heads, experts] giving the two routing distributions g1, g2; only on the
    first layer of each group of layers sharing it) and the experts module, called as
    ``experts(hidden [batch, pos, d_model], g1, g2 [batch, pos, heads, experts])`` and returning
    ``sum_h sum_ij g1[h, i] g2[h, j] E_ij(hidden)`` (:mod:`lmscope.core.monet`). Monet's experts
    module is also the layer's ``mlp``.
experts_scaled_inputs
    Llama 4's mixture of experts: the router returns ``(scores, logits)`` with ``scores``
    [tokens, n_experts] the sigmoid of the top-k logits (0 for the other experts), and every expert
    runs on every token with its *input* multiplied by its score: the experts module is called as
    ``experts(x [n_experts * tokens, d_model])`` (expert-major) and returns the experts' outputs in
    the same layout, which the block sums over experts (plus a shared expert).
experts_flat
    The experts module stores each weight with the experts flattened into its first axis
    (``[n_experts * d_ffn, d_model]``, DBRX) rather than stacked on it (``[n_experts, ...]``, as
    transformers 5 MoE blocks do); :func:`lmscope.core.moe.expert_weights` gives per-expert views.
residual_scale, logit_scale, embed_scale, qkv_clip
    Formulas over the config's attributes (:func:`config_value`: numbers, attribute names, dotted
    for sub-configs, ``+ - * / **`` and ``sqrt``) for what the model's forward does beyond its
    modules: the factor each layer multiplies attention and MLP outputs by before adding them to
    the residual stream (Granite ``"residual_multiplier"``, MiniCPM3
    ``"scale_depth / sqrt(num_hidden_layers)"``), the factor the logits are multiplied by (Cohere
    ``"logit_scale"``, Granite ``"1 / logits_scaling"``, MiniCPM3 ``"dim_model_base / hidden_size"``),
    the factor the token embeddings are multiplied by outside the embedding module (Granite
    ``"embedding_multiplier"``), and the bound q/k/v are clamped to after their projection (OLMo,
    DBRX). Unset, or naming an attribute that is absent or None: no scaling, no clamping.
mixer
    Hybrid models: the token mixer some layers have instead of attention (Qwen 3.5's gated
    delta-rule linear attention ``linear_attn``). On a layer without ``attn``, the mixer's output is
    ``attn.out`` and what the layer adds to the residual stream before the MLP; the head sites
    (``attn.q/k/v/z/pattern``) exist on attention layers only (:meth:`lmscope.core.model.Model.site`).
q_gate
    The query projection's output holds, per head, the query then an output gate (``sigmoid(gate)``
    multiplies the head's output before ``o_proj``, so ``attn.z`` is the gated output; Qwen 3.5).
v_norm
    The norm the values go through after their projection, where the model has one (Gemma 4's
    scale-free RMS norm over each head).
v_from_k
    On a layer whose attention has no ``v_proj``, the values are the key projection's output
    (before the key norm and rotary embedding): Gemma 4's full-attention layers with
    ``attention_k_eq_v``.
kv_reuse
    The config attribute listing each layer's attention kind (Gemma 4: ``"layer_types"``). A layer
    whose attention has no ``k_proj`` attends with the keys and values of the last earlier layer of
    the same kind that has one (:meth:`lmscope.core.model.Model.kv_source`; Gemma 4's KV-shared
    layers). Its ``attn.k`` / ``attn.v`` sites hold those reused tensors, as it attends with them;
    an edit there changes that layer's attention only. Such a model is asked for its last logits
    by position index (an integer ``logits_to_keep`` lets it skip the other positions there).
extra_contrib
    A third branch after the MLP: the module whose output the layer also adds to the residual
    stream (Gemma 4's per-layer inputs, ``post_per_layer_input_norm``; hook point ``extra.contrib``).
layer_scale
    A buffer or parameter of the layer (path relative to it) that the layer multiplies its whole
    output by after adding its branches (Gemma 4's ``layer_scalar``): ``resid_post`` =
    (``resid_mid`` + MLP + extra contributions) * scale (:meth:`lmscope.core.model.Model.layer_scale`).
unsupported
    ``(config attribute, reason)`` pairs: a model whose config sets one of these attributes to a
    true value is refused with the reason (Gemma 4's ``enable_moe_block``).

Where a tensor is read or written on these modules is the other table,
:mod:`lmscope.core.hookpoints`.
"""

from __future__ import annotations

import ast
import math
import operator
import types
import typing
from dataclasses import dataclass, replace
from functools import lru_cache


@dataclass(frozen=True)
class Family:
    layers: str
    embed: str
    final_norm: str
    unembed: str
    attn: str
    o_proj: str
    attn_contrib: str
    mlp: str | None
    mlp_down: str | None
    attn_norm: str | None
    mlp_norm: str | None
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    qkv_proj: str | None = None
    qkv_layout: str = "concat"
    conv1d: bool = False
    parallel_residual: str | bool | None = None
    mlp_contrib: str = "mlp"
    k_norm: str | None = None
    q_norm: str | None = None
    mlp_up: str | None = None
    pos_embed: str | None = None
    attn_interface: bool = True
    router: str | None = None
    experts: str | None = None
    monet_router: str | None = None
    monet_experts: str | None = None
    experts_flat: bool = False
    residual_scale: str | None = None
    logit_scale: str | None = None
    embed_scale: str | None = None
    qkv_clip: str | None = None
    mixer: str | None = None
    q_gate: bool = False
    experts_scaled_inputs: bool = False
    v_norm: str | None = None
    v_from_k: bool = False
    kv_reuse: str | None = None
    extra_contrib: str | None = None
    layer_scale: str | None = None
    unsupported: tuple[tuple[str, str], ...] = ()


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
    q_norm="self_attn.q_norm",
)

# Mixture-of-experts blocks of transformers 5 (router ``mlp.gate``, experts ``mlp.experts``); a
# layer without them is dense (its ``mlp.down_proj`` is ``mlp_down``).
MOE = replace(LLAMA, router="mlp.gate", experts="mlp.experts")

# Multi-head latent attention (DeepSeek V2/V3): q/k/v come from low-rank projections with a norm
# in between, so there are no per-head q/k/v weights (the sites attn.q/k/v/pattern still exist).
_LATENT = replace(MOE, q_proj=None, k_proj=None, v_proj=None, k_norm=None, q_norm=None)

# GPT-2's layout (transformer.h, fused c_attn, learned positions); GPT-2 itself stores its
# projections as Conv1D (``conv1d=True``), GPT-BigCode as nn.Linear.
_GPT2 = replace(
    LLAMA,
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    attn="attn",
    o_proj="attn.c_proj",
    attn_contrib="attn",
    mlp_down="mlp.c_proj",
    attn_norm="ln_1",
    mlp_norm="ln_2",
    q_proj=None,
    k_proj=None,
    v_proj=None,
    qkv_proj="attn.c_attn",
    pos_embed="transformer.wpe",
)

# Maximal-update parametrisation (Granite): residual branches, embeddings and logits scaled by the config.
_MUP = replace(
    LLAMA,
    residual_scale="residual_multiplier",
    logit_scale="1 / logits_scaling",
    embed_scale="embedding_multiplier",
)

# One entry per ``config.model_type``. Most entries were proposed by ``lmscope.core.derive`` from the
# family's module tree and kept once ``lmscope verify`` passed on a tiny model of the family
# (tests/verify); the README's family matrix lists the results.
FAMILIES: dict[str, Family] = {
    "afmoe": replace(
        LLAMA,
        attn_contrib="post_attention_layernorm",
        mlp_norm="pre_mlp_layernorm",
        mlp_contrib="post_mlp_layernorm",
        router="mlp.router",
        experts="mlp.experts",
    ),
    "apertus": replace(LLAMA, attn_norm="attention_layernorm", mlp_norm="feedforward_layernorm"),
    "arcee": LLAMA,
    "aria_text": replace(LLAMA, mlp_down=None, router="mlp.router", experts="mlp.experts"),
    "biogpt": replace(
        LLAMA,
        layers="biogpt.layers",
        embed="biogpt.embed_tokens",
        final_norm="biogpt.layer_norm",
        unembed="output_projection",
        o_proj="self_attn.out_proj",
        mlp=None,
        mlp_down="fc2",
        attn_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
        mlp_contrib="fc2",
        mlp_up="fc1",
        pos_embed="biogpt.embed_positions",
    ),
    "bitnet": LLAMA,
    "bloom": replace(
        LLAMA,
        layers="transformer.h",
        embed="transformer.word_embeddings_layernorm",
        final_norm="transformer.ln_f",
        attn="self_attention",
        o_proj="self_attention.dense",
        attn_contrib="self_attention.dense",
        mlp=None,
        mlp_up="mlp.dense_h_to_4h",
        mlp_down="mlp.dense_4h_to_h",
        mlp_contrib="mlp.dense_4h_to_h",
        q_proj=None,
        k_proj=None,
        v_proj=None,
        qkv_proj="self_attention.query_key_value",
        qkv_layout="per_head",
        attn_interface=False,
    ),  # attention and MLP add the residual themselves: their contributions are the output projections' outputs
    "codegen": replace(
        LLAMA,
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        attn="attn",
        o_proj="attn.out_proj",
        attn_contrib="attn",
        mlp_down="mlp.fc_out",
        attn_norm="ln_1",
        mlp_norm="ln_1",
        q_proj=None,
        k_proj=None,
        v_proj=None,
        qkv_proj="attn.qkv_proj",
        parallel_residual=True,
        attn_interface=False,
    ),
    "cohere": replace(LLAMA, mlp_norm="input_layernorm", parallel_residual=True, logit_scale="logit_scale"),
    "cohere2": replace(LLAMA, mlp_norm="input_layernorm", parallel_residual=True, logit_scale="logit_scale"),
    "cohere2_moe": replace(
        LLAMA,
        mlp_down=None,
        mlp_norm="input_layernorm",
        parallel_residual=True,
        logit_scale="logit_scale",
        router="mlp.gate",
        experts="mlp.experts",
    ),
    "cwm": LLAMA,
    "dbrx": replace(
        MOE,
        layers="transformer.blocks",
        embed="transformer.wte",
        final_norm="transformer.norm_f",
        attn="norm_attn_norm.attn",
        o_proj="norm_attn_norm.attn.out_proj",
        attn_contrib="norm_attn_norm.attn",
        mlp="ffn",
        mlp_down=None,
        attn_norm="norm_attn_norm.norm_1",
        mlp_norm="norm_attn_norm.norm_2",
        mlp_contrib="ffn",
        q_proj=None,
        k_proj=None,
        v_proj=None,
        qkv_proj="norm_attn_norm.attn.Wqkv",
        k_norm=None,
        q_norm=None,
        router="ffn.router",
        experts="ffn.experts",
        experts_flat=True,
        qkv_clip="attn_config.clip_qkv",
    ),  # norm_attn_norm adds the attention's output to the residual stream itself
    "deepseek_v2": _LATENT,
    "deepseek_v3": _LATENT,
    "doge": LLAMA,
    "dots1": MOE,
    "ernie4_5": LLAMA,
    "ernie4_5_moe": MOE,
    "exaone4": replace(
        LLAMA,
        attn_contrib="post_attention_layernorm",
        attn_norm=None,
        mlp_norm=None,
        mlp_contrib="post_feedforward_layernorm",
    ),
    "exaone_moe": MOE,
    "falcon": replace(
        LLAMA,
        layers="transformer.h",
        embed="transformer.word_embeddings",
        final_norm="transformer.ln_f",
        attn="self_attention",
        o_proj="self_attention.dense",
        attn_contrib="self_attention",
        mlp_down="mlp.dense_4h_to_h",
        mlp_norm="input_layernorm",
        q_proj=None,
        k_proj=None,
        v_proj=None,
        qkv_proj="self_attention.query_key_value",
        parallel_residual=True,
        attn_interface=False,
    ),
    "flex_olmo": replace(
        LLAMA,
        attn_contrib="post_attention_layernorm",
        mlp_down=None,
        attn_norm=None,
        mlp_norm=None,
        mlp_contrib="post_feedforward_layernorm",
        router="mlp.gate",
        experts="mlp.experts",
    ),
    "gemma": LLAMA,
    "gemma2": replace(
        LLAMA,
        attn_contrib="post_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm",
        mlp_contrib="post_feedforward_layernorm",
    ),
    "gemma3_text": replace(
        LLAMA,
        attn_contrib="post_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm",
        mlp_contrib="post_feedforward_layernorm",
    ),
    # layers of two kinds with their own head size and KV heads, later layers reusing earlier ones'
    # keys and values, a per-layer input branch after the MLP, and a scale on each layer's output
    "gemma4_text": replace(
        LLAMA,
        attn_contrib="post_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm",
        mlp_contrib="post_feedforward_layernorm",
        v_norm="self_attn.v_norm",
        v_from_k=True,
        kv_reuse="layer_types",
        extra_contrib="post_per_layer_input_norm",
        layer_scale="layer_scalar",
        unsupported=(("enable_moe_block", "not yet: an MoE block beside the MLP, routed by probabilities"),),
    ),
    "glm": LLAMA,
    "glm4": replace(LLAMA, attn_contrib="post_self_attn_layernorm", mlp_contrib="post_mlp_layernorm"),
    "glm4_moe": MOE,
    "gpt2": replace(_GPT2, conv1d=True),
    "gpt_bigcode": _GPT2,  # GPT-2 with nn.Linear projections (and multi-query attention)
    "gpt_neo": replace(
        LLAMA,
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        attn="attn.attention",
        o_proj="attn.attention.out_proj",
        attn_contrib="attn",
        mlp_down="mlp.c_proj",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        q_proj="attn.attention.q_proj",
        k_proj="attn.attention.k_proj",
        v_proj="attn.attention.v_proj",
        pos_embed="transformer.wpe",
        attn_interface=False,
    ),
    "gpt_neox": replace(
        LLAMA,
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        attn="attention",
        o_proj="attention.dense",
        attn_contrib="post_attention_dropout",
        mlp_down="mlp.dense_4h_to_h",
        mlp_norm="post_attention_layernorm",
        q_proj=None,
        k_proj=None,
        v_proj=None,
        qkv_proj="attention.query_key_value",
        qkv_layout="per_head",
        parallel_residual="use_parallel_residual",
    ),
    "gpt_oss": replace(LLAMA, mlp_down=None, router="mlp.router", experts="mlp.experts"),
    "gptj": replace(
        LLAMA,
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        attn="attn",
        o_proj="attn.out_proj",
        attn_contrib="attn",
        mlp_down="mlp.fc_out",
        attn_norm="ln_1",
        mlp_norm="ln_1",
        q_proj="attn.q_proj",
        k_proj="attn.k_proj",
        v_proj="attn.v_proj",
        parallel_residual=True,
        attn_interface=False,
    ),
    "granite": _MUP,
    "granitemoe": replace(
        _MUP,
        mlp="block_sparse_moe",
        mlp_down=None,
        mlp_contrib="block_sparse_moe",
        router="block_sparse_moe.router",
        experts="block_sparse_moe.experts",
    ),
    "granitemoeshared": replace(
        _MUP,
        mlp="block_sparse_moe",
        mlp_down=None,
        mlp_contrib="block_sparse_moe",
        router="block_sparse_moe.router",
        experts="block_sparse_moe.experts",
    ),
    "helium": LLAMA,
    "hunyuan_v1_dense": replace(LLAMA, k_norm="self_attn.key_layernorm", q_norm="self_attn.query_layernorm"),
    "hunyuan_v1_moe": replace(
        LLAMA,
        mlp_down=None,
        k_norm="self_attn.key_layernorm",
        q_norm="self_attn.query_layernorm",
        router="mlp.gate",
        experts="mlp.experts",
    ),
    "hy_v3": MOE,
    "hyperclovax": replace(
        _MUP, attn_contrib="post_norm1", mlp_contrib="post_norm2", logit_scale="logits_scaling"
    ),  # multiplies the logits by logits_scaling where Granite divides
    "internlm3": LLAMA,
    "jais2": LLAMA,
    "kolibri1": replace(
        LLAMA,
        attn_contrib="post_self_attn_layernorm",
        mlp_down=None,
        mlp_contrib="post_mlp_layernorm",
        router="mlp.gate",
        experts="mlp.experts",
    ),
    "llama": LLAMA,
    "llama4_text": replace(
        LLAMA,
        mlp="feed_forward",
        mlp_down=None,
        mlp_contrib="feed_forward",
        k_norm="self_attn.qk_norm",
        q_norm="self_attn.qk_norm",
        router="feed_forward.router",
        experts="feed_forward.experts",
        experts_scaled_inputs=True,
    ),  # dense layers (interleave_moe_layer_step > 1) have a plain MLP at feed_forward
    "mellum": MOE,
    "minimax_m2": MOE,
    "ministral": LLAMA,
    "ministral3": LLAMA,
    "mistral": LLAMA,
    "mixtral": MOE,
    "mpt": replace(
        LLAMA,
        layers="transformer.blocks",
        embed="transformer.wte",
        final_norm="transformer.norm_f",
        attn="attn",
        o_proj="attn.out_proj",
        attn_contrib="attn",
        mlp=None,
        mlp_up="ffn.up_proj",
        mlp_down="ffn.down_proj",
        mlp_contrib="ffn.down_proj",
        attn_norm="norm_1",
        mlp_norm="norm_2",
        q_proj=None,
        k_proj=None,
        v_proj=None,
        qkv_proj="attn.Wqkv",
        attn_interface=False,
    ),  # the MLP adds the residual itself
    "nemotron": LLAMA,
    "minicpm3": replace(
        _LATENT,
        router=None,
        experts=None,
        residual_scale="scale_depth / sqrt(num_hidden_layers)",
        logit_scale="dim_model_base / hidden_size",
    ),  # its embedding module applies scale_emb itself
    "olmo": replace(LLAMA, qkv_clip="clip_qkv"),
    "olmo2": replace(
        LLAMA,
        attn_contrib="post_attention_layernorm",
        attn_norm=None,
        mlp_norm=None,
        mlp_contrib="post_feedforward_layernorm",
    ),
    "olmo3": replace(
        LLAMA,
        attn_contrib="post_attention_layernorm",
        attn_norm=None,
        mlp_norm=None,
        mlp_contrib="post_feedforward_layernorm",
    ),
    "olmoe": MOE,
    "opt": replace(
        LLAMA,
        layers="model.decoder.layers",
        embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
        o_proj="self_attn.out_proj",
        mlp=None,
        mlp_down="fc2",
        attn_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
        mlp_contrib="fc2",
        mlp_up="fc1",
        pos_embed="model.decoder.embed_positions",
    ),
    "persimmon": replace(
        LLAMA,
        final_norm="model.final_layernorm",
        o_proj="self_attn.dense",
        mlp_down="mlp.dense_4h_to_h",
        q_proj=None,
        k_proj=None,
        v_proj=None,
        qkv_proj="self_attn.query_key_value",
        qkv_layout="per_head",
        k_norm="self_attn.k_layernorm",
        q_norm="self_attn.q_layernorm",
    ),
    "phi": replace(
        LLAMA,
        final_norm="model.final_layernorm",
        o_proj="self_attn.dense",
        mlp_down="mlp.fc2",
        mlp_norm="input_layernorm",
        parallel_residual=True,
    ),
    "phi3": replace(
        LLAMA, attn_contrib="resid_attn_dropout", q_proj=None, k_proj=None, v_proj=None, qkv_proj="self_attn.qkv_proj"
    ),
    "phimoe": replace(LLAMA, mlp_down=None, router="mlp.router", experts="mlp.experts"),
    "qwen2": LLAMA,
    "qwen2_moe": MOE,
    "qwen3": LLAMA,
    "qwen3_moe": MOE,
    # linear-attention layers (``linear_attn``) among gated full-attention layers
    "qwen3_5_text": replace(LLAMA, mixer="linear_attn", q_gate=True),
    "qwen3_5_moe_text": replace(MOE, mixer="linear_attn", q_gate=True),
    # Mixture of attention heads: each token's query and output projections are chosen from
    # attention experts, so its heads are routing slots with no single output projection; the
    # attention layer is exposed as a whole (attn.out, resid_mid), as a mixer with no head sites.
    # Its MLP experts are not the transformers-5 experts contract: mlp.in / mlp.out only.
    "jetmoe": replace(
        LLAMA,
        attn=None,
        o_proj=None,
        attn_contrib="self_attention",
        mixer="self_attention",
        q_proj=None,
        k_proj=None,
        v_proj=None,
        k_norm=None,
        q_norm=None,
        mlp_down=None,
    ),
    "seed_oss": LLAMA,
    "smollm3": LLAMA,
    "solar_open": MOE,
    "stablelm": LLAMA,
    "starcoder2": replace(LLAMA, mlp_down="mlp.c_proj"),
    "vaultgemma": replace(LLAMA, mlp_norm="pre_feedforward_layernorm"),
    "xglm": replace(
        LLAMA,
        final_norm="model.layer_norm",
        o_proj="self_attn.out_proj",
        mlp=None,
        mlp_down="fc2",
        attn_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
        mlp_contrib="fc2",
        mlp_up="fc1",
        pos_embed="model.embed_positions",
        attn_interface=False,
    ),
}

# Names users know the families by, where ``model_type`` differs.
ALIASES = {"gemma3": "gemma3_text", "qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}


# Decoder-only text families of transformers 5 that have no entry, and why (shown when one is loaded).
_SSM = "state-space / recurrent layers, not attention + MLP blocks"
_HYBRID = "hybrid layers (linear attention or state-space mixed with attention)"
LEFT_OUT: dict[str, str] = {
    **dict.fromkeys(["mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm"], _SSM),
    **dict.fromkeys(
        [
            "jamba",
            "bamba",
            "zamba",
            "zamba2",
            "falcon_h1",
            "granitemoehybrid",
            "nemotron_h",
            "qwen3_next",
            "lfm2",
            "lfm2_moe",
            "minimax",
            "olmo_hybrid",
            "kimi_linear",
            "recurrent_gemma",
            "bailing_hybrid",
        ],
        _HYBRID,
    ),
    "diffllama": "differential attention (two softmax maps subtracted per head)",
    "nanochat": "not yet: parameter-free norms applied as functions, not modules",
    "glm4_moe_lite": "not yet: latent attention projections not derived",
    "openai-gpt": "post-norm blocks without a final norm",
    "ctrl": "not yet: attention projections named Wq/Wk/Wv",
}

# Entries from a user's file (``--families``, :func:`load_families`), consulted before the table.
USER_FAMILIES: dict[str, Family] = {}


def family_for(model_type: str) -> Family:
    """The table entry for a ``config.model_type`` (a user file's first); a clear error if it has none."""
    from lmscope.core.errors import UnknownFamily

    key = ALIASES.get(model_type, model_type)
    if key in USER_FAMILIES:
        return USER_FAMILIES[key]
    if key in LEFT_OUT:
        raise UnknownFamily(f"model family '{model_type}' is not supported: {LEFT_OUT[key]}")
    if key not in FAMILIES:
        raise UnknownFamily(
            f"model family '{model_type}' is not supported (supported: {', '.join(sorted(FAMILIES))}); "
            "add an entry to FAMILIES in lmscope/core/families.py or a --families file"
        )
    return FAMILIES[key]


_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_FUNCTIONS = {"sqrt": math.sqrt}


class _Unset(Exception):
    """A formula names a config attribute that is absent or None."""


def _allowed(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, int | float) and not isinstance(node.value, bool)
    if isinstance(node, ast.Name | ast.Attribute):
        return not (node.id if isinstance(node, ast.Name) else node.attr).startswith("_")
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        return name in _FUNCTIONS and len(node.args) == 1 and not node.keywords
    return isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Load, *_OPERATORS))


@lru_cache(maxsize=256)
def _parse(formula: str) -> ast.expr:
    from lmscope.core.errors import LmscopeError

    try:
        tree = ast.parse(formula.strip(), mode="eval").body
    except SyntaxError:
        raise LmscopeError(f"family formula '{formula}' is not an expression") from None
    if not all(_allowed(node) for node in ast.walk(tree)):
        raise LmscopeError(
            f"family formula '{formula}': only numbers, config attributes, + - * / ** and sqrt() are allowed"
        )
    return tree


def _evaluate(node: ast.expr, config) -> float:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name | ast.Attribute):
        owner = config if isinstance(node, ast.Name) else _evaluate(node.value, config)
        value = getattr(owner, node.id if isinstance(node, ast.Name) else node.attr, None)
        if value is None:
            raise _Unset
        return value
    if isinstance(node, ast.Call):
        return _FUNCTIONS[node.func.id](_evaluate(node.args[0], config))
    if isinstance(node, ast.UnaryOp):
        return _OPERATORS[type(node.op)](_evaluate(node.operand, config))
    return _OPERATORS[type(node.op)](_evaluate(node.left, config), _evaluate(node.right, config))


def config_value(config, formula: str | None) -> float | None:
    """The value of a family's formula field (``residual_scale``, ``logit_scale``, ...) over
    ``config``'s attributes, e.g. ``"scale_depth / sqrt(num_hidden_layers)"`` or
    ``"attn_config.clip_qkv"``; None when ``formula`` is None or names an attribute that is absent
    or None. A clear error for a formula that is not numbers, attributes, ``+ - * / **`` and ``sqrt``."""
    from lmscope.core.errors import LmscopeError

    if formula is None:
        return None
    try:
        value = _evaluate(_parse(formula), config)
    except _Unset:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LmscopeError(f"family formula '{formula}' is not a number on this config ({type(value).__name__})")
    return value


def load_families(path) -> dict[str, Family]:
    """Register the entries of a TOML or JSON file, ``{model_type: {field: value, ...}}``; an
    entry may start from another with ``base = "llama"``. Returns the new entries; a one-line
    error naming the file for a file that cannot be read or parsed, holds no entry, or an entry
    with an unknown field or a value of the wrong type."""
    import json
    import tomllib
    from dataclasses import fields
    from pathlib import Path

    from lmscope.core.errors import LmscopeError
    from lmscope.core.jsonl import parse_json, read_text

    path = Path(path)
    text = read_text(path, "families file (TOML or JSON)")
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise LmscopeError(f"{path}: malformed TOML ({str(e).splitlines()[0]})") from None
    else:
        data = parse_json(text, str(path))
    if not isinstance(data, dict) or not data:
        raise LmscopeError(f"{path}: expected a table of family entries {{model_type: {{field: value}}}}")
    known = {f.name: f.type for f in fields(Family)}
    hints = typing.get_type_hints(Family)
    added = {}
    for model_type, entry in data.items():
        where = f"{path}: entry '{model_type}'"
        if not isinstance(entry, dict):
            raise LmscopeError(f"{where} is not a table of fields")
        entry = dict(entry)
        base = entry.pop("base", None)
        if base is not None and not isinstance(base, str):
            raise LmscopeError(f"{where}: 'base' must be a model type (a string), not {json.dumps(base)}")
        bad = sorted(set(entry) - set(known))
        if bad:
            raise LmscopeError(f"{where} has unknown field(s) {', '.join(bad)}")
        for name, value in entry.items():
            if not _fits(value, hints[name]):
                raise LmscopeError(f"{where}: field '{name}' must be {known[name]}, not {json.dumps(value)[:40]}")
        entry = {name: _tupled(value) for name, value in entry.items()}
        try:
            family = replace(family_for(base), **entry) if base else Family(**entry)
        except TypeError as e:
            raise LmscopeError(f"{where}: {e}") from None
        added[model_type] = family
    USER_FAMILIES.update(added)
    return added


def _fits(value, hint) -> bool:
    """Whether a value read from TOML or JSON fits a :class:`Family` field's type (lists for tuples)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list | tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
    return isinstance(value, hint)


def _tupled(value):
    """Lists as tuples, recursively (the frozen :class:`Family` keeps tuples)."""
    return tuple(map(_tupled, value)) if isinstance(value, list) else value

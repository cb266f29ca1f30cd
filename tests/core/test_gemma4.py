"""Gemma 4 (``gemma4_text``) against references outside lmscope's table: per-layer head sizes from
the config and the modules, the residual stream from Hugging Face's hidden states, reused keys and
values from the model's own shared KV states; what lmscope cannot do with it fails clearly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import transformers as T

import lmscope
from lmscope.core.anatomy import head_params, mlp_contributions, qkv_points
from lmscope.core.families import FAMILIES
from lmscope.core.hooks import Hook, hooked
from lmscope.verify import certify
from tests.families import tiny_config, tiny_family_model

SITES = ("attn.q", "attn.k", "attn.v", "attn.z")


@pytest.fixture(scope="module")
def gemma4() -> lmscope.Model:
    return tiny_family_model("gemma4_text")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))


def test_the_tiny_model_has_the_hard_parts(gemma4):
    config = gemma4.hf.config
    kinds = config.layer_types
    assert {"sliding_attention", "full_attention"} <= set(kinds)
    assert len({config.per_layer_config[i].head_dim for i in range(gemma4.n_layers)}) == 2
    assert "reuse" in config.kv_sharing_modes and config.attention_k_eq_v and config.hidden_size_per_layer_input
    scalars = torch.stack([layer.layer_scalar for layer in gemma4.hf.model.layers])
    assert not torch.allclose(scalars, torch.ones_like(scalars))


def test_heads_split_per_layer(gemma4, ids):
    """Every head site has the layer's own head size and KV heads (the config's and the attention
    module's), and attn.z head h is columns [h*d, (h+1)*d) of what o_proj reads."""
    config, L, H = gemma4.hf.config, gemma4.n_layers, gemma4.n_heads
    o_in: dict[int, torch.Tensor] = {}

    def read(layer: int):
        def hook(module, args):
            o_in[layer] = args[0].detach().clone()

        return hook

    handles = [gemma4.hf.model.layers[i].self_attn.o_proj.register_forward_pre_hook(read(i)) for i in range(L)]
    try:
        run = gemma4.run(ids, capture=[f"blocks.{i}.{k}" for i in range(L) for k in SITES])
    finally:
        for handle in handles:
            handle.remove()
    shapes = dict(gemma4.site_shapes(*ids.shape))
    for i in range(L):
        d = config.per_layer_config[i].head_dim
        kv = config.per_layer_config[i].num_key_value_heads
        assert gemma4.d_head_of(i) == d == gemma4.hf.model.layers[i].self_attn.head_dim
        assert gemma4.n_kv_heads_of(i) == kv
        for k in SITES:
            heads = kv if k in ("attn.k", "attn.v") else H
            assert run.cache[f"blocks.{i}.{k}"].shape == (*ids.shape, heads, d) == shapes[f"blocks.{i}.{k}"]
        z = run.cache[f"blocks.{i}.attn.z"]
        for h in range(H):
            assert torch.equal(z[:, :, h], o_in[i][..., h * d : (h + 1) * d])
    with pytest.raises(lmscope.LmscopeError, match="out of range"):
        gemma4.site("blocks.1.attn.k.1")  # a full-attention layer has one KV head
    gemma4.site("blocks.0.attn.k.1")


def test_editing_one_head_of_a_large_head_layer(gemma4, ids):
    """Zeroing head 2 of a full-attention layer (head size 32) is zeroing its 32 columns of o_proj."""
    layer, head, d = 1, 2, gemma4.d_head_of(1)
    edited = gemma4.run(ids, interventions=[lmscope.zero(f"blocks.{layer}.attn.z.{head}")]).logits
    weight = gemma4.hf.model.layers[layer].self_attn.o_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[:, head * d : (head + 1) * d] = 0
            reference = gemma4.hf(input_ids=ids, use_cache=False).logits
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    torch.testing.assert_close(edited, reference)


def test_residual_stream_is_the_three_branches_times_the_layer_scale(gemma4, ids):
    """resid_post = (resid_pre + attention + MLP + per-layer input branch) * layer_scalar, from
    lmscope's hook points, equals Hugging Face's hidden states (the last layer's: what the final
    norm reads); each part matters."""
    L, got = gemma4.n_layers, {}

    def keep(key: str):
        def fn(x: torch.Tensor) -> None:
            got[key] = x.clone()

        return fn

    points = ("resid_pre", "attn.contrib", "mlp.contrib", "extra.contrib")
    hooks = [Hook(p, i, keep(f"{p}{i}")) for i in range(L) for p in points]
    with torch.no_grad(), hooked(gemma4, [*hooks, Hook("final_norm.in", None, keep("final"))]):
        hidden = gemma4.hf(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    torch.testing.assert_close(gemma4.hf.model.norm(got["final"]), hidden[L])
    for i in range(L):
        branches = got[f"attn.contrib{i}"] + got[f"mlp.contrib{i}"] + got[f"extra.contrib{i}"]
        scale = gemma4.hf.model.layers[i].layer_scalar
        assert torch.equal(gemma4.layer_scale(i), scale)
        resid_post = (got[f"resid_pre{i}"] + branches) * scale
        reference = hidden[i + 1] if i + 1 < L else got["final"]
        torch.testing.assert_close(resid_post, reference, rtol=1e-5, atol=1e-5)
        without_extra = (got[f"resid_pre{i}"] + branches - got[f"extra.contrib{i}"]) * scale
        assert not torch.allclose(without_extra, reference, rtol=1e-3, atol=1e-3)
        assert not torch.allclose(got[f"resid_pre{i}"] + branches, reference, rtol=1e-3, atol=1e-3)


def test_kv_shared_layers_attend_with_their_source_layers_keys(gemma4, ids):
    """Layers 3 and 4 reuse the keys and values of the last earlier layer of their kind (the one
    the config marks "store"), which are the model's own shared KV states."""
    config, L = gemma4.hf.config, gemma4.n_layers
    modes, kinds = config.kv_sharing_modes, config.layer_types
    stores = {kinds[i]: i for i in range(L) if modes[i] == "store"}
    expected = [stores[kinds[i]] if modes[i] == "reuse" else i for i in range(L)]
    assert [gemma4.kv_source(i) for i in range(L)] == expected == [0, 1, 2, 2, 1]
    run = gemma4.run(ids, capture=[f"blocks.{i}.attn.{t}" for i in range(L) for t in "kv"])
    with torch.no_grad():
        shared = gemma4.hf(input_ids=ids, use_cache=False, return_shared_kv_states=True).shared_kv_states
    for i in (3, 4):
        for j, t in enumerate("kv"):
            got = run.cache[f"blocks.{i}.attn.{t}"]
            assert torch.equal(got, run.cache[f"blocks.{expected[i]}.attn.{t}"])
            assert torch.equal(got, shared[kinds[i]][j].transpose(1, 2))
    assert not torch.equal(run.cache["blocks.3.attn.k"], run.cache["blocks.0.attn.k"])


def test_an_edit_of_reused_keys_changes_only_the_edited_layers_attention(gemma4, ids):
    """Zeroing layer 1's keys leaves the keys layer 4 attends with (layer 1's, reused) as they were."""
    sites = ["blocks.1.attn.k", "blocks.4.attn.k"]
    clean = gemma4.run(ids, capture=sites)
    edited = gemma4.run(ids, capture=sites, interventions=[lmscope.zero("blocks.1.attn.k")])
    assert not edited.cache["blocks.1.attn.k"].any()
    assert torch.equal(edited.cache["blocks.4.attn.k"], clean.cache["blocks.4.attn.k"])


def test_values_of_a_keys_equal_values_layer_come_from_the_key_projection(gemma4):
    """With attention_k_eq_v, a full-attention layer has no v_proj: its value weights are k_proj's."""
    attn = gemma4.hf.model.layers[1].self_attn
    assert attn.v_proj is None
    w_k, _ = head_params(gemma4, 1, "k")
    w_v, _ = head_params(gemma4, 1, "v")
    assert torch.equal(w_v, w_k) and w_v.shape == (4, 32, 64)
    with pytest.raises(lmscope.LmscopeError, match="attends with the keys and values of layer 2"):
        head_params(gemma4, 3, "k")
    with pytest.raises(lmscope.LmscopeError, match="key projection's output"):
        qkv_points(gemma4, 1)


def test_last_position_runs_keep_every_position_of_the_shared_layers(gemma4, ids):
    """``logits="last"`` gives the full run's last logits and every position at every site (under
    an integer logits_to_keep, Gemma 4 would run its KV-shared layers on the last position only)."""
    sites = ["blocks.4.resid_post", "blocks.3.attn.z"]
    full = gemma4.run(ids, capture=sites)
    last = gemma4.run(ids, capture=sites, logits="last")
    torch.testing.assert_close(last.logits[:, -1], full.logits[:, -1])
    for site in sites:
        torch.testing.assert_close(last.cache[site], full.cache[site])


def test_what_lmscope_cannot_do_with_it_fails_clearly(gemma4):
    with (
        pytest.raises(lmscope.LmscopeError, match="not the sum of what attention and the MLPs write"),
        mlp_contributions(gemma4),
    ):
        pass
    with pytest.raises(lmscope.LmscopeError, match="differ in head size"):
        gemma4.require_uniform_heads("rotation")


def test_mixture_of_experts_variant_is_refused():
    config = tiny_config("gemma4_text")
    config.enable_moe_block, config.num_experts, config.top_k_experts = True, 4, 2
    config.moe_intermediate_size = 16
    hf = T.AutoModelForCausalLM.from_config(config)
    with pytest.raises(
        lmscope.LmscopeError, match=r"'gemma4_text' with enable_moe_block is not supported: .*MoE block"
    ):
        lmscope.Model(hf, None)


@pytest.mark.parametrize(
    ("field", "check"),
    [
        ("extra_contrib", "residual_sum"),
        ("layer_scale", "residual_sum"),
        ("v_norm", "qkv"),
        ("v_from_k", "qkv"),
        ("kv_reuse", "qkv"),
    ],
)
def test_each_new_field_of_the_entry_is_needed(gemma4, field, check):
    """Without any one of its Gemma 4 fields the entry fails the check that covers it."""
    entry = FAMILIES["gemma4_text"]
    assert certify(gemma4, [check]).passed
    wrong = replace(entry, **{field: False if field == "v_from_k" else None})
    assert certify(lmscope.Model(gemma4.hf, None, family=wrong), [check]).failed == [check]

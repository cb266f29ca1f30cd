"""Hybrid layers (Qwen 3.5): linear-attention layers (``Family.mixer``) among gated full-attention
layers. The mixer's output is the layer's attention output; head sites exist on attention layers only."""

from __future__ import annotations

import pytest
import torch

import lmscope
from lmscope.core import zero
from lmscope.core.anatomy import head_contributions, head_params, qkv_points
from lmscope.core.families import FAMILIES, family_for
from tests.families import tiny_family_model

HEAD_KINDS = ("attn.q", "attn.k", "attn.v", "attn.z", "attn.pattern")


@pytest.fixture(scope="module")
def qwen35() -> lmscope.Model:
    return tiny_family_model("qwen3_5_text")  # layers: linear, full, linear attention


def _ids(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, m.d_vocab, (2, 7), generator=g)


def test_layer_types_and_dimensions(qwen35):
    assert qwen35.hf.config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    assert qwen35.layers_with("attn") == [1] and qwen35.layers_with("mixer") == [0, 2]
    assert (qwen35.n_heads, qwen35.n_kv_heads, qwen35.d_head) == (4, 2, 16)  # from layer 1's o_proj
    assert family_for("qwen3_5") is FAMILIES["qwen3_5_text"]
    assert family_for("qwen3_5_moe") is FAMILIES["qwen3_5_moe_text"]


def test_head_sites_exist_on_attention_layers_only(qwen35):
    names = {name for name, _ in qwen35.site_shapes()}
    for kind in HEAD_KINDS:
        assert f"blocks.1.{kind}" in names
        assert f"blocks.0.{kind}" not in names and f"blocks.2.{kind}" not in names
    for layer in (0, 2):
        assert f"blocks.{layer}.attn.out" in names and f"blocks.{layer}.resid_mid" in names
        for kind in HEAD_KINDS:
            with pytest.raises(lmscope.LmscopeError, match=rf"layer {layer} has no attention heads.*linear_attn"):
                qwen35.site(f"blocks.{layer}.{kind}")
        with pytest.raises(lmscope.LmscopeError, match="no attention heads"):
            qwen35.run(_ids(qwen35), interventions=[zero(f"blocks.{layer}.attn.z.0")])
        with pytest.raises(lmscope.LmscopeError, match="no attention heads"):
            head_params(qwen35, layer, "v")
        with pytest.raises(lmscope.LmscopeError, match="no attention heads"):
            head_contributions(qwen35, layer, torch.zeros(1, 4, 16))
    run = qwen35.run(_ids(qwen35), capture=[f"blocks.1.{k}" for k in HEAD_KINDS])
    assert run.cache["blocks.1.attn.z"].shape == (2, 7, 4, 16)
    assert run.cache["blocks.1.attn.pattern"].shape == (2, 4, 7, 7)
    with pytest.raises(lmscope.LmscopeError, match="gated"):  # q_proj holds q and the output gate
        qkv_points(qwen35, 1)


def test_linear_layer_attn_out_is_the_mixers_output(qwen35):
    ids = _ids(qwen35)
    plain: dict[int, torch.Tensor] = {}
    handles = [
        qwen35.layer_module(i, "linear_attn").register_forward_hook(
            lambda mod, args, out, i=i: plain.__setitem__(i, out.detach().clone())
        )
        for i in (0, 2)
    ]
    try:
        with torch.no_grad():
            qwen35.hf(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    sites = [f"blocks.{i}.{k}" for i in (0, 2) for k in ("resid_pre", "resid_mid", "attn.out")]
    cache = qwen35.run(ids, capture=sites).cache
    for i in (0, 2):
        torch.testing.assert_close(cache[f"blocks.{i}.attn.out"], plain[i], rtol=0, atol=0)
        torch.testing.assert_close(cache[f"blocks.{i}.resid_mid"], cache[f"blocks.{i}.resid_pre"] + plain[i])


def test_zeroing_a_linear_layers_output_equals_zeroing_out_proj(qwen35):
    ids = _ids(qwen35)
    ablated = qwen35.run(ids, interventions=[zero("blocks.2.attn.out")]).logits
    weight = qwen35.layer_module(2, "linear_attn.out_proj").weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.zero_()
            reference = qwen35.hf(input_ids=ids, use_cache=False).logits
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    torch.testing.assert_close(ablated, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ablated, qwen35.run(ids).logits)


def test_layer_reruns_from_a_cached_prefix_are_refused_clearly(qwen35):
    from lmscope.circuits.patching import activation_patching
    from tests.helpers import token_pair

    with pytest.raises(lmscope.LmscopeError, match=r"layers \[0, 2\] \(linear_attn\) carry a recurrent state"):
        activation_patching(qwen35, [token_pair(qwen35, differ=(2,))], "mlp")


def test_jetmoe_attention_is_read_as_a_whole():
    """JetMoE (mixture of attention heads: each token's query and output projections are chosen
    from attention experts) exposes its attention layer as a mixer: ``attn.out`` is the
    attention module's output (a plain forward hook's reference), ``resid_mid`` adds it to the
    residual stream, and no layer offers head sites."""
    m = tiny_family_model("jetmoe")
    ids = _ids(m)
    assert m.layers_with("attn") == [] and m.layers_with("mixer") == list(range(m.n_layers))
    plain: dict[int, torch.Tensor] = {}
    handles = [
        m.layer_module(i, "self_attention").register_forward_hook(
            lambda mod, args, out, i=i: plain.__setitem__(i, out[0].detach().clone())
        )
        for i in range(m.n_layers)
    ]
    try:
        with torch.no_grad():
            m.hf(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    sites = [f"blocks.{i}.{k}" for i in range(m.n_layers) for k in ("resid_pre", "resid_mid", "attn.out")]
    cache = m.run(ids, capture=sites).cache
    for i in range(m.n_layers):
        torch.testing.assert_close(cache[f"blocks.{i}.attn.out"], plain[i], rtol=0, atol=0)
        torch.testing.assert_close(cache[f"blocks.{i}.resid_mid"], cache[f"blocks.{i}.resid_pre"] + plain[i])
    names = {name for name, _ in m.site_shapes()}
    assert not any(name.split(".", 2)[-1] in HEAD_KINDS for name in names)
    with pytest.raises(lmscope.LmscopeError, match="no layer has head sites"):
        m.site("blocks.1.attn.z")

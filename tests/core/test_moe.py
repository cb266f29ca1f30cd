"""Mixture-of-experts sites and interventions against hand computations from Mixtral's weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmscope
from lmscope.core import moe
from tests.families import tiny_family_model


@pytest.fixture(scope="module")
def mixtral() -> lmscope.Model:
    return tiny_family_model("mixtral")


def _ids(m, seed=0):
    return torch.randint(3, m.d_vocab, (2, 7), generator=torch.Generator().manual_seed(seed))


def _hand_routing(m, layer, x):
    """Mixtral's routing by hand: softmax over the router logits, top-k, renormalised."""
    router = m.layer_module(layer, m.family.router)
    logits = x @ router.weight.T
    top = logits.softmax(-1).topk(moe.top_k(m, layer), dim=-1)
    dense = torch.zeros_like(logits).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    return logits, dense


def _hand_expert(m, layer, e, x):
    experts = m.layer_module(layer, m.family.experts)
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, experts.down_proj[e])


def test_sites_match_hand_computation(mixtral):
    m, layer = mixtral, 1
    sites = [f"blocks.{layer}.{k}" for k in ("mlp.in", "mlp.out", "moe.router", "moe.weights")]
    sites += [f"blocks.{layer}.moe.expert.{e}" for e in range(4)]
    run = m.run(_ids(m), capture=sites)
    c = run.cache
    x = c[f"blocks.{layer}.mlp.in"]
    logits, dense = _hand_routing(m, layer, x)
    torch.testing.assert_close(c[f"blocks.{layer}.moe.router"], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c[f"blocks.{layer}.moe.weights"], dense, rtol=1e-5, atol=1e-6)
    total = torch.zeros_like(x)
    for e in range(4):
        chosen = (dense[..., e] != 0)[..., None]
        hand = _hand_expert(m, layer, e, x) * chosen
        torch.testing.assert_close(c[f"blocks.{layer}.moe.expert.{e}"], hand, rtol=1e-4, atol=1e-5)
        total = total + dense[..., e, None] * hand
    torch.testing.assert_close(c[f"blocks.{layer}.mlp.out"], total, rtol=1e-4, atol=1e-5)


def test_forbid_and_force_reroute_with_the_routers_rule(mixtral):
    m, layer, ids = mixtral, 0, _ids(mixtral)
    base = m.run(ids, capture=[f"blocks.{layer}.moe.weights", f"blocks.{layer}.mlp.in"]).cache
    used = base[f"blocks.{layer}.moe.weights"]
    e = int((used != 0).sum((0, 1)).argmax())
    run = m.run(ids, capture=[f"blocks.{layer}.moe.weights"], interventions=[moe.forbid(layer, e)])
    w = run.cache[f"blocks.{layer}.moe.weights"]
    assert not bool((w[..., e] != 0).any())
    # the router's rule on the remaining experts: softmax over all but e, top-k, renormalised
    logits, _ = _hand_routing(m, layer, base[f"blocks.{layer}.mlp.in"])
    logits[..., e] = float("-inf")
    top = logits.softmax(-1).topk(2, dim=-1)
    hand = torch.zeros_like(logits).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(w, hand, rtol=1e-5, atol=1e-6)
    unused = int((used != 0).sum((0, 1)).argmin())
    forced = m.run(
        ids, capture=[f"blocks.{layer}.moe.weights"], interventions=[moe.force(layer, unused, positions=[2])]
    )
    fw = forced.cache[f"blocks.{layer}.moe.weights"]
    assert bool((fw[:, 2, unused] > 0).all())
    torch.testing.assert_close(fw[:, 3:], used[:, 3:])  # other positions keep their routing


def test_resect_equals_patching_the_expert_to_zero_and_scale_is_linear(mixtral):
    m, layer, ids = mixtral, 1, _ids(mixtral, seed=3)
    clean = m.run(ids, capture=[f"blocks.{layer}.moe.weights"])
    e = int((clean.cache[f"blocks.{layer}.moe.weights"] != 0).sum((0, 1)).argmax())
    resected = m.run(ids, interventions=[moe.resect(layer, e)]).logits
    zeroed = m.run(ids, interventions=[lmscope.zero(f"blocks.{layer}.moe.expert.{e}")]).logits
    torch.testing.assert_close(resected, zeroed, rtol=1e-5, atol=1e-5)
    assert (resected - clean.logits).abs().max() > 1e-3
    half = m.run(ids, capture=[f"blocks.{layer}.mlp.out"], interventions=[moe.scale(layer, e, 0.5)])
    base = m.run(
        ids, capture=[f"blocks.{layer}.mlp.out", f"blocks.{layer}.moe.expert.{e}", f"blocks.{layer}.moe.weights"]
    )
    w = base.cache[f"blocks.{layer}.moe.weights"][..., e, None]
    expected = base.cache[f"blocks.{layer}.mlp.out"] - 0.5 * w * base.cache[f"blocks.{layer}.moe.expert.{e}"]
    torch.testing.assert_close(half.cache[f"blocks.{layer}.mlp.out"], expected, rtol=1e-4, atol=1e-5)


def test_expert_patching_and_gradient(mixtral):
    m, layer = mixtral, 1
    a, b = _ids(m, 1), _ids(m, 2)
    site = f"blocks.{layer}.moe.expert.0"
    source = m.run(b, capture=[site]).cache
    patched = m.run(a, capture=[site], interventions=[lmscope.patch(site, source)])
    weights_a = m.run(a, capture=[f"blocks.{layer}.moe.weights"]).cache[f"blocks.{layer}.moe.weights"]
    # the patched value is the source's; its contribution is weighted by the run's own routing
    torch.testing.assert_close(patched.cache[site], source[site])
    run = m.run(a, capture=[site, f"blocks.{layer}.mlp.out"], grad=True)
    run.logits[:, -1].sum().backward()
    g_expert, g_out = run.cache[site].grad, run.cache[f"blocks.{layer}.mlp.out"].grad
    torch.testing.assert_close(g_expert, weights_a[..., 0, None] * g_out, rtol=1e-4, atol=1e-6)


def test_moe_site_errors(mixtral, tiny_models):
    with pytest.raises(lmscope.LmscopeError, match="expert 9 out of range"):
        mixtral.site("blocks.0.moe.expert.9")
    with pytest.raises(lmscope.LmscopeError, match="no mixture-of-experts block"):
        tiny_models["llama"].site("blocks.0.moe.router")
    with pytest.raises(lmscope.LmscopeError, match="name the expert"):
        mixtral.site("blocks.0.moe.expert")


def test_dense_and_moe_layers_mix():
    m = tiny_family_model("qwen2_moe")  # mlp_only_layers=[0]
    assert m.layers_with("experts") == [1, 2]
    run = m.run(_ids(m), capture=["blocks.0.mlp.post", "blocks.1.moe.weights"])
    assert run.cache["blocks.0.mlp.post"].shape[-1] == m.d_mlp
    assert run.cache["blocks.1.moe.weights"].shape[-1] == 4


def test_flattened_experts_dbrx():
    """DBRX stores its experts flattened ([n_experts * d_ffn, d_model]): routing sites, expert
    outputs and the per-expert weight views against a hand computation from those weights."""
    m, layer = tiny_family_model("dbrx"), 1
    views = moe.expert_weights(m, layer)
    assert {name: tuple(v.shape) for name, v in views.items()} == {f"mlp.{w}": (4, 32, 64) for w in ("w1", "v1", "w2")}
    sites = [f"blocks.{layer}.{k}" for k in ("mlp.in", "mlp.out", "moe.router", "moe.weights")]
    run = m.run(_ids(m), capture=[*sites, *(f"blocks.{layer}.moe.expert.{e}" for e in range(4))])
    c = run.cache
    x = c[f"blocks.{layer}.mlp.in"]
    logits = x @ m.layer_module(layer, "ffn.router.layer").weight.T
    top = logits.softmax(-1).topk(moe.top_k(m, layer), dim=-1)
    dense = torch.zeros_like(logits).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(c[f"blocks.{layer}.moe.router"], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c[f"blocks.{layer}.moe.weights"], dense, rtol=1e-5, atol=1e-6)
    total = torch.zeros_like(x)
    for e in range(4):
        w1, v1, w2 = (views[f"mlp.{w}"][e] for w in ("w1", "v1", "w2"))
        hand = (F.silu(x @ w1.T) * (x @ v1.T)) @ w2 * (dense[..., e] != 0)[..., None]
        torch.testing.assert_close(c[f"blocks.{layer}.moe.expert.{e}"], hand, rtol=1e-4, atol=1e-5)
        total = total + dense[..., e, None] * hand
    torch.testing.assert_close(c[f"blocks.{layer}.mlp.out"], total, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # a view writes the weight: zeroing expert e's rows zeroes its output
        views["mlp.w2"][0] = 0
    zeroed = m.run(_ids(m), capture=[f"blocks.{layer}.moe.expert.0"]).cache[f"blocks.{layer}.moe.expert.0"]
    assert not bool(zeroed.any())


def test_expert_weights_not_stored_per_expert(mixtral):
    from dataclasses import replace

    assert set(moe.expert_weights(mixtral, 0)) == {"gate_up_proj", "down_proj"}
    dbrx = tiny_family_model("dbrx")
    stacked = lmscope.Model(dbrx.hf, None, family=replace(dbrx.family, experts_flat=False))
    with pytest.raises(lmscope.LmscopeError, match=r"'mlp.w1' \(128, 64\) of layer 0 is not stored per expert"):
        moe.expert_weights(stacked, 0)


# -- Llama 4: sigmoid scores scale the experts' inputs; a shared expert on every token ----------


@pytest.fixture(scope="module")
def llama4() -> lmscope.Model:
    return tiny_family_model("llama4_text")


def _llama4_hand(m, layer, x, forbidden=()):
    """Llama 4's MoE block by hand from its weights: router logits, top-k, sigmoid scores (0 for
    the others); expert e applied to ``score_e * x``; the shared expert on ``x``."""
    block = m.layer_module(layer, "feed_forward")
    logits = x @ block.router.weight.T
    chosen = logits.clone()
    chosen[..., list(forbidden)] = float("-inf")
    top = chosen.topk(moe.top_k(m, layer), dim=-1)
    scores = torch.zeros_like(logits).scatter(-1, top.indices, torch.sigmoid(top.values))
    outs = []
    for e in range(moe.n_experts(m, layer)):
        gate, up = ((scores[..., e, None] * x) @ block.experts.gate_up_proj[e]).chunk(2, dim=-1)
        outs.append((up * F.silu(gate)) @ block.experts.down_proj[e])
    shared = block.shared_expert
    shared_out = shared.down_proj(F.silu(shared.gate_proj(x)) * shared.up_proj(x))
    return logits, scores, outs, shared_out


def test_llama4_sites_match_hand_computation(llama4):
    m, layer = llama4, 1
    n = moe.n_experts(m, layer)
    sites = [f"blocks.{layer}.{k}" for k in ("mlp.in", "mlp.out", "moe.router", "moe.weights")]
    run = m.run(_ids(m), capture=[*sites, *(f"blocks.{layer}.moe.expert.{e}" for e in range(n))])
    c = run.cache
    logits, scores, outs, shared = _llama4_hand(m, layer, c[f"blocks.{layer}.mlp.in"])
    torch.testing.assert_close(c[f"blocks.{layer}.moe.router"], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c[f"blocks.{layer}.moe.weights"], scores, rtol=1e-5, atol=1e-6)
    assert bool(((scores != 0).sum(-1) == moe.top_k(m, layer)).all())
    for e in range(n):
        torch.testing.assert_close(c[f"blocks.{layer}.moe.expert.{e}"], outs[e], rtol=1e-4, atol=1e-5)
        assert not bool(outs[e][scores[..., e] == 0].any())  # an expert not chosen contributes 0
    torch.testing.assert_close(c[f"blocks.{layer}.mlp.out"], shared + sum(outs), rtol=1e-4, atol=1e-5)


def test_llama4_forbid_reroutes_and_resect_removes(llama4):
    m, layer, ids = llama4, 0, _ids(llama4, seed=4)
    base = m.run(ids, capture=[f"blocks.{layer}.moe.weights", f"blocks.{layer}.mlp.in"]).cache
    e = int((base[f"blocks.{layer}.moe.weights"] != 0).sum((0, 1)).argmax())
    x = base[f"blocks.{layer}.mlp.in"]
    run = m.run(
        ids, capture=[f"blocks.{layer}.moe.weights", f"blocks.{layer}.mlp.out"], interventions=[moe.forbid(layer, e)]
    )
    _, scores, outs, shared = _llama4_hand(m, layer, x, forbidden=[e])
    torch.testing.assert_close(run.cache[f"blocks.{layer}.moe.weights"], scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run.cache[f"blocks.{layer}.mlp.out"], shared + sum(outs), rtol=1e-4, atol=1e-5)
    resected = m.run(ids, capture=[f"blocks.{layer}.mlp.out"], interventions=[moe.resect(layer, e)])
    _, scores, outs, shared = _llama4_hand(m, layer, x)
    kept = sum(o for i, o in enumerate(outs) if i != e)
    torch.testing.assert_close(resected.cache[f"blocks.{layer}.mlp.out"], shared + kept, rtol=1e-4, atol=1e-5)


def test_llama4_expert_patching_and_gradient(llama4):
    m, layer = llama4, 2
    a, b = _ids(m, 1), _ids(m, 2)
    site, out = f"blocks.{layer}.moe.expert.1", f"blocks.{layer}.mlp.out"
    source = m.run(b, capture=[site]).cache
    base = m.run(a, capture=[site, out]).cache
    patched = m.run(a, capture=[site, out], interventions=[lmscope.patch(site, source)]).cache
    torch.testing.assert_close(patched[site], source[site])
    # the expert's whole contribution is replaced (its routing weight acted on its input)
    torch.testing.assert_close(patched[out], base[out] - base[site] + source[site], rtol=1e-4, atol=1e-5)
    run = m.run(a, capture=[site, out], grad=True)
    run.logits[:, -1].sum().backward()
    torch.testing.assert_close(run.cache[site].grad, run.cache[out].grad, rtol=1e-4, atol=1e-6)

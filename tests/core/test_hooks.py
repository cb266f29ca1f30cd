"""Capture and intervention correctness against independent references (the plain HF
forward, hand computations from weights, weight surgery), for every family and SmolLM2."""

from __future__ import annotations

import gc

import pytest
import torch

import lmscope
from lmscope.core.sites import LAYER_KINDS
from tests.reference import hand_qkv
from tests.tiny import random_ids


def _ids(model):
    if model.tokenizer is not None:
        return model.tokenize(["When Mary and John went to the store, John gave a drink to"])[0]
    return random_ids(model)


def _plain(model, ids, **kw):
    with torch.no_grad():
        return model.hf(input_ids=ids, use_cache=False, **kw)


def _all_sites_but_pattern(model):
    sites = ["embed", "final_norm", "logits"]
    for layer in range(model.n_layers):
        sites += [f"blocks.{layer}.{k}" for k in LAYER_KINDS if k != "attn.pattern" and model._has(k)]
    return sites


def test_no_intervention_logits_bitwise_equal(any_model):
    ids = _ids(any_model)
    ref = _plain(any_model, ids).logits
    run = any_model.run(ids, capture=_all_sites_but_pattern(any_model))
    assert torch.equal(run.logits, ref)
    assert torch.equal(run.cache["logits"], ref)


def test_resid_post_equals_hf_hidden_states(any_model):
    ids = _ids(any_model)
    hidden = _plain(any_model, ids, output_hidden_states=True).hidden_states
    n = any_model.n_layers
    run = any_model.run(ids, capture=[f"blocks.{L}.resid_post" for L in range(n)] + ["embed", "final_norm"])
    # HF: hidden_states[0] enters layer 0, hidden_states[L+1] leaves layer L; the last entry is
    # after the final norm.
    for layer in range(n - 1):
        assert torch.equal(run.cache[f"blocks.{layer}.resid_post"], hidden[layer + 1]), layer
    assert torch.equal(run.cache["final_norm"], hidden[n])
    pre0 = any_model.run(ids, capture=["blocks.0.resid_pre"]).cache["blocks.0.resid_pre"]
    assert torch.equal(pre0, hidden[0])


def test_resid_chain_is_consistent(any_model):
    """resid_pre(L+1) == resid_post(L); resid_mid == resid_pre + attention contribution."""
    ids = _ids(any_model)
    sites = [f"blocks.{L}.{k}" for L in range(2) for k in ("resid_pre", "resid_post")]
    cache = any_model.run(ids, capture=sites).cache
    assert torch.equal(cache["blocks.1.resid_pre"], cache["blocks.0.resid_post"])


def test_z_through_o_proj_reproduces_attn_out(any_model):
    ids = _ids(any_model)
    layer = any_model.n_layers - 1
    cache = any_model.run(ids, capture=[f"blocks.{layer}.attn.z", f"blocks.{layer}.attn.out"]).cache
    z = cache[f"blocks.{layer}.attn.z"]  # [batch, pos, heads, d_head]
    o = any_model.layer_module(layer, any_model.family.o_proj)
    w = o.weight if any_model.family.conv1d else o.weight.T  # [heads * d_head, d_model]
    per_head = torch.einsum("bphd,hdm->bphm", z, w.unflatten(0, (any_model.n_heads, any_model.d_head)))
    out = per_head.sum(2) + (o.bias if o.bias is not None else 0)
    torch.testing.assert_close(out, cache[f"blocks.{layer}.attn.out"], atol=1e-5, rtol=1e-5)


def test_qkv_match_hand_computation(any_model):
    ids = _ids(any_model)
    layer = 1
    q, k, v = hand_qkv(any_model, layer, ids)
    cache = any_model.run(ids, capture=[f"blocks.{layer}.attn.{s}" for s in "qkv"]).cache
    assert cache[f"blocks.{layer}.attn.k"].shape[2] == any_model.n_kv_heads
    assert cache[f"blocks.{layer}.attn.q"].shape[2] == any_model.n_heads
    for name, ref in zip("qkv", (q, k, v)):
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.{name}"], ref, atol=1e-4, rtol=1e-4)


def test_pattern_rows_are_causal_distributions(any_model):
    ids = _ids(any_model)
    impl = any_model.hf.config._attn_implementation
    run = any_model.run(ids, capture=["blocks.0.attn.pattern", "blocks.0.attn.pattern.1"])
    p = run.cache["blocks.0.attn.pattern"]
    assert p.shape == (ids.shape[0], any_model.n_heads, ids.shape[1], ids.shape[1])
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5, rtol=0)
    assert torch.all(p.triu(1) == 0)
    assert torch.equal(run.cache["blocks.0.attn.pattern.1"], p[:, 1])
    assert any_model.hf.config._attn_implementation == impl  # eager only while requested
    torch.testing.assert_close(run.logits, _plain(any_model, ids).logits, atol=1e-4, rtol=1e-4)


def test_zero_head_equals_zeroing_o_proj_columns(any_model):
    ids = _ids(any_model)
    layer, head = any_model.n_layers // 2, any_model.n_heads - 1
    ablated = any_model.run(ids, interventions=[lmscope.zero(f"blocks.{layer}.attn.z.{head}")]).logits
    o = any_model.layer_module(layer, any_model.family.o_proj)
    d = any_model.d_head
    saved = o.weight.detach().clone()
    try:
        with torch.no_grad():
            if any_model.family.conv1d:
                o.weight[head * d : (head + 1) * d, :] = 0
            else:
                o.weight[:, head * d : (head + 1) * d] = 0
        ref = _plain(any_model, ids).logits
    finally:
        with torch.no_grad():
            o.weight.copy_(saved)
    torch.testing.assert_close(ablated, ref, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ablated, _plain(any_model, ids).logits)


def test_pattern_intervention_recomputes_z(tiny_models):
    """Setting a head's pattern to attend only to position 0 makes its z equal v at 0."""
    m = tiny_models["llama"]
    ids = random_ids(m)
    group = m.n_heads // m.n_kv_heads

    def to_first(p):
        out = torch.zeros_like(p)
        out[..., 0] = 1
        return out

    run = m.run(
        ids,
        capture=["blocks.1.attn.z", "blocks.1.attn.v"],
        interventions=[lmscope.apply("blocks.1.attn.pattern", to_first, head=3)],
    )
    z, v = run.cache["blocks.1.attn.z"], run.cache["blocks.1.attn.v"]
    expected = v[:, :1, 3 // group].expand_as(z[:, :, 3])
    torch.testing.assert_close(z[:, :, 3], expected, atol=1e-6, rtol=0)


def _hook_ids(model) -> dict:
    """Every forward hook and pre-hook on the model (transformers installs some of its own)."""
    return {name: (tuple(mod._forward_hooks), tuple(mod._forward_pre_hooks)) for name, mod in model.hf.named_modules()}


def test_hooks_removed_when_forward_raises(tiny_models):
    m = tiny_models["llama"]
    ids = random_ids(m)
    impl = m.hf.config._attn_implementation
    hooks_before = _hook_ids(m)

    def boom(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        m.run(
            ids,
            capture=["blocks.0.attn.q", "blocks.0.attn.pattern", "blocks.1.resid_mid"],
            interventions=[lmscope.apply("blocks.1.mlp.out", boom)],
        )
    assert _hook_ids(m) == hooks_before
    assert not any("_lmscope_session" in mod.__dict__ for mod in m.hf.modules())
    assert m.hf.config._attn_implementation == impl
    assert torch.equal(m.run(ids).logits, _plain(m, ids).logits)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_memory_does_not_grow_over_a_thousand_traces(tiny_models):
    m = tiny_models["llama"]
    ids = random_ids(m)
    sites = ["blocks.0.attn.z", "blocks.1.attn.pattern", "blocks.2.resid_mid", "logits"]
    ivs = [lmscope.zero("blocks.1.attn.z.0")]
    hooks_before = _hook_ids(m)
    for _ in range(50):
        m.run(ids, capture=sites, interventions=ivs)
    gc.collect()
    before = _rss_mb()
    for _ in range(1000):
        m.run(ids, capture=sites, interventions=ivs)
    gc.collect()
    assert _rss_mb() - before < 20
    assert _hook_ids(m) == hooks_before


# -- the primitive and the hook-point table ---------------------------------------------------


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())


def test_a_new_hook_point_is_one_table_entry(monkeypatch, tiny_models):
    """A hook point added to HOOK_POINTS works at once: the input of the MLP's down projection,
    declared here, reads what the mlp.post site captures, and writing it changes the output."""
    from lmscope.core.hookpoints import HOOK_POINTS, HookPoint
    from lmscope.core.hooks import Hook, hooked

    model = tiny_models["llama"]
    monkeypatch.setitem(HOOK_POINTS, "mlp.down_in", HookPoint(("mlp_down",), "pre"))
    ids = random_ids(model)
    before = _hook_count(model)
    seen = {}
    with torch.no_grad(), hooked(model, [Hook("mlp.down_in", 1, lambda x: seen.update(x=x))]):
        plain = model.hf(input_ids=ids).logits
    reference = model.run(ids, capture=["blocks.1.mlp.post"]).cache["blocks.1.mlp.post"]
    torch.testing.assert_close(seen["x"], reference, rtol=0, atol=0)
    with torch.no_grad(), hooked(model, [Hook("mlp.down_in", 1, torch.zeros_like)]):
        zeroed = model.hf(input_ids=ids).logits
    expected = model.run(ids, interventions=[lmscope.zero("blocks.1.mlp.post")]).logits
    torch.testing.assert_close(zeroed, expected, rtol=0, atol=0)
    assert not torch.equal(zeroed, plain)
    assert _hook_count(model) == before


def test_primitive_removes_its_hooks_when_the_forward_raises(tiny_models):
    from lmscope.core.hooks import Hook, hooked

    model = tiny_models["gpt2"]

    def boom(x):
        raise RuntimeError("boom")

    before = _hook_count(model)
    hooks = [Hook("attn.z", layer, boom) for layer in range(model.n_layers)] + [Hook("linears.in", 0, lambda x: None)]
    with pytest.raises(RuntimeError, match="boom"), hooked(model, hooks):
        model.hf(input_ids=random_ids(model))
    assert _hook_count(model) == before


def test_unknown_or_missing_hook_points_are_clear_errors(tiny_models):
    from lmscope.core.hooks import Hook, hooked

    model = tiny_models["gpt2"]  # no key norm
    before = _hook_count(model)
    with pytest.raises(lmscope.LmscopeError, match="unknown hook point"), hooked(model, [Hook("attn.nope", 0, id)]):
        pass
    hooks = [Hook("attn.z", 0, lambda x: None), Hook("attn.k_norm", 0, lambda x: None)]
    with pytest.raises(lmscope.LmscopeError, match="no hook point 'attn.k_norm'"), hooked(model, hooks):
        pass
    assert _hook_count(model) == before


@pytest.mark.parametrize("family", ["opt", "llama4_text"])
def test_gradient_reaches_a_flattened_mlp_output(family):
    """OPT's MLP and Llama 4's MoE run on tokens flattened to [batch * pos, d_model]: the captured
    [batch, pos, d_model] view is written back so its gradient fills, and equals the gradient of
    the residual stream it is added to (resid_post = resid_mid + mlp.out)."""
    from tests.families import tiny_family_model

    m = tiny_family_model(family)
    ids = torch.randint(3, m.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    run = m.run(ids, capture=["blocks.1.mlp.out", "blocks.1.resid_post"], grad=True)
    run.logits[:, -1].sum().backward()
    g_mlp, g_resid = run.cache["blocks.1.mlp.out"].grad, run.cache["blocks.1.resid_post"].grad
    assert g_mlp is not None and g_mlp.abs().sum() > 0
    torch.testing.assert_close(g_mlp, g_resid)

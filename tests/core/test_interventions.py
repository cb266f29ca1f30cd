"""Interventions checked against references that do not use lmscope's hooks: the clean run,
the unembedding applied by hand, the final norm applied by hand, GQA head grouping."""

from __future__ import annotations

import pytest
import torch

import lmscope
from tests.tiny import random_ids


@pytest.fixture
def llama(tiny_models):
    return tiny_models["llama"]


def _unembed(model, x):
    return model.module(model.family.unembed)(x)


def test_patch_whole_residual_restores_clean_run(llama):
    clean, corrupt = random_ids(llama, seed=1), random_ids(llama, seed=2)
    clean_run = llama.run(clean, capture=["blocks.1.resid_post"])
    patched = llama.run(corrupt, interventions=[lmscope.patch("blocks.1.resid_post", clean_run.cache)])
    assert torch.equal(patched.logits, clean_run.logits)


def test_patch_one_position_at_last_layer(llama):
    clean, corrupt = random_ids(llama, seed=1), random_ids(llama, seed=2)
    last = f"blocks.{llama.n_layers - 1}.resid_post"
    clean_run = llama.run(clean, capture=[last])
    corrupt_logits = llama.run(corrupt).logits
    patched = llama.run(corrupt, interventions=[lmscope.patch(last, clean_run.cache, positions=[3])]).logits
    torch.testing.assert_close(patched[:, 3], clean_run.logits[:, 3])
    others = [p for p in range(clean.shape[1]) if p != 3]
    torch.testing.assert_close(patched[:, others], corrupt_logits[:, others])


def test_resid_mid_patch_restores_clean_run(any_model):
    if not any_model._has("resid_mid"):
        with pytest.raises(lmscope.LmscopeError, match="parallel"):
            any_model.run(random_ids(any_model), capture=["blocks.0.resid_mid"])
        return
    clean, corrupt = random_ids(any_model, seed=1), random_ids(any_model, seed=2)
    clean_run = any_model.run(clean, capture=["blocks.1.resid_mid"])
    patched = any_model.run(corrupt, interventions=[lmscope.patch("blocks.1.resid_mid", clean_run.cache)])
    torch.testing.assert_close(patched.logits, clean_run.logits, atol=1e-4, rtol=1e-4)


def test_add_to_final_norm_shifts_logits_by_unembedded_vector(llama):
    ids = random_ids(llama)
    vec = torch.randn(llama.d_model)
    base = llama.run(ids).logits
    steered = llama.run(ids, interventions=[lmscope.add("final_norm", vec, coeff=2.0, positions=-1)]).logits
    with torch.no_grad():
        expected = base[:, -1] + _unembed(llama, 2.0 * vec)
    torch.testing.assert_close(steered[:, -1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steered[:, :-1], base[:, :-1])


def test_mean_ablation_of_last_residual(llama):
    ids = random_ids(llama)
    value = torch.randn(llama.d_model)
    last = f"blocks.{llama.n_layers - 1}.resid_post"
    run = llama.run(ids, interventions=[lmscope.mean(last, value, positions=[0, 2])])
    norm = llama.module(llama.family.final_norm)
    with torch.no_grad():
        expected = _unembed(llama, norm(value))
    torch.testing.assert_close(run.logits[:, 0], expected.expand_as(run.logits[:, 0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run.logits[:, 2], expected.expand_as(run.logits[:, 2]), atol=1e-5, rtol=1e-5)


def test_interventions_compose_in_order(llama):
    ids = random_ids(llama)
    vec = torch.randn(llama.d_model)
    zero_then_add = llama.run(ids, interventions=[lmscope.zero("final_norm"), lmscope.add("final_norm", vec)])
    add_then_zero = llama.run(ids, interventions=[lmscope.add("final_norm", vec), lmscope.zero("final_norm")])
    with torch.no_grad():
        expected = _unembed(llama, vec)
    torch.testing.assert_close(zero_then_add.logits, expected.expand_as(zero_then_add.logits))
    assert torch.all(add_then_zero.logits == 0)


def test_zero_value_head_zeroes_its_query_group(llama):
    """With grouped-query attention, KV head k serves query heads k*g .. k*g+g-1."""
    ids = random_ids(llama)
    g = llama.n_heads // llama.n_kv_heads
    run = llama.run(ids, capture=["blocks.0.attn.z"], interventions=[lmscope.zero("blocks.0.attn.v", head=1)])
    z = run.cache["blocks.0.attn.z"]
    for h in range(llama.n_heads):
        assert torch.all(z[:, :, h] == 0) == (h // g == 1), h


def test_mean_per_position_statistics(llama):
    ids = random_ids(llama)
    cache = llama.run(ids, capture=["blocks.0.attn.z"]).cache
    mean_z = cache["blocks.0.attn.z"].mean(0)  # [pos, heads, d_head]
    run = llama.run(ids, capture=["blocks.0.attn.z"], interventions=[lmscope.mean("blocks.0.attn.z", mean_z, head=2)])
    z = run.cache["blocks.0.attn.z"]
    assert torch.equal(z[:, :, 2], mean_z[:, 2].expand_as(z[:, :, 2]))
    assert torch.equal(z[:, :, 0], cache["blocks.0.attn.z"][:, :, 0])


def test_patch_rejects_mismatched_batch(llama):
    source = llama.run(random_ids(llama, batch=3), capture=["blocks.0.resid_post"]).cache
    with pytest.raises(lmscope.LmscopeError, match="batch"):
        llama.run(random_ids(llama, batch=2), interventions=[lmscope.patch("blocks.0.resid_post", source)])


def test_patch_source_missing_site(llama):
    with pytest.raises(lmscope.LmscopeError, match="no 'blocks.0.attn.z'"):
        lmscope.patch("blocks.0.attn.z", lmscope.ActivationCache())


def _greedy_reference(model, ids, interventions, steps):
    """Generation as a naive loop: one full forward (no KV cache) per new token."""
    for _ in range(steps):
        logits = model.run(ids, interventions=interventions).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2"])
def test_generate_with_interventions_equals_naive_loop(tiny_models, name):
    model = tiny_models[name]
    ids = random_ids(model, batch=1, pos=6)
    vec = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))  # not the global RNG's
    ivs = [
        lmscope.add("blocks.1.resid_post", vec, coeff=3.0),
        lmscope.zero("blocks.0.attn.k", positions=[2], head=0),
        lmscope.zero("blocks.2.attn.z.1", positions=[-1]),
    ]
    out = model.generate(ids, ivs, max_new_tokens=6, capture=["blocks.1.resid_post"])
    ref = _greedy_reference(model, ids, ivs, 6)
    assert torch.equal(out.ids, ref)
    assert not torch.equal(out.ids, model.generate(ids, max_new_tokens=6).ids)
    assert out.cache["blocks.1.resid_post"].shape[1] == ref.shape[1] - 1


def test_generate_smollm2_with_steering(smollm2):
    prompt = "The capital of France is"
    plain = smollm2.generate(prompt, max_new_tokens=4).texts[0]
    assert "Paris" in plain
    ids = smollm2.tokenize(prompt)[0]
    vec = torch.randn(smollm2.d_model, generator=torch.Generator().manual_seed(0))
    ivs = [lmscope.add("blocks.10.resid_post", vec, coeff=8.0)]
    steered = smollm2.generate(prompt, ivs, max_new_tokens=4)
    assert torch.equal(steered.ids, _greedy_reference(smollm2, ids, ivs, 4))

"""Model.run: padding, early stop, gradients, site validation."""

from __future__ import annotations

import pytest
import torch

import lmscope
from tests.tiny import random_ids


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_single_runs(smollm2, side):
    texts = ["The capital of France is", "When Mary and John went to the store, John gave a drink to"]
    batch = smollm2.run(texts, capture=["blocks.12.resid_post", "blocks.12.attn.z"], padding_side=side)
    for i, text in enumerate(texts):
        single = smollm2.run(text, capture=["blocks.12.resid_post", "blocks.12.attn.z"])
        n = single.input_ids.shape[1]
        real = batch.attention_mask[i].bool()
        assert int(real.sum()) == n
        torch.testing.assert_close(batch.logits[i, real], single.logits[0], atol=1e-4, rtol=1e-4)
        for site in ("blocks.12.resid_post", "blocks.12.attn.z"):
            torch.testing.assert_close(batch.cache[site][i, real], single.cache[site][0], atol=1e-4, rtol=1e-4)


def test_stop_after_layer(tiny_models):
    m = tiny_models["qwen2"]
    ids = random_ids(m)
    full = m.run(ids, capture=["blocks.1.resid_post"])
    early = m.run(ids, capture=["blocks.1.resid_post"], stop_after=1)
    assert early.logits is None
    assert torch.equal(early.cache["blocks.1.resid_post"], full.cache["blocks.1.resid_post"])
    with pytest.raises(lmscope.LmscopeError, match="stops after layer 1"):
        m.run(ids, capture=["blocks.2.resid_post"], stop_after=1)


def test_grad_flows_to_captured_sites(tiny_models):
    m = tiny_models["llama"]
    ids = random_ids(m)
    last = f"blocks.{m.n_layers - 1}.resid_post"
    run = m.run(ids, capture=[last], grad=True)
    run.logits[:, -1, 5].sum().backward()
    resid = run.cache[last]
    # reference: the same gradient through the final norm and unembedding applied by hand
    x = resid.detach().clone().requires_grad_(True)
    logit = m.module(m.family.unembed)(m.module(m.family.final_norm)(x))[:, -1, 5].sum()
    (ref,) = torch.autograd.grad(logit, x)
    torch.testing.assert_close(resid.grad, ref)
    m.hf.zero_grad(set_to_none=True)


def test_no_grad_by_default_and_cpu_copies(tiny_models):
    m = tiny_models["llama"]
    run = m.run(random_ids(m), capture=["blocks.0.attn.z"], to_cpu=True)
    assert not run.cache["blocks.0.attn.z"].requires_grad
    assert run.cache["blocks.0.attn.z"].device.type == "cpu"


@pytest.mark.parametrize(
    "site, message",
    [
        ("blocks.99.resid_post", "layer 99 out of range"),
        ("blocks.0.attn.z.9", "head 9 out of range"),
        ("blocks.0.attn.k.3", "head 3 out of range"),
        ("blocks.0.resid_post.1", "has no heads"),
        ("blocks.0.attn.zz", "unknown site"),
        ("resid", "unknown site"),
    ],
)
def test_bad_sites_are_clear_errors(smollm2, site, message):
    with pytest.raises(lmscope.LmscopeError, match=message):
        smollm2.run("hi", capture=[site])


def test_site_shapes_match_captures(tiny_models):
    m = tiny_models["gemma2"]
    ids = random_ids(m, batch=2, pos=7)
    shapes = dict(m.site_shapes(batch=2, pos=7))
    cache = m.run(ids, capture=list(shapes)).cache
    for name, shape in shapes.items():
        assert tuple(cache[name].shape) == shape, name


def test_no_state_visible_after_a_run(smollm2):
    """A run changes neither the shared tokenizer nor the model's config (attention setting)."""
    tokenizer, config = smollm2.tokenizer, smollm2.hf.config
    side, impl = tokenizer.padding_side, config._attn_implementation
    run = smollm2.run(["a b c", "a"], capture=["blocks.0.attn.pattern", "blocks.0.attn.q"], padding_side="left")
    assert run.attention_mask[1, 0] == 0  # left-padded as asked
    assert tokenizer.padding_side == side and config._attn_implementation == impl
    with pytest.raises(RuntimeError), smollm2.hooks(["blocks.0.attn.pattern"]):
        raise RuntimeError
    assert config._attn_implementation == impl

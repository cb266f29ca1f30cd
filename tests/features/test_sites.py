"""Dictionaries attached as sites: captures checked against the dictionary applied by hand to a
plain Hugging Face forward's activations (``output_hidden_states`` or a forward hook of the test's
own), edits against the same edit made by such a hook, the spliced forward against the plain one."""

from __future__ import annotations

import pytest
import torch

import lmscope
from lmscope.core import add, apply, patch, zero
from lmscope.core.sites import site_providers
from lmscope.features import Dictionary, attach, clamp, detach, scale
from tests.tiny import random_ids, tiny_model


@pytest.fixture(scope="module")
def llama() -> lmscope.Model:
    return tiny_model("llama")


def _random(d_in: int, d_sae: int, arch: str = "topk", seed: int = 0, **kw) -> Dictionary:
    d = Dictionary(d_in, d_sae, arch, k=8 if arch == "topk" else None, **kw).init_(seed, scale=0.5)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name in ("b_enc", "b_dec", "threshold"):
            if hasattr(d, name):
                getattr(d, name).copy_(torch.rand(getattr(d, name).shape, generator=g) * 0.2)
        if d.skip:
            d.W_skip.copy_(torch.randn(d.W_skip.shape, generator=g) * 0.1)
    return d


@pytest.fixture
def sae(llama):
    """A random top-k dictionary attached at blocks.1.resid_post as 'sae', detached after the test."""
    d = _random(llama.d_model, 128, site="blocks.1.resid_post")
    with attach(llama, d, "sae"):
        yield d
    assert [p.name for p in site_providers()] == ["dense", "moe", "monet"]


def _hf_hidden(model, ids, layer):
    with torch.no_grad():
        return model.hf(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]


def _hooked_logits(model, ids, module, fn, **kwargs):
    """Logits of a plain Hugging Face forward whose ``module`` output goes through ``fn(output,
    input)`` (a hook of the test's own)."""

    def hook(mod, args, kw, out):
        x_in = args[0] if args else kw["hidden_states"]
        if isinstance(out, tuple):
            return (fn(out[0], x_in), *out[1:])
        return fn(out, x_in)

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            return model.hf(input_ids=ids, **kwargs).logits
    finally:
        handle.remove()


def test_sites_parse_list_and_detach(llama, sae):
    assert llama.site("blocks.1.resid_post.sae.features.5").head == 5
    shapes = dict(llama.site_shapes(2, 5))
    assert shapes["blocks.1.resid_post.sae.features"] == (2, 5, 128)
    assert shapes["blocks.1.resid_post.sae.error"] == (2, 5, llama.d_model)
    for bad, message in [
        ("blocks.0.resid_post.sae.features", "no dictionary 'sae' there"),
        ("blocks.1.resid_post.sae.features.128", "feature 128 out of range"),
    ]:
        with pytest.raises(lmscope.LmscopeError, match=message) as info:
            llama.site(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(lmscope.LmscopeError, match="already attached"):
        attach(llama, sae, "sae")


def test_capture_is_the_encoding_and_the_forward_is_unchanged(llama, sae):
    ids = random_ids(llama, batch=2, pos=7)
    run = llama.run(ids, capture=["blocks.1.resid_post.sae.features", "blocks.1.resid_post.sae.error"])
    x = _hf_hidden(llama, ids, 1)
    with torch.no_grad():
        f = sae.encode(x)
        torch.testing.assert_close(run.cache["blocks.1.resid_post.sae.features"], f, rtol=0, atol=1e-6)
        torch.testing.assert_close(run.cache["blocks.1.resid_post.sae.error"], x - sae.decode(f), rtol=0, atol=1e-6)
        assert (f != 0).sum(-1).eq(8).all()  # k = 8 per token
        plain = llama.hf(input_ids=ids).logits
    assert torch.equal(run.logits, plain)  # nothing edited: bitwise the model's own forward


def test_the_spliced_forward_reproduces_the_model(llama, sae):
    """decode(f) + error in place of the site gives the original forward (edits that change nothing)."""
    ids = random_ids(llama, batch=2, pos=7)
    with torch.no_grad():
        plain = llama.hf(input_ids=ids).logits
    for edits in (
        [scale("blocks.1.resid_post.sae.features", 1.0)],
        [apply("blocks.1.resid_post.sae.error", lambda e: e + 0.0)],  # the whole decode(f') + error' path
    ):
        torch.testing.assert_close(llama.run(ids, interventions=edits).logits, plain, rtol=1e-5, atol=1e-5)


def test_zeroing_a_feature_subtracts_its_decoder_row(llama, sae):
    ids = random_ids(llama, batch=2, pos=7)
    x = _hf_hidden(llama, ids, 1)
    with torch.no_grad():
        f = sae.encode(x)
    i = int(f[0, 3].argmax())  # a feature active at (0, 3)
    run = llama.run(ids, interventions=[zero("blocks.1.resid_post.sae.features", positions=[3], head=i)])

    def by_hand(out, _):
        out = out.clone()
        with torch.no_grad():
            fi = sae.encode(out)[:, 3, i]
        out[:, 3] -= fi[:, None] * sae.W_dec[i]
        return out

    hand = _hooked_logits(llama, ids, llama.layer_module(1, ""), by_hand)
    torch.testing.assert_close(run.logits, hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(run.logits, llama.run(ids).logits, atol=1e-4)


def test_clamp_and_capture_after_the_edit(llama, sae):
    ids = random_ids(llama, batch=1, pos=6)
    site = "blocks.1.resid_post.sae.features"
    run = llama.run(ids, capture=[site, "blocks.1.resid_post"], interventions=[clamp(site, 3.0, feature=7)])
    assert torch.all(run.cache[site][..., 7] == 3.0)
    x = _hf_hidden(llama, ids, 1)
    with torch.no_grad():
        f = sae.encode(x)
        want = x + (3.0 - f[..., 7:8]) * sae.W_dec[7]
    torch.testing.assert_close(run.cache["blocks.1.resid_post"], want, rtol=1e-5, atol=1e-5)  # the spliced site


def test_patch_features_from_another_run(llama, sae):
    site = "blocks.1.resid_post.sae.features"
    source_ids, ids = random_ids(llama, batch=1, pos=7, seed=3), random_ids(llama, batch=1, pos=7, seed=4)
    source = llama.run(source_ids, capture=[site]).cache
    run = llama.run(ids, interventions=[patch(site, source, positions=[-1])])
    with torch.no_grad():
        f_src = sae.encode(_hf_hidden(llama, source_ids, 1))

    def by_hand(out, _):
        out = out.clone()
        with torch.no_grad():
            out[:, -1] += (f_src[:, -1] - sae.encode(out)[:, -1]) @ sae.W_dec
        return out

    hand = _hooked_logits(llama, ids, llama.layer_module(1, ""), by_hand)
    torch.testing.assert_close(run.logits, hand, rtol=1e-5, atol=1e-5)


def test_generation_with_a_feature_steered(llama, sae):
    ids = random_ids(llama, batch=1, pos=5)
    site = "blocks.1.resid_post.sae.features"
    steer = torch.zeros(128)
    steer[11] = 4.0
    out = llama.generate(ids, interventions=[add(site, steer)], capture=[site], max_new_tokens=4)
    assert out.cache[site].shape == (1, 5 + 4 - 1, 128)  # prompt and generated positions (the last token is not run)
    assert torch.all(out.cache[site][..., 11] >= 4.0)

    def by_hand(o, _):
        return o + 4.0 * sae.W_dec[11]

    handle = llama.layer_module(1, "").register_forward_hook(
        lambda m, a, o: (by_hand(o[0], None), *o[1:]) if isinstance(o, tuple) else by_hand(o, None)
    )
    try:
        with torch.no_grad():
            hand = llama.hf.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0
            )
    finally:
        handle.remove()
    assert torch.equal(out.ids, hand)
    plain = llama.generate(ids, max_new_tokens=4)
    assert not torch.equal(plain.ids, hand)


def test_feature_gradients_are_the_decoder_applied_to_the_site_gradient(llama, sae):
    ids = random_ids(llama, batch=1, pos=5)
    site = "blocks.1.resid_post.sae.features"
    with llama.frozen():
        run = llama.run(ids, capture=[site, "blocks.1.resid_post", "blocks.0.resid_post"], grad=True)
        run.logits[0, -1, 5].backward()
        plain = llama.run(ids, capture=["blocks.1.resid_post", "blocks.0.resid_post"], grad=True)
        plain.logits[0, -1, 5].backward()
    torch.testing.assert_close(run.logits, plain.logits, rtol=1e-5, atol=1e-5)
    g = plain.cache["blocks.1.resid_post"].grad
    torch.testing.assert_close(run.cache[site].grad, g @ sae.W_dec.T, rtol=1e-4, atol=1e-6)
    # upstream gradients are the model's own: the error term carries the rest
    torch.testing.assert_close(
        run.cache["blocks.0.resid_post"].grad, plain.cache["blocks.0.resid_post"].grad, rtol=1e-4, atol=1e-6
    )


def test_transcoder_reads_mlp_in_and_rewrites_mlp_out(llama):
    tc = _random(
        llama.d_model,
        96,
        "jumprelu",
        seed=2,
        transcoder=True,
        skip=True,
        site="blocks.2.mlp.in",
        out_site="blocks.2.mlp.out",
    )
    ids = random_ids(llama, batch=2, pos=6)
    mlp = llama.layer_module(2, llama.family.mlp)
    with attach(llama, tc, "tc") as att:
        assert att.sites == ["blocks.2.mlp.in.tc.features", "blocks.2.mlp.out.tc.error"]
        run = llama.run(ids, capture=[*att.sites, "blocks.2.mlp.in", "blocks.2.mlp.out"])
        x_in, x_out = run.cache["blocks.2.mlp.in"], run.cache["blocks.2.mlp.out"]
        with torch.no_grad():
            f = tc.encode(x_in)
            torch.testing.assert_close(run.cache["blocks.2.mlp.in.tc.features"], f, rtol=0, atol=1e-6)
            torch.testing.assert_close(
                run.cache["blocks.2.mlp.out.tc.error"], x_out - tc.decode(f, x_in), rtol=0, atol=1e-6
            )
            assert torch.equal(run.logits, llama.hf(input_ids=ids).logits)
        i = int(f[1, 2].argmax())
        edited = llama.run(ids, interventions=[zero("blocks.2.mlp.in.tc.features", positions=[2], head=i)])
        zero_error = llama.run(ids, interventions=[zero("blocks.2.mlp.out.tc.error")])

    def by_hand(out, x):
        out = out.clone()
        with torch.no_grad():
            out[:, 2] -= tc.encode(x)[:, 2, i : i + 1] * tc.W_dec[i]
        return out

    def replaced(out, x):  # the MLP replaced by the transcoder
        with torch.no_grad():
            return tc(x)

    torch.testing.assert_close(edited.logits, _hooked_logits(llama, ids, mlp, by_hand), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zero_error.logits, _hooked_logits(llama, ids, mlp, replaced), rtol=1e-5, atol=1e-5)


def test_attn_z_dictionary_reads_heads_flattened(llama):
    d = _random(llama.n_heads * llama.d_head, 48, "standard", seed=3, site="blocks.0.attn.z")
    ids = random_ids(llama, batch=1, pos=6)
    with attach(llama, d, "z"):
        run = llama.run(ids, capture=["blocks.0.attn.z.z.features", "blocks.0.attn.z"])
        edited = llama.run(ids, interventions=[zero("blocks.0.attn.z.z.features")], capture=["blocks.0.attn.z"])
    with torch.no_grad():
        z = run.cache["blocks.0.attn.z"]
        f = d.encode(z.flatten(-2))
        torch.testing.assert_close(run.cache["blocks.0.attn.z.z.features"], f, rtol=0, atol=1e-6)
        want = (z.flatten(-2) - f @ d.W_dec).unflatten(-1, z.shape[-2:])
    torch.testing.assert_close(edited.cache["blocks.0.attn.z"], want, rtol=1e-5, atol=1e-5)


def test_a_folded_norm_dictionary_reads_mlp_in_without_the_gain(llama):
    """TransformerLens's fold_ln convention: the dictionary sees mlp.in / gain (RMS norm: no bias)."""
    d = _random(llama.d_model, 64, "standard", seed=4, site="blocks.1.mlp.in", norm_folded=True)
    gain = llama.layer_module(1, llama.family.mlp_norm).weight.detach()
    ids = random_ids(llama, batch=1, pos=6)
    with attach(llama, d, "folded"):
        run = llama.run(ids, capture=["blocks.1.mlp.in.folded.features", "blocks.1.mlp.in"])
        edited = llama.run(
            ids, interventions=[zero("blocks.1.mlp.in.folded.features", head=0)], capture=["blocks.1.mlp.in"]
        )
    with torch.no_grad():
        x = run.cache["blocks.1.mlp.in"]
        f = d.encode(x / gain)
        torch.testing.assert_close(run.cache["blocks.1.mlp.in.folded.features"], f, rtol=0, atol=1e-5)
        want = x - f[..., :1] * d.W_dec[0] * gain
    torch.testing.assert_close(edited.cache["blocks.1.mlp.in"], want, rtol=1e-5, atol=1e-5)


def test_attach_errors(llama):
    d = _random(32, 64, site="blocks.1.resid_post")
    for kwargs, message in [
        ({}, "reads vectors of 32; blocks.1.resid_post has 64"),
        ({"name": "Bad-Name"}, "expected a lower-case word"),
    ]:
        with pytest.raises(lmscope.LmscopeError, match=message):
            attach(llama, d, **kwargs)
    with pytest.raises(lmscope.LmscopeError, match="does not say which site"):
        attach(llama, _random(64, 64), "nosite")
    with pytest.raises(lmscope.LmscopeError, match="no dictionary named 'gone'"):
        detach("gone")
    assert [p.name for p in site_providers()] == ["dense", "moe", "monet"]


def test_several_dictionaries_under_one_name(llama):
    ds = {
        f"layers.{layer}": _random(llama.d_model, 32, seed=layer, site=f"blocks.{layer}.resid_post")
        for layer in range(3)
    }
    ids = random_ids(llama, batch=1, pos=4)
    with attach(llama, ds, "res") as att:
        assert len(att.sites) == 6
        run = llama.run(ids, capture=[f"blocks.{layer}.resid_post.res.features" for layer in range(3)])
    for layer, d in enumerate(ds.values()):
        if layer < 2:  # the last hidden state Hugging Face returns is after the final norm
            with torch.no_grad():
                want = d.encode(_hf_hidden(llama, ids, layer))
            torch.testing.assert_close(run.cache[f"blocks.{layer}.resid_post.res.features"], want, rtol=0, atol=1e-6)


def test_smollm2_spliced_reproduces_the_model(smollm2):
    d = _random(smollm2.d_model, 1024, seed=5, site="blocks.12.resid_post")
    ids = smollm2.tokenize("The capital of France is Paris, and the capital of Italy is")[0]
    with torch.no_grad():
        plain = smollm2.hf(input_ids=ids).logits
    with attach(smollm2, d, "sae12"):
        site = "blocks.12.resid_post.sae12.features"
        run = smollm2.run(
            ids, capture=[site], interventions=[apply("blocks.12.resid_post.sae12.error", lambda e: e * 1.0)]
        )
        x = smollm2.run(ids, capture=["blocks.12.resid_post"]).cache["blocks.12.resid_post"]
    torch.testing.assert_close(run.logits, plain, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(run.cache[site], d.encode(x), rtol=0, atol=1e-5)

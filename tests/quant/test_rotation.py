"""Hadamard matrices against hand-built constructions, and the rotation against its defining
properties: a rotated full-precision model computes the original logits, its residual stream is
the original one times R1, the down projections read their input times H, and everything comes
back exactly on exit; models whose norms do not allow it are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from lmscope.core.errors import LmscopeError
from lmscope.quant.hadamard import hadamard, paley, random_hadamard
from lmscope.quant.rotation import check, rotate, rotated, rotation_of, unrotate
from tests.tiny import random_ids

ROTATABLE = ["gemma", "llama", "mistral", "phi3", "qwen2", "qwen3"]
REFUSED = {
    "gemma2": "post-branch norm",
    "olmo2": "no norm before attention",
    "gpt2": "not an RMS norm",
    "gpt_neox": "not an RMS norm",
}


def _float64(model):
    copied = copy.deepcopy(model)
    copied.hf.double()
    return copied


def _logits(model, ids):
    with torch.no_grad():
        return model.hf(input_ids=ids, use_cache=False).logits


# -- Hadamard matrices ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64])
def test_hadamard_power_of_two_is_sylvester(n):
    """Order 2^m: the Walsh-Hadamard matrix H[i, j] = (-1)^popcount(i & j), over sqrt(n)."""
    i = torch.arange(n)
    bits = (i[:, None] & i[None, :]).tolist()
    expected = torch.tensor([[(-1.0) ** b.bit_count() for b in row] for row in bits], dtype=torch.float64)
    torch.testing.assert_close(hadamard(n), expected / n**0.5, rtol=0, atol=1e-15)


def test_hadamard_order_12_by_hand():
    """Paley I for q = 11 (squares mod 11: 1, 3, 4, 5, 9): H = I + [[0, 1^T], [-1, Q]] with
    Q[i, j] = chi(j - i); written out row by row."""
    chi = [0] + [1 if a in (1, 3, 4, 5, 9) else -1 for a in range(1, 11)]
    rows = [[1] + [1] * 11]
    for i in range(11):
        rows.append([-1] + [(1 if i == j else 0) + chi[(j - i) % 11] for j in range(11)])
    torch.testing.assert_close(paley(12), torch.tensor(rows, dtype=torch.float64))


@pytest.mark.parametrize("n", [12, 20, 28, 36, 96, 576, 1536])
def test_hadamard_is_orthogonal_with_equal_magnitudes(n):
    """Paley orders, and K * 2^m products (96 = 12 * 8: the tiny models' MLP; 576 = 36 * 16 and
    1536 = 12 * 128: SmolLM2's residual stream and MLP)."""
    h = hadamard(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(h.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 6, 52])
def test_hadamard_unknown_order(n):
    with pytest.raises(LmscopeError, match=f"no Hadamard matrix of order {n}"):
        hadamard(n)


def test_random_hadamard_is_signed_rows():
    r = random_hadamard(12, torch.Generator().manual_seed(3))
    signs = (r / hadamard(12)).round()
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert bool((signs == signs[:, :1]).all())  # one sign per row: diag(s) H
    torch.testing.assert_close(r @ r.T, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(r, random_hadamard(12, torch.Generator().manual_seed(3)))


# -- computational invariance ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["quarot", "ffn"])
@pytest.mark.parametrize("name", ROTATABLE)
def test_rotated_model_computes_the_same_logits(tiny_models, name, mode):
    """Float64: a rotated model's logits equal the original's to 1e-4 (the norms compute in
    float32, hence ~1e-6 rather than 1e-15); on exit every parameter is back bit for bit."""
    model = _float64(tiny_models[name])
    ids = random_ids(model, batch=2, pos=12)
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    reference = _logits(model, ids)
    with rotated(model, seed=1, mode=mode):
        torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=1e-4)
    after = model.hf.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gemma2", "gpt2", "gpt_neox_serial", "olmo2"])
def test_ffn_rotation_on_any_norm(tiny_models, name):
    """The down projection's Hadamard alone needs no norm folding: any family with an MLP."""
    model = _float64(tiny_models[name])
    ids = random_ids(model, batch=1, pos=8)
    reference = _logits(model, ids)
    with rotated(model, mode="ffn"):
        torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=1e-10)


def test_gemma_untied_then_tied_again(tiny_models):
    """Gemma ties the unembedding to the embedding: rotation unties them (the final norm folds
    into the unembedding only), restoring ties them again."""
    model = copy.deepcopy(tiny_models["gemma"])
    embed, head = model.module(model.family.embed), model.module(model.family.unembed)
    assert head.weight is embed.weight
    with rotated(model):
        assert head.weight is not embed.weight
    assert head.weight is embed.weight


@pytest.mark.parametrize("name, reason", list(REFUSED.items()))
def test_refused_families(tiny_models, name, reason):
    model = tiny_models[name]
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    with pytest.raises(LmscopeError, match=f"cannot be rotated: .*{reason}"):
        check(model)
    with pytest.raises(LmscopeError, match=reason), rotated(model):
        pass
    assert rotation_of(model) is None
    assert all(torch.equal(v, model.hf.state_dict()[k]) for k, v in before.items())


def test_bad_mode_and_nesting(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(LmscopeError, match="unknown rotation"):
        check(model, "spin")
    with rotated(model), pytest.raises(LmscopeError, match="already rotated"):
        rotate(model)
    with pytest.raises(LmscopeError, match="not rotated"):
        unrotate(model)


def test_rotate_for_good(tiny_models):
    model = _float64(tiny_models["qwen3"])
    ids = random_ids(model, batch=1, pos=8)
    reference = _logits(model, ids)
    rotate(model, seed=2)
    assert rotation_of(model).mode == "quarot"
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=1e-4)
    with pytest.raises(LmscopeError, match="for good"):
        unrotate(model)
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=1e-4)  # hooks still on


# -- what the rotation does inside ------------------------------------------------------------


def test_residual_stream_and_readers_are_rotated(tiny_models):
    """Inside the rotation the residual stream is the original times R1, and the query
    projection is the original with the attention norm's scale folded in, times R1."""
    model = _float64(tiny_models["llama"])
    ids = random_ids(model, batch=1, pos=8)
    sites = ["blocks.1.resid_pre", "blocks.2.resid_post"]
    original = model.run(ids, sites).cache
    q = model.layer_module(0, model.family.q_proj).weight.detach().clone()
    scale = model.layer_module(0, model.family.attn_norm).weight.detach().clone()
    with rotated(model, seed=5) as rotation:
        r1 = rotation.residual
        inside = model.run(ids, sites).cache
        for site in sites:
            torch.testing.assert_close(inside[site], original[site] @ r1, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.layer_module(0, model.family.q_proj).weight, (q * scale) @ r1)
        torch.testing.assert_close(model.layer_module(0, model.family.attn_norm).weight, torch.ones_like(scale))


def test_down_projection_reads_its_input_times_h(tiny_models):
    """The online Hadamard: what the down projection's weight multiplies is the original
    neuron activation times H (read by a hook registered after the rotation's)."""
    model = _float64(tiny_models["llama"])
    ids = random_ids(model, batch=1, pos=8)
    down = model.layer_module(1, model.family.mlp_down)
    seen = []
    hook = lambda module, args: seen.append(args[0].detach().clone())
    with torch.no_grad():
        handle = down.register_forward_pre_hook(hook)
        model.hf(input_ids=ids)
        handle.remove()
        with rotated(model, mode="ffn") as rotation:
            handle = down.register_forward_pre_hook(hook)
            model.hf(input_ids=ids)
            handle.remove()
    torch.testing.assert_close(seen[1], seen[0] @ rotation.down, rtol=0, atol=1e-10)
    torch.testing.assert_close(rotation.down, hadamard(model.d_mlp))
    assert not down._forward_pre_hooks  # the online hook is gone

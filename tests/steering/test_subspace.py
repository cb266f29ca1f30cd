"""Subspace interventions: the subspace patch against a hand computation, the readers of a site,
DAS recovering a planted causal direction, and the illusion check on Makelov et al.'s toy model
(a dormant direction plus a disconnected one is flagged, the real direction is not)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

import lmscope
from lmscope.steering.subspace import das, illusion_check, load_subspace, readers, row_space
from tests.helpers import one_thread
from tests.tiny import random_ids, tiny_model

# -- a model whose answer is one direction of the residual stream, by construction ---------------

D, VOCAB = 16, 24
FEATURE_TOKENS = torch.arange(3, 21)  # odd: feature +1, even: feature -1
ANSWER = {+1: 21, -1: 22}


def _sign(tokens: torch.Tensor) -> torch.Tensor:
    return torch.where(tokens % 2 == 1, 1, -1)


def planted(illusion: bool, seed: int = 0) -> tuple[lmscope.Model, dict[str, torch.Tensor]]:
    """A one-layer Llama whose attention and MLP write nothing, so the residual stream after the
    layer is the final token's embedding. In an orthonormal frame (u, n, a, b, rest) of the stream:

    - the final token's binary feature p is written along u (the real variable), plus noise in
      the rest; the unembedding reads u: the answer is ``ANSWER[p]``;
    - with ``illusion`` (Makelov et al.'s toy model), p is also written along n, which nothing
      reads (disconnected), and ``ANSWER[+1]`` also reads a, along which no token writes (dormant):
      it reads u + 3a, ``ANSWER[-1]`` reads -u; every token writes a constant along b, which every
      other answer reads negatively, so the argmax is always one of the two answers.
    """
    g = torch.Generator().manual_seed(seed)
    config = T.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    hf = T.AutoModelForCausalLM.from_config(config).eval()
    frame, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    u, n, a, b = frame.T[:4]
    p = _sign(torch.arange(VOCAB)).float()[:, None]
    noisy = frame[:, 4:] if illusion else frame[:, 1:]  # without the illusion, noise fills n, a and b too
    embed = 2 * p * u + 0.5 * torch.randn(VOCAB, noisy.shape[1], generator=g) @ noisy.T
    with torch.no_grad():
        layer = hf.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[ANSWER[+1]] = 2 * u
        hf.lm_head.weight[ANSWER[-1]] = -2 * u
        if illusion:
            embed = embed + 2 * p * n + 2 * b
            hf.lm_head.weight[:] = -20 * b
            hf.lm_head.weight[ANSWER[+1]] = 2 * (u + 3 * a)
            hf.lm_head.weight[ANSWER[-1]] = -2 * u
        hf.model.embed_tokens.weight.copy_(embed)
    model = lmscope.Model(hf, tokenizer=None, name="planted")
    return model, {"u": u, "n": n, "a": a, "b": b}


def task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Base and source prompts [n, 3] of feature tokens; the counterfactual label of interchanging
    the final token's feature is the source's answer."""
    g = torch.Generator().manual_seed(seed)
    base = FEATURE_TOKENS[torch.randint(len(FEATURE_TOKENS), (n, 3), generator=g)]
    source = FEATURE_TOKENS[torch.randint(len(FEATURE_TOKENS), (n, 3), generator=g)]
    labels = torch.tensor([ANSWER[int(s)] for s in _sign(source[:, -1])])
    return base, source, labels


SITE = "blocks.0.resid_post"


def _cos(basis: torch.Tensor, direction: torch.Tensor) -> float:
    return float((basis.reshape(-1) @ direction).abs() / basis.norm())


# -- the subspace patch --------------------------------------------------------------------------


def test_subspace_patch_is_the_hand_computation():
    model = tiny_model("llama")
    base, source = random_ids(model, seed=1), random_ids(model, seed=2)
    basis, _ = torch.linalg.qr(torch.randn(model.d_model, 3, generator=torch.Generator().manual_seed(0)))
    site = "blocks.1.resid_post"
    x, s = (model.run(ids, capture=[site]).cache[site] for ids in (base, source))
    iv = lmscope.subspace_patch(site, {site: s}, basis, positions=[2, -1])
    run = model.run(base, capture=[site], interventions=[iv])
    expected = x.clone()
    for p in (2, x.shape[1] - 1):
        expected[:, p] = x[:, p] + (s[:, p] - x[:, p]) @ basis @ basis.T
    torch.testing.assert_close(run.cache[site], expected, atol=1e-5, rtol=1e-5)
    reference = model.run(base, interventions=[lmscope.patch(site, expected)]).logits
    torch.testing.assert_close(run.logits, reference, atol=1e-5, rtol=1e-5)


def test_subspace_patch_on_one_head_and_with_the_identity():
    model = tiny_model("llama")
    base, source = random_ids(model, seed=1), random_ids(model, seed=2)
    site = "blocks.1.attn.z"
    x, s = (model.run(ids, capture=[site]).cache[site] for ids in (base, source))
    direction = torch.nn.functional.normalize(torch.randn(model.d_head), dim=0)
    run = model.run(base, capture=[site], interventions=[lmscope.subspace_patch(site, s, direction, head=1)])
    expected = x.clone()
    expected[:, :, 1] = x[:, :, 1] + ((s[:, :, 1] - x[:, :, 1]) @ direction)[..., None] * direction
    torch.testing.assert_close(run.cache[site], expected, atol=1e-5, rtol=1e-5)
    whole = torch.eye(model.n_heads * model.d_head)
    patched = model.run(base, interventions=[lmscope.subspace_patch(site, s, whole, positions=-1)]).logits
    reference = model.run(base, interventions=[lmscope.patch(site, s, positions=-1)]).logits
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=1e-5)


# -- what reads a site ---------------------------------------------------------------------------


def test_readers_of_the_last_residual_stream_are_the_unembedding():
    model, dirs = planted(illusion=True)
    weights = readers(model, SITE)
    assert list(weights) == ["lm_head"]
    rows = row_space(weights)
    assert rows.shape[1] == 3  # span(u, a, b)
    share = lambda v: float((rows.T @ v).norm())
    assert share(dirs["u"]) == pytest.approx(1, abs=1e-4) and share(dirs["a"]) == pytest.approx(1, abs=1e-4)
    assert share(dirs["n"]) < 1e-4


def test_residual_readers_fold_the_norm_in_front():
    model = tiny_model("llama")
    weights = readers(model, "blocks.1.resid_pre")
    layer = model.layer_module(1, "")
    q = layer.self_attn.q_proj.weight @ torch.diag(layer.input_layernorm.weight)
    up = layer.mlp.up_proj.weight @ torch.diag(layer.post_attention_layernorm.weight)
    torch.testing.assert_close(weights["blocks.1.self_attn.q_proj"], q.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights["blocks.1.mlp.up_proj"], up.detach(), atol=1e-5, rtol=1e-5)
    assert "lm_head" in weights and "blocks.2.mlp.gate_proj" in weights
    assert not any("o_proj" in name or "down_proj" in name or "blocks.0" in name for name in weights)
    # GPT-2's LayerNorm centres its input: the all-ones direction is read by nothing after it
    gpt2 = tiny_model("gpt2")
    rows = row_space(readers(gpt2, f"blocks.{gpt2.n_layers - 1}.resid_post"))
    ones = torch.ones(gpt2.d_model) / gpt2.d_model**0.5
    assert rows.shape[1] == gpt2.d_model - 1 and float((rows.T @ ones).norm()) < 1e-4


def test_mlp_post_null_space_is_causally_disconnected():
    model = tiny_model("llama")  # d_mlp 96 > d_model 64: the down projection has a null space
    site = "blocks.1.mlp.post"
    weights = readers(model, site)
    rows = row_space(weights)
    assert rows.shape[1] == model.d_model
    g = torch.Generator().manual_seed(0)
    v = torch.randn(model.d_mlp, generator=g)
    null = v - rows @ (rows.T @ v)
    ids = random_ids(model)
    clean = model.run(ids).logits
    moved = model.run(ids, interventions=[lmscope.add(site, 10 * null / null.norm())]).logits
    torch.testing.assert_close(moved, clean, atol=1e-4, rtol=1e-4)
    row = rows @ (rows.T @ v)
    assert (model.run(ids, interventions=[lmscope.add(site, 10 * row / row.norm())]).logits - clean).abs().max() > 0.1


# -- DAS and the illusion check on planted ground truth --------------------------------------------


def test_das_recovers_the_planted_direction(tmp_path):
    model, dirs = planted(illusion=False)
    base, source, labels = task(160, seed=1)
    with one_thread():
        result = das(model, SITE, base, source, labels, k=1, steps=150, lr=0.05, seed=0)
    assert result.basis.shape == (D, 1)
    torch.testing.assert_close(result.basis.T @ result.basis, torch.eye(1), atol=1e-5, rtol=0)
    assert _cos(result.basis, dirs["u"]) > 0.9
    assert result.heldout_iia >= 0.95 and result.train_iia >= 0.95 and result.n_heldout == 32
    assert result.losses[-1] < result.losses[0]
    assert "held-out" in result.text() and result.tables()[0].rows[0]["k"] == 1
    check = illusion_check(model, SITE, result.basis, base, source, labels)
    assert not check.flagged
    basis, meta = load_subspace(result.save(tmp_path / "das.safetensors", model=model.name))
    assert torch.equal(basis, result.basis) and meta["site"] == SITE and json.loads(meta["k"]) == 1


def test_illusion_check_flags_a_dormant_plus_disconnected_direction():
    model, dirs = planted(illusion=True)
    base, source, labels = task(64, seed=2)
    illusory = (dirs["n"] + dirs["a"]) / 2**0.5
    check = illusion_check(model, SITE, illusory, base, source, labels)
    whole, row, null = check.part("subspace"), check.part("row space"), check.part("null space")
    assert whole.iia == 1.0 and whole.effect > 1  # the patch flips every answer it should
    assert abs(row.effect) < 0.05 and abs(null.effect) < 0.05  # neither part alone does anything
    assert check.row_share == pytest.approx(0.5, abs=1e-4) and check.reader_rank == 3
    assert check.flagged and "FLAGGED" in check.text()
    real = illusion_check(model, SITE, dirs["u"], base, source, labels)
    assert real.part("subspace").iia == 1.0 and real.part("null space").dim == 0
    assert real.part("row space").effect == pytest.approx(real.part("subspace").effect, rel=1e-4)
    assert not real.flagged
    assert json.loads(json.dumps(real.to_json()))["parts"][1]["part"] == "row space"
    assert real.to_json()["flagged"] is False and len(real.tables()[0].rows) == 3

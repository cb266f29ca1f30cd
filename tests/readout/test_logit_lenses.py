"""Logit lens and direct logit attribution against independent references: the model's own
logits, the final norm and unembedding applied by hand to Hugging Face's hidden states, a head's
attribution by hand from ``attn.z`` and the output projection, the exact decomposition of the
final logit difference, and (where installed) TransformerLens."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from lmscope.core.errors import LmscopeError
from lmscope.readout import (
    AttributionComparison,
    LensComparison,
    answer_ids,
    compare,
    component_top_tokens,
    decompose,
    direct_logit_attribution,
    logit_lens,
)
from tests.tiny import CONFIGS, random_ids, tiny_model

FAMILIES = sorted(CONFIGS)
PROMPT = "In 1999, Nicolas Anelka was a member of sports team"


def _ragged(model, lengths=(9, 6, 8), seed=1):
    """Right-padded token ids of different lengths with their mask, and each prompt alone."""
    full = random_ids(model, batch=len(lengths), pos=max(lengths), seed=seed)
    mask = torch.zeros_like(full)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = full.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}, [full[i, :n] for i, n in enumerate(lengths)]


def _softcap(model, logits):
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


def _unembed_by_hand(model, hidden):
    """The final norm module and the unembedding's weight and bias, applied by hand."""
    head = model.module(model.family.unembed)
    logits = model.module(model.family.final_norm)(hidden) @ head.weight.T
    return _softcap(model, logits if head.bias is None else logits + head.bias)


def _with_biases(name: str, unembed_bias: bool = True):
    """A fresh tiny model whose every bias (linear layers, norms; with ``unembed_bias`` also a
    new one of the unembedding) is random, so attention biases, value biases, norm biases and
    the unembedding bias all matter."""
    model = tiny_model(name, seed=4)
    with torch.no_grad():
        for _, p in model.hf.named_parameters():
            if p.ndim == 1:
                p.add_(0.5 * torch.randn_like(p))
        head = model.module(model.family.unembed)
        if unembed_bias and head.bias is None:
            head.bias = nn.Parameter(0.5 * torch.randn(head.weight.shape[0]))
    return model


# -- logit lens ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_lens_after_the_last_layer_is_the_models_output(tiny_models, name):
    """Ragged prompts in batches of two, read at each one's last token: the last layer's lens is
    the model's own output for that prompt run alone (logits, probabilities, ranks, top tokens)."""
    model = tiny_models[name]
    inputs, alone = _ragged(model)
    logits = torch.stack([model.run(ids[None]).logits[0, -1] for ids in alone])  # [3, vocab]
    answers = torch.stack([logits.argmax(-1), torch.tensor([5, 40, 77])], dim=1)
    lens = logit_lens(model, inputs, answers, position=[8, 5, 7], top_k=5, batch_size=2)  # right-padded
    assert lens.rank.shape == (model.n_layers + 1, 3, 2) and lens.layers[0] == "embed"
    assert lens.positions.tolist() == [8, 5, 7]
    picked = logits.gather(-1, answers)
    assert torch.allclose(lens.logit[-1], picked, atol=1e-5)
    assert torch.allclose(lens.prob[-1], logits.softmax(-1).gather(-1, answers), atol=1e-6)
    assert lens.rank[-1, :, 0].tolist() == [1, 1, 1]
    assert torch.equal(lens.rank[-1], 1 + (logits[:, None, :] > picked[:, :, None]).sum(-1))
    assert torch.equal(lens.top_ids[-1], logits.topk(5).indices)


def test_lens_after_the_last_layer_is_smollm2s_output(smollm2):
    prompts = [PROMPT, "The capital of France is"]
    lens = logit_lens(smollm2, prompts, [" Arsenal", " Paris"], labels=["team"])
    for i, prompt in enumerate(prompts):
        logits = smollm2.run(prompt).logits[0, -1]
        assert abs(float(lens.logit[-1, i, 0]) - float(logits[int(lens.answers[i, 0])])) < 1e-4
        assert torch.equal(lens.top_ids[-1, i], logits.topk(10).indices)
    assert lens.answer_tokens[1] == [" Paris"] and lens.labels == ["team"]
    assert int(lens.rank[-1, 1, 0]) == 1  # SmolLM2 knows the capital of France


@pytest.mark.parametrize("name", FAMILIES)
def test_lens_at_every_layer_is_the_norm_and_unembedding_by_hand(tiny_models, name):
    """Layer L's lens = the final norm module and lm_head applied by hand to Hugging Face's
    ``output_hidden_states`` (hidden_states[L + 1] leaves layer L; [0] is the embedding)."""
    model = tiny_models[name]
    ids = random_ids(model, batch=2, pos=7)
    with torch.no_grad():
        hidden = model.hf(input_ids=ids, output_hidden_states=True).hidden_states
        by_hand = torch.stack([_unembed_by_hand(model, h[:, 3]) for h in hidden[: model.n_layers]])
    answers = torch.tensor([[7, 8], [50, 9]])
    lens = logit_lens(model, ids, answers, position=3, top_k=4)
    assert torch.allclose(lens.logit[:-1], by_hand.gather(-1, answers.expand(model.n_layers, -1, -1)), atol=1e-5)
    probs = by_hand.softmax(-1)
    assert torch.allclose(lens.prob[:-1], probs.gather(-1, answers.expand(model.n_layers, -1, -1)), atol=1e-6)
    assert torch.equal(lens.top_ids[:-1], by_hand.topk(4).indices)
    assert torch.allclose(lens.top_probs[:-1], probs.topk(4).values, atol=1e-6)


def test_smollm2_lens_at_a_middle_layer_by_hand(smollm2):
    ids, _ = smollm2.tokenize(PROMPT)
    with torch.no_grad():
        hidden = smollm2.hf(input_ids=ids, output_hidden_states=True).hidden_states
    answer = smollm2.tokenizer(" Arsenal", add_special_tokens=False)["input_ids"][0]
    lens = logit_lens(smollm2, PROMPT, " Arsenal", top_k=3)
    for layer in (0, 14, 28):
        with torch.no_grad():
            logits = smollm2.hf.lm_head(smollm2.hf.model.norm(hidden[layer + 1][0, -1]))
        assert abs(float(lens.logit[layer + 1, 0, 0]) - float(logits[answer])) < 1e-4
        assert int(lens.rank[layer + 1, 0, 0]) == 1 + int((logits > logits[answer]).sum())
        assert lens.top_ids[layer + 1, 0].tolist() == logits.topk(3).indices.tolist()


def test_positions_padding_and_batches_do_not_change_the_lens(tiny_models):
    """Token ids are indexed by their columns (the interventions' convention: an absolute index
    into the given sequence, negative from its end); each prompt alone is its own sequence."""
    model = tiny_models["llama"]
    inputs, alone = _ragged(model)  # right-padded, lengths 9, 6, 8 in 9 columns
    answers = torch.tensor([3, 4, 5])
    per_prompt = logit_lens(model, inputs, answers, position=[2, 4, 0], batch_size=3)
    for i, ids in enumerate(alone):
        one = logit_lens(model, ids, answers[i], position=[2, -2, 0][i])
        assert torch.allclose(per_prompt.logit[:, i], one.logit[:, 0], atol=1e-5)
    assert per_prompt.positions.tolist() == [2, 4, 0]
    # the same prompts left-padded (position ids count real tokens): columns 2, 7 (= -2), 1
    n = max(len(a) for a in alone)
    left = {"input_ids": torch.zeros(3, n, dtype=torch.long), "attention_mask": torch.zeros(3, n, dtype=torch.long)}
    for i, ids in enumerate(alone):
        left["input_ids"][i, n - len(ids) :] = ids
        left["attention_mask"][i, n - len(ids) :] = 1
    again = logit_lens(model, left, answers, position=[2, -2, 1], batch_size=2)
    assert torch.allclose(again.logit, per_prompt.logit, atol=1e-5)
    assert again.positions.tolist() == [2, 4, 0]
    with pytest.raises(LmscopeError, match="out of range"):
        logit_lens(model, inputs, answers, position=9)  # 9 columns
    with pytest.raises(LmscopeError, match="padding"):
        logit_lens(model, inputs, answers, position=-1)  # the second prompt's column 8 is padding


def test_texts_are_each_their_own_sequence(smollm2):
    """A list of texts: position -1 is each text's last token, whatever the lengths."""
    texts = ["The capital of France is", "Paris"]
    both = logit_lens(smollm2, texts, top_k=1)
    for i, text in enumerate(texts):
        one = logit_lens(smollm2, text, top_k=1)
        assert both.top_ids[:, i].tolist() == one.top_ids[:, 0].tolist()
    assert both.positions.tolist() == [len(smollm2.tokenizer(t)["input_ids"]) - 1 for t in texts]


def test_final_norm_lens_is_the_cumulative_direct_attribution(tiny_models):
    """``norm="final"`` (TransformerLens's linear lens before 2026) at layer L is the sum of the
    direct attributions of the embedding and every component of layers <= L; in an RMSNorm
    model without an unembedding bias its ranks are the standard lens's."""
    model = tiny_models["llama"]
    ids = random_ids(model, batch=2, pos=8)
    answers = torch.tensor([11, 12])
    final = logit_lens(model, ids, answers, norm="final")
    dla = direct_logit_attribution(model, ids, answers)
    per_layer = dla.heads.sum(1) + dla.attn_bias + dla.mlps  # [n_layers, batch]
    cumulative = torch.cat([dla.embed[None], dla.embed + per_layer.cumsum(0)])
    assert torch.allclose(final.logit[:, :, 0], cumulative, atol=1e-5)
    assert torch.equal(final.rank, logit_lens(model, ids, answers).rank)


# -- direct logit attribution ----------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_attributions_sum_to_the_logit_difference(name):
    """Every bias random (attention, value, norm, unembedding): the components of the final
    residual sum to it, and their attributions plus the constant (norm and unembedding biases)
    to the logit difference before soft-capping, from lm_head applied to the model's own
    ``final_norm`` output. RMSNorm models have no constant: the components alone sum to it."""
    model = _with_biases(name)
    inputs, _ = _ragged(model)
    answer, wrong = torch.tensor([5, 6, 7]), torch.tensor([30, 31, 32])
    last = torch.tensor([8, 5, 7])  # each right-padded prompt's last token
    dla = direct_logit_attribution(model, inputs, answer, wrong, position=last, batch_size=2)
    run = model.run(inputs, capture=["final_norm", f"blocks.{model.n_layers - 1}.resid_post"])
    head = model.module(model.family.unembed)
    pre = run.cache["final_norm"][torch.arange(3), last] @ head.weight.T
    pre = pre if head.bias is None else pre + head.bias
    reference = pre.gather(-1, answer[:, None])[:, 0] - pre.gather(-1, wrong[:, None])[:, 0]
    if not getattr(model.hf.config, "final_logit_softcapping", None):
        logits = run.logits[torch.arange(3), last]
        assert torch.allclose(reference, logits[:, 5:8].diagonal() - logits[:, 30:33].diagonal(), atol=1e-5)
    assert torch.allclose(dla.logit, reference, atol=1e-4)
    assert torch.allclose(dla.total(), reference, atol=1e-4)
    if not isinstance(model.module(model.family.final_norm), nn.LayerNorm) and head.bias is None:
        assert float(dla.constant.abs().max()) == 0.0
    comp = decompose(model, inputs, last)
    summed = comp.embed + comp.heads.sum((0, 1)) + comp.attn_bias.sum(0) + comp.mlps.sum(0)
    assert torch.allclose(
        summed, run.cache[f"blocks.{model.n_layers - 1}.resid_post"][torch.arange(3), last], atol=1e-4
    )


def test_smollm2_attributions_sum_to_the_logit_difference(smollm2):
    prompts = [PROMPT, "In 2009, Nicolas Anelka was a member of sports team"]
    dla = direct_logit_attribution(smollm2, prompts, " Arsenal", " Chelsea", name="numeric")
    a, w = (int(answer_ids(smollm2, t, 1)[0, 0]) for t in (" Arsenal", " Chelsea"))
    for i, prompt in enumerate(prompts):
        logits = smollm2.run(prompt).logits[0, -1]
        assert abs(float(dla.logit[i]) - float(logits[a] - logits[w])) < 1e-4
        assert abs(float(dla.total()[i]) - float(logits[a] - logits[w])) < 1e-4
    assert float(dla.constant.abs().max()) == 0.0  # RMSNorm, no unembedding bias
    assert dla.heads.shape == (30, 9, 2) and dla.answer_tokens == [" Arsen"] * 2  # the first token of " Arsenal"


def _head_by_hand(model, ids, layer, head, answer, wrong, pos=-1):
    """One head's direct attribution from ``attn.z``, the output projection and the final norm's
    parameters: (z_h W_O[h] [- mean]) * weight / s . (W_U[a] - W_U[w])."""
    n, d = model.n_layers, model.d_head
    cache = model.run(ids, capture=[f"blocks.{layer}.attn.z", f"blocks.{n - 1}.resid_post"]).cache
    z = cache[f"blocks.{layer}.attn.z"][0, pos, head]  # [d_head]
    x = cache[f"blocks.{n - 1}.resid_post"][0, pos]  # [d_model]
    o = model.layer_module(layer, model.family.o_proj).weight
    c = o[head * d : (head + 1) * d].T @ z if model.family.conv1d else o[:, head * d : (head + 1) * d] @ z
    norm = model.module(model.family.final_norm)
    if isinstance(norm, nn.LayerNorm):
        c, s = c - c.mean(), torch.sqrt(x.var(unbiased=False) + norm.eps)
    else:
        s = torch.sqrt(x.pow(2).mean() + norm.variance_epsilon)
    w_u = model.module(model.family.unembed).weight
    return float(((c * norm.weight / s) @ (w_u[answer] - w_u[wrong])).detach())


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2", "gpt_neox"])
def test_one_head_by_hand(name):
    model = _with_biases(name)
    ids = random_ids(model, batch=1, pos=8)
    dla = direct_logit_attribution(model, ids, 9, 21)
    for layer, head in ((0, 1), (2, 3)):
        assert abs(float(dla.heads[layer, head, 0]) - _head_by_hand(model, ids, layer, head, 9, 21)) < 1e-5


def test_one_smollm2_head_by_hand(smollm2):
    ids, _ = smollm2.tokenize(PROMPT)
    a, w = (int(answer_ids(smollm2, t, 1)[0, 0]) for t in (" Arsenal", " Chelsea"))
    dla = direct_logit_attribution(smollm2, ids, a, w)
    assert abs(float(dla.heads[18, 3, 0]) - _head_by_hand(smollm2, ids, 18, 3, a, w)) < 1e-4


@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
def test_folding_value_biases_moves_a_constant_from_heads_to_the_bias(name):
    model = _with_biases(name)
    ids = random_ids(model, batch=2, pos=8)
    plain = direct_logit_attribution(model, ids, 9, 21)
    folded = direct_logit_attribution(model, ids, 9, 21, fold_value_biases=True)
    shift = plain.heads - folded.heads  # [layer, head, batch]: a constant vector per head...
    assert float(shift.abs().max()) > 1e-3
    assert torch.allclose(plain.attn_bias + shift.sum(1), folded.attn_bias, atol=1e-5)
    assert torch.allclose(plain.total(), folded.total(), atol=1e-5)


def test_center_unembed_subtracts_the_mean_logit(tiny_models):
    model = tiny_models["gpt2"]
    ids = random_ids(model, batch=2, pos=6)
    dla = direct_logit_attribution(model, ids, 9, center_unembed=True)
    logits = model.run(ids).logits[:, -1]
    assert torch.allclose(dla.logit, logits[:, 9] - logits.mean(-1), atol=1e-5)
    assert torch.allclose(dla.total(), dla.logit, atol=1e-5)


def test_component_top_tokens_by_hand(tiny_models):
    model = tiny_models["llama"]
    ids = random_ids(model, batch=2, pos=8)
    top = component_top_tokens(model, ids, ["a1.h2", "m0", "embed"], k=5)
    n, d = model.n_layers, model.d_head
    cache = model.run(ids, capture=["blocks.1.attn.z", f"blocks.{n - 1}.resid_post", "blocks.0.resid_pre"]).cache
    x = cache[f"blocks.{n - 1}.resid_post"][:, -1]
    norm = model.hf.model.norm
    scale = norm.weight / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    head = cache["blocks.1.attn.z"][:, -1, 2] @ model.hf.model.layers[1].self_attn.o_proj.weight[:, 2 * d : 3 * d].T
    for i, c in enumerate([head, None, cache["blocks.0.resid_pre"][:, -1]]):
        if c is None:
            continue
        logits = (c * scale) @ model.hf.lm_head.weight.T
        assert torch.equal(top.ids[i], logits.topk(5).indices)
        assert torch.allclose(top.logits[i], logits.topk(5).values, atol=1e-5)
    with pytest.raises(LmscopeError, match="out of range"):
        component_top_tokens(model, ids, ["a9.h0"])


# -- results and comparison ------------------------------------------------------------------


def test_results_serialise_and_compare_side_by_side(tiny_models):
    model = tiny_models["llama"]
    a, b = random_ids(model, batch=3, pos=8, seed=1), random_ids(model, batch=2, pos=6, seed=2)
    lenses = {
        "numeric": logit_lens(model, a, [[5, 6]] * 3, labels=["right", "other"], name="numeric"),
        "alias": logit_lens(model, b, [[5, 6]] * 2, labels=["right", "other"], name="alias"),
    }
    both = compare(lenses)
    assert isinstance(both, LensComparison)
    json.dumps(both.to_json())
    names = [f.name for f in both.figures()]
    assert names == ["logit_lens_rank_compare", "logit_lens_prob_compare"]
    assert set(both.figures()[0].series) == {"numeric", "alias"}
    assert len(both.tables()[0].rows) == model.n_layers + 1 and both.text()
    assert "<img" in both._repr_html_()
    lens = lenses["numeric"]
    json.dumps(lens.to_json())
    assert [f.name for f in lens.figures()] == ["logit_lens_rank_numeric", "logit_lens_prob_numeric"]
    assert set(lens.figures()[0].series) == {"right", "other"} and lens.tables() and lens.text()
    assert lens.median_rank().shape == (model.n_layers + 1, 2) and lens.figures()[0].png_bytes()

    dlas = {
        "numeric": direct_logit_attribution(model, a, 5, 6, name="numeric"),
        "alias": direct_logit_attribution(model, b, 5, 6, name="alias"),
    }
    side = compare(dlas)
    assert isinstance(side, AttributionComparison)
    json.dumps(side.to_json())
    assert torch.allclose(side.difference(), dlas["numeric"].mean_heads() - dlas["alias"].mean_heads())
    assert [f.name for f in side.figures()] == ["dla_heads_numeric", "dla_heads_alias", "dla_heads_difference"]
    assert side.figures()[0].kind == "heatmap" and len(side.figures()[0].z) == model.n_layers
    dla = dlas["numeric"]
    json.dumps(dla.to_json())
    assert [f.name for f in dla.figures()] == ["dla_heads_numeric", "dla_layers_numeric"]
    assert dla.tables() and "top heads" in dla.text() and len(dla.top_heads(3)) == 3
    with pytest.raises(LmscopeError, match="only"):
        compare({"lens": lens, "dla": dla})


def test_first_layer_the_answer_stays_on_top():
    from lmscope.readout import LogitLens

    rank = torch.tensor([[5, 1, 1, 3], [1, 1, 2, 1], [1, 1, 1, 1]])[:, :, None]  # [n_resid, batch=4, 1]
    lens = LogitLens(
        layers=["embed", "0", "1"],
        positions=torch.zeros(4, dtype=torch.long),
        answers=torch.zeros(4, 1, dtype=torch.long),
        answer_tokens=[["x"]] * 4,
        labels=["answer"],
        rank=rank,
        prob=torch.zeros(3, 4, 1),
        logit=torch.zeros(3, 4, 1),
        top_ids=torch.zeros(3, 4, 1, dtype=torch.long),
        top_probs=torch.zeros(3, 4, 1),
        top_tokens=[[["x"]] * 4] * 3,
    )
    assert lens.first_layer().tolist() == [1, 0, 2, 1]
    assert lens.first_layer(top=2).tolist() == [1, 0, 0, 1]


def test_answers_from_strings_and_errors(smollm2, tiny_models):
    got = answer_ids(smollm2, [[" Arsenal", 7], [" Paris", 5]], 2)
    arsenal = smollm2.tokenizer(" Arsenal", add_special_tokens=False)["input_ids"][0]
    assert got.tolist()[0] == [arsenal, 7] and got.shape == (2, 2)
    assert answer_ids(smollm2, " Paris", 3).shape == (3, 1)
    with pytest.raises(LmscopeError, match="entries for"):
        answer_ids(smollm2, [" Paris"], 2)
    with pytest.raises(LmscopeError, match="same number"):
        answer_ids(smollm2, [[1, 2], [3]], 2)
    with pytest.raises(LmscopeError, match="no tokenizer"):
        answer_ids(tiny_models["llama"], "x", 1)
    with pytest.raises(LmscopeError, match="norm must be"):
        logit_lens(tiny_models["llama"], random_ids(tiny_models["llama"]), norm="cached")


# -- TransformerLens (the ``bench`` extra), where installed ---------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_matches_transformer_lens(name, smollm2, tmp_path):
    """TransformerLens 4.3's ``TransformerBridge`` with ``fold_ln``, weight centring,
    ``center_unembed`` and ``fold_value_biases`` (the defaults of its compatibility mode, as the
    Temporal Heads notebook loads Llama-2): ``stack_head_results`` / ``decompose_resid`` with
    ``apply_ln=True`` dotted with ``W_U``, and the recomputed ``accumulated_resid`` lens."""
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge

    model = _with_biases(name, unembed_bias=False)  # the saved config cannot hold a new bias
    model.hf.save_pretrained(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{smollm2.source}/{f}", tmp_path)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), device="cpu", dtype=torch.float32)
    bridge.enable_compatibility_mode(disable_warnings=True)
    ids = random_ids(model, batch=2, pos=8)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    w_u = bridge.W_U
    d = w_u[:, 9] - w_u[:, 21]
    heads = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [L * H, batch, d_model]
    parts, labels = cache.decompose_resid(mode="all", layer=-1, pos_slice=-1, apply_ln=True, return_labels=True)
    ours = direct_logit_attribution(model, ids, 9, 21, fold_value_biases=True)
    assert torch.allclose(ours.heads.flatten(0, 1), heads @ d, atol=1e-5)
    mlps = torch.stack([parts[labels.index(f"{layer}_mlp_out")] @ d for layer in range(model.n_layers)])
    assert torch.allclose(ours.mlps, mlps, atol=1e-5)
    centred = direct_logit_attribution(model, ids, 9, center_unembed=True, fold_value_biases=True)
    assert torch.allclose(centred.heads.flatten(0, 1), heads @ w_u[:, 9], atol=1e-5)
    stack = cache.accumulated_resid(layer=-1, pos_slice=-1, apply_ln=True)  # [n_layers + 1, batch, d_model]
    probs = (stack @ w_u + bridge.b_U).softmax(-1)[..., [9, 21]]
    assert torch.allclose(logit_lens(model, ids, [[9, 21]] * 2).prob, probs, atol=1e-6)

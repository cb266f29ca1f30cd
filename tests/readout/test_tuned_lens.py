"""Logit lens and tuned lens over one text (Belrose et al. 2023), against references written
from captured residual streams, the final norm and the unembedding."""

from __future__ import annotations

import json

import pytest
import torch

from lmscope.core.errors import LmscopeError
from lmscope.readout import TunedLens, lens, load_tuned_lens, train_tuned_lens
from tests.helpers import read_results, run_cli
from tests.tiny import random_ids, tiny_model


def _streams(model, ids):
    """Final logits [pos, vocab] and the residual streams [n_resid, pos, d_model] of one text."""
    sites = ["blocks.0.resid_pre", *(f"blocks.{layer}.resid_post" for layer in range(model.n_layers))]
    with torch.no_grad():
        run = model.run(ids[None], capture=sites)
    return run.logits[0].float(), torch.stack([run.cache[s][0] for s in sites])


def _read_out(model, x):
    """Final norm and unembedding by hand (no soft-capping in these families)."""
    head = model.module(model.family.unembed)
    with torch.no_grad():
        return (model.module(model.family.final_norm)(x) @ head.weight.T).float()


def _kl(lens_logits, final_logits):
    p = final_logits.softmax(-1)
    return (p * (p.log() - lens_logits.log_softmax(-1))).sum(-1)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def trained(llama):
    g = torch.Generator().manual_seed(0)
    corpus = torch.randint(3, llama.d_vocab, (4096,), generator=g)
    return train_tuned_lens(llama, corpus, steps=80, lr=1e-2, length=32, batch_size=8)


def test_logit_lens_last_layer_is_the_model_output(llama):
    ids = random_ids(llama, batch=1, pos=10)[0]
    final, resid = _streams(llama, ids)
    result = lens(llama, ids, top_k=4)
    target = torch.cat([ids[1:], final[-1:].argmax(-1)])
    assert torch.equal(result.targets[:, 0], target)
    probs = final.softmax(-1)[torch.arange(10), target]
    torch.testing.assert_close(result.prob[-1, :, 0], probs)
    assert bool((result.rank[-1, -1] == 1).all())  # the model's own prediction at the last position
    ranks = 1 + (final > final[torch.arange(10), target][:, None]).sum(-1)
    assert torch.equal(result.rank[-1, :, 0], ranks)
    assert torch.equal(result.top_ids[-1], final[-1].topk(4).indices)
    assert float(result.kl[-1].abs().max()) < 1e-5
    for i in range(len(resid)):  # every stream: final norm and unembedding by hand
        by_hand = _read_out(llama, resid[i]).softmax(-1)[torch.arange(10), target]
        torch.testing.assert_close(result.prob[i, :, 0], by_hand, rtol=1e-4, atol=1e-6)
    assert result.layers == ["embed", "0", "1", "2"] and len(result.tables()) == 2
    assert [f.kind for f in result.figures()] == ["heatmap", "heatmap"]
    json.dumps(result.to_json())


def test_chosen_tokens(llama):
    ids = random_ids(llama, batch=1, pos=6)[0]
    final, _ = _streams(llama, ids)
    result = lens(llama, ids, tokens=[5, 7])
    assert result.targets.shape == (6, 2) and result.labels == ["token '5'", "token '7'"]
    torch.testing.assert_close(result.prob[-1], final.softmax(-1)[:, [5, 7]])
    assert len(result.figures()) == 3


def test_zero_translators_are_the_logit_lens(llama):
    ids = random_ids(llama, batch=1, pos=8)[0]
    plain, tuned = lens(llama, ids), lens(llama, ids, tuned=TunedLens.identity(llama))
    assert tuned.lens == "tuned"
    torch.testing.assert_close(tuned.prob, plain.prob)
    assert torch.equal(tuned.rank, plain.rank) and torch.equal(tuned.top_ids, plain.top_ids)


def test_training_lowers_kl_on_held_out_tokens(llama, trained):
    ids = random_ids(llama, batch=1, pos=40, seed=7)[0]  # not in the training corpus
    final, resid = _streams(llama, ids)
    weight, bias = trained.translators.weight.detach(), trained.translators.bias.detach()
    for i in range(len(resid) - 1):
        logit_kl = _kl(_read_out(llama, resid[i]), final).mean()
        translated = resid[i] + resid[i] @ weight[i].T + bias[i]
        tuned_kl = _kl(_read_out(llama, translated), final).mean()
        assert float(tuned_kl) < 0.9 * float(logit_kl), i
    assert float(weight[-1].abs().max()) == 0 and float(bias[-1].abs().max()) == 0  # the last stays the identity
    torch.testing.assert_close(
        trained.apply(1, resid[2]), _read_out(llama, resid[2] + resid[2] @ weight[2].T + bias[2])
    )


def test_save_reload_and_mismatches(llama, trained, tmp_path):
    path = trained.save(tmp_path / "lens.safetensors")
    again = load_tuned_lens(llama, path)
    x = torch.randn(5, llama.d_model)
    for layer in ("embed", 0, 2):
        assert torch.equal(again.apply(layer, x), trained.apply(layer, x))
    assert again.info == trained.info
    with pytest.raises(LmscopeError, match="another model: model 'tiny-llama'"):
        load_tuned_lens(tiny_model("gpt2"), path)  # same sizes, another model
    (tmp_path / "bad.safetensors").write_bytes(b"not a tuned lens")
    with pytest.raises(LmscopeError, match="cannot read"):
        load_tuned_lens(llama, tmp_path / "bad.safetensors")
    with pytest.raises(LmscopeError, match="no such file"):
        load_tuned_lens(llama, tmp_path / "missing.pt")


def test_cli_logit_lens(capsys, tmp_path, smollm2):
    code, out, _ = run_cli(capsys, "lens", "The capital of France is", "--out", str(tmp_path / "lens"))
    assert code == 0 and "Paris" in out
    saved = read_results(tmp_path / "lens")["parts"]["lens"]
    assert len(saved["layers"]) == smollm2.n_layers + 1 and saved["target_tokens"][-1] == [" Paris"]
    assert (tmp_path / "lens" / "logit_lens_rank.png").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train-tuned", "--corpus", "/no/such/corpus.txt"], "corpus /no/such/corpus.txt: no such file"),
        (["--tuned", "/no/such/lens.safetensors"], "no such file"),
        (["--tuned", "BAD"], "cannot read"),
        (["--tuned", "BAD", "--train-tuned"], "not both"),
    ],
)
def test_cli_bad_input(capsys, tmp_path, argv, message):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("garbage")
    argv = [str(bad) if a == "BAD" else a for a in argv]
    code, _, err = run_cli(capsys, "lens", "hi", *argv, "--out", str(tmp_path / "out"))
    assert code == 2
    assert message in err and err.strip().count("\n") == 0 and "Traceback" not in err


def test_cli_train_save_and_reload_tuned_lens(capsys, tmp_path, smollm2):
    path = tmp_path / "tuned.safetensors"
    common = ["lens", "The capital of France is", "--token", " Paris", "--top", "3"]
    train = ["--train-tuned", "--corpus", "wikitext2", "--tokens", "48", "--steps", "1", "--save", str(path)]
    code, out, _ = run_cli(capsys, *common, *train, "--out", str(tmp_path / "a"))
    assert code == 0 and path.is_file() and "Tuned lens" in out
    code, _, _ = run_cli(capsys, *common, "--tuned", str(path), "--out", str(tmp_path / "b"))
    assert code == 0
    a, b = (read_results(tmp_path / d)["parts"]["lens"] for d in "ab")
    assert a["labels"] == ["token ' Paris'"] and a["prob"] == b["prob"] and a["rank"] == b["rank"]
    assert (tmp_path / "b" / "tuned_lens_prob_token_paris.png").is_file()


def test_tuned_lens_beats_the_logit_lens_on_smollm2_at_every_middle_layer(smollm2):
    """Issue 13's ground truth on a real model: after a short training on WikiText-2, the tuned
    lens's KL to the final logits on held-out tokens is below the logit lens's at every middle
    layer (``scripts/lens_kl.py`` runs the long version)."""
    from lmscope.core.corpus import load_corpus

    m = smollm2
    ids = load_corpus(m, "wikitext2", max_tokens=1024 + 128).tokens
    held, train = ids[:128], ids[128:]
    tuned = train_tuned_lens(m, train, steps=4, lr=1e-3, length=48, batch_size=2)
    identity = TunedLens.identity(m)
    middle = range(m.n_layers // 4, 3 * m.n_layers // 4)
    with torch.no_grad():
        run = m.run(held[None], capture=[f"blocks.{layer}.resid_post" for layer in middle])
        for layer in middle:
            resid = run.cache[f"blocks.{layer}.resid_post"]
            kl = {
                name: float(_kl(lens_.apply(layer, resid), run.logits).mean())
                for name, lens_ in (("logit", identity), ("tuned", tuned))
            }
            assert kl["tuned"] < kl["logit"], (layer, kl)

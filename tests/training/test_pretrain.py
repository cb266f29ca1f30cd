"""Pre-training: the data stream, the schedule, bit-identical resumption after an interruption,
the saved model (plain transformers and lmscope.load), the A/B report and the CLI."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import lmscope
from lmscope.core.errors import LmscopeError
from lmscope.core.corpus import Corpus
from lmscope.training import PretrainSettings, pretrain
from lmscope.training.pretrain import CHECKPOINT, Batches, evaluation_corpus, lr_factor, training_corpus
from tests.helpers import one_thread, read_results, run_cli


class Interrupted(Exception):
    pass


def test_batches_are_a_function_of_seed_and_step():
    corpus = Corpus("toy", torch.arange(10 * 4))  # 10 windows of 4 tokens: window w holds 4w..4w+3
    batches = Batches(corpus, seq_len=4, batch_size=3, seed=7)
    again = Batches(corpus, seq_len=4, batch_size=3, seed=7)
    assert all(torch.equal(batches(s), again(s)) for s in (5, 0, 3))  # any order of calls
    firsts = torch.cat([batches(s)[:, 0] // 4 for s in range(10)])  # 30 windows = 3 epochs
    for epoch in range(3):  # every epoch visits every window once, each in its own order
        assert sorted(firsts[10 * epoch : 10 * epoch + 10].tolist()) == list(range(10))
    assert not torch.equal(firsts[:10], firsts[10:20])
    assert not torch.equal(Batches(corpus, 4, 3, seed=8)(0), batches(0))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, 100, 10, 0.1) for s in range(1, 101)]
    assert factors[:10] == pytest.approx([s / 10 for s in range(1, 11)])
    assert factors[-1] == pytest.approx(0.1) and factors[54] == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))


@pytest.fixture(scope="module")
def corpora(tiny_settings, tokenizer):
    train = training_corpus(tokenizer, tiny_settings.corpus)
    probe = evaluation_corpus(tokenizer, tiny_settings.eval_corpus, tiny_settings.eval_tokens).head(64)
    return train, probe


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny_settings, tokenizer, corpora):
    """The OSP recipe trained for 6 steps straight, and again interrupted after step 5 (the last
    checkpoint at step 4) then resumed."""
    train, probe = corpora
    root = tmp_path_factory.mktemp("resume")

    def interrupt(step: int, loss: float) -> None:
        if step == 5:
            raise Interrupted

    with one_thread():
        straight = pretrain("osp", tiny_settings, tokenizer, train, probe, root / "straight")
        with pytest.raises(Interrupted):
            pretrain("osp", tiny_settings, tokenizer, train, probe, root / "interrupted", on_step=interrupt)
        checkpoint = torch.load(root / "interrupted" / CHECKPOINT, weights_only=True)
        again = pretrain("osp", tiny_settings, tokenizer, train, probe, root / "interrupted", resume=True)
    return straight, checkpoint, again


def test_resumed_training_is_bit_identical(resumed, tiny_settings):
    straight, checkpoint, again = resumed
    assert checkpoint["step"] == 4 and checkpoint["data_position"] == 4 * tiny_settings.batch_size
    assert set(checkpoint["optimizers"]) == {"adamw", "muon"}
    assert len(straight.losses) == len(again.losses) == tiny_settings.steps
    assert straight.losses == again.losses  # float equality: bit for bit
    assert straight.losses[-1] < straight.losses[0]
    assert [k["step"] for k in again.kurtosis] == [0, 2, 4, 6]
    assert straight.kurtosis == again.kurtosis
    a = AutoModelForCausalLM.from_pretrained(straight.model_path).state_dict()
    b = AutoModelForCausalLM.from_pretrained(again.model_path).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(resumed, tiny_settings, tokenizer, corpora, tmp_path):
    straight, _, _ = resumed
    out = tmp_path / "copy"
    out.mkdir()
    (out / CHECKPOINT).write_bytes((Path(straight.model_path).parent / CHECKPOINT).read_bytes())
    with pytest.raises(LmscopeError, match="other settings"):
        pretrain("osp", replace(tiny_settings, steps=8), tokenizer, *corpora, out, resume=True)


def test_saved_model_loads_with_transformers_and_lmscope(resumed, tokenizer):
    path = resumed[0].model_path
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    m = lmscope.load(path, device="cpu")
    assert m.n_layers == 2 and m.d_model == 64 and m.d_vocab == len(tokenizer)
    text = "The game was released in Japan"
    ids = m.tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(m.run(ids).logits, hf(input_ids=ids).logits)
    norms = [p for n, p in hf.named_parameters() if "norm" in n]
    assert len(norms) == 5 and all(torch.all(p == p[0]) for p in norms)  # SSNorm: one scale each


def test_settings_are_checked():
    with pytest.raises(LmscopeError, match="--corpus /no/such.txt: no such file"):
        PretrainSettings(corpus="/no/such.txt")
    with pytest.raises(LmscopeError, match="not a multiple"):
        PretrainSettings(d_model=100, n_heads=3)
    with pytest.raises(LmscopeError, match="--steps must be at least 1, not 0"):
        PretrainSettings(steps=0)


def _cli_args(settings, out) -> list[str]:
    return [
        "pretrain", "--compare", "adam,osp", "--tokenizer", settings.tokenizer, "--corpus", settings.corpus,
        "--eval-corpus", settings.eval_corpus, "--layers", "2", "--d-model", "64", "--heads", "2", "--seq-len", "32",
        "--batch-size", "2", "--steps", "4", "--log-every", "2", "--checkpoint-every", "2", "--eval-tokens", "512",
        "--device", "cpu", "--out", str(out),
    ]  # fmt: skip


def test_cli_ab_writes_the_report_and_resumes(capsys, tiny_settings, tmp_path):
    with one_thread():
        code, out, _ = run_cli(capsys, *_cli_args(tiny_settings, tmp_path))
    assert code == 0 and "adam" in out and "osp" in out
    results = read_results(tmp_path)
    assert results["command"] == "pretrain" and results["recipes"] == ["adam", "osp"]
    runs = results["parts"]["comparison"]["runs"]
    assert set(runs) == {"adam", "osp"}
    for run in runs.values():
        assert len(run["losses"]) == 4 and [k["step"] for k in run["kurtosis"]] == [0, 2, 4]
        ppl = run["evaluation"]["perplexity"]
        assert set(ppl) == {"fp", "W4A4KV4", "W4A4KV4+rot"}
        assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    for name in ("report.html", "pretrain_loss.png", "pretrain_kurtosis.png", "pretrain_perplexity.png"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "osp" / "model" / "config.json").is_file()
    # a rerun with the same settings reads the finished recipes back: nothing is trained again
    with one_thread():
        code, _, _ = run_cli(capsys, *_cli_args(tiny_settings, tmp_path))
    assert code == 0 and read_results(tmp_path)["resumed"] == ["adam", "osp", "comparison"]
    again = read_results(tmp_path)["parts"]["comparison"]["runs"]
    assert again == runs


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--recipe", "lion"], "unknown --recipe 'lion'"),
        (["--compare", "adam,lion"], "unknown recipe 'lion'"),
        (["--corpus", "/no/such.txt"], "--corpus /no/such.txt: no such file"),
        (["--eval-corpus", "/no/such.jsonl"], "--eval-corpus /no/such.jsonl: no such file"),
        (["--d-model", "100", "--heads", "3"], "not a multiple"),
    ],
)
def test_cli_bad_input_one_line_exit_2(capsys, tmp_path, argv, message):
    code, _, err = run_cli(capsys, "pretrain", *argv, "--out", str(tmp_path))
    assert code == 2 and message in err and err.strip().count("\n") == 0


@pytest.mark.parametrize(
    "damage",
    ["empty", "garbage", "truncated", "jsonl", "a list", "keys missing", "a folder"],
)
def test_damaged_checkpoint_is_a_one_line_error_naming_it(resumed, tiny_settings, tokenizer, corpora, tmp_path, damage):
    """A checkpoint that is not one lmscope wrote (or was cut short) is refused naming the file,
    before any step, never a traceback from torch.load or a missing key."""
    good = (Path(resumed[0].model_path).parent / CHECKPOINT).read_bytes()
    path = tmp_path / CHECKPOINT
    if damage == "a folder":
        path.mkdir()
    elif damage in ("a list", "keys missing"):
        torch.save([1, 2] if damage == "a list" else {"recipe": "osp"}, path)
    else:
        content = {"empty": b"", "garbage": bytes(range(256)) * 16, "truncated": good[: len(good) // 2]}
        path.write_bytes(content.get(damage, b'{"clean": "a"}\n'))
    with pytest.raises(LmscopeError) as error:
        pretrain("osp", tiny_settings, tokenizer, *corpora, tmp_path, resume=True)
    assert str(path) in str(error.value) and "\n" not in str(error.value)

"""Answers of several tokens: scored whole (teacher-forced log-probability) against a plain Hugging
Face loop, shortened to their first token for the one-token metrics and counted, refused cleanly
when empty; ``--answer-token`` on the command line."""

from __future__ import annotations

import json

import pytest
import torch

from lmscope.circuits.pairs import PromptPair, answer_logprobs, shortened, tokenize_pairs
from lmscope.core.errors import LmscopeError
from tests.helpers import one_thread, read_results, run_cli

LONG = " Maryabcdefgh xyz"  # several tokens in SmolLM2's vocabulary
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def _teacher_forced(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """log p(answer | prompt) by one plain HF forward per answer token, each on the prompt and the
    answer's tokens so far."""
    total, ids = 0.0, list(prompt_ids)
    with torch.no_grad():
        for token in answer_ids:
            logits = model.hf(input_ids=torch.tensor([ids])).logits[0, -1]
            total += float(logits.double().log_softmax(-1)[token])
            ids.append(token)
    return total


def test_whole_answers_score_as_a_teacher_forced_loop(smollm2):
    tok = smollm2.tokenizer
    pairs = [
        PromptPair(CLEAN, CORRUPT, (LONG, " Mary"), (" John",)),  # several candidates: their total probability
        PromptPair("The capital is", "Well, the capital is", (" the city of Paris",), (" x",)),  # left-padded
    ]
    token_pairs = tokenize_pairs(smollm2, pairs, align="final")
    with one_thread():
        got = answer_logprobs(smollm2, token_pairs)
    assert got.shape == (2, 2) and got.dtype == torch.float64
    for row, pair in enumerate(pairs):
        answers = [tok(a, add_special_tokens=False)["input_ids"] for a in pair.answer]
        assert max(map(len, answers)) > 1
        for col, prompt in enumerate((pair.clean, pair.corrupt)):
            prompt_ids = tok(prompt)["input_ids"]
            with one_thread():
                scores = torch.tensor([_teacher_forced(smollm2, prompt_ids, a) for a in answers], dtype=torch.float64)
            want = float(torch.logsumexp(scores, 0))
            assert abs(float(got[row, col]) - want) < 2e-3, (row, col, float(got[row, col]), want)


def test_first_answer_token_keeps_whole_answers_and_counts_the_shortened(smollm2):
    tok = smollm2.tokenizer
    pairs = [
        PromptPair(CLEAN, CORRUPT, (LONG,), (" John",)),
        PromptPair(CORRUPT, CLEAN, (" John", LONG), (" Mary",)),
        PromptPair([1, 2, 3], [1, 2, 4], (17,), (18,)),  # token ids stand for themselves
    ]
    (a, b, c) = tokenize_pairs(smollm2, pairs)
    long_ids = tuple(tok(LONG, add_special_tokens=False)["input_ids"])
    assert len(long_ids) > 1
    assert a.answer.tolist() == [long_ids[0]] and a.answer_tokens == (long_ids,)
    assert b.answer.tolist() == [tok(" John", add_special_tokens=False)["input_ids"][0], long_ids[0]]
    assert c.answer.tolist() == [17] and c.continuations("wrong") == ((18,),)
    assert shortened([a, b, c]) == 2  # LONG twice; " John", " Mary" and the ids are one token each


@pytest.mark.parametrize("answer, wrong", [(("",), (" John",)), ((" Mary",), (" John", ""))])
def test_an_empty_answer_is_an_error_naming_the_pair(smollm2, answer, wrong):
    pairs = [PromptPair(CLEAN, CORRUPT, (" Mary",), (" John",)), PromptPair(CLEAN, CORRUPT, answer, wrong)]
    with pytest.raises(LmscopeError, match=r"pair 1: (wrong_)?answer '' has no tokens"):
        tokenize_pairs(smollm2, pairs)


def test_other_answer_tokens_are_refused(smollm2):
    with pytest.raises(LmscopeError, match="answer token 'all' is not supported"):
        tokenize_pairs(smollm2, [PromptPair(CLEAN, CORRUPT, (LONG,), (" John",))], answer_token="all")


# -- the command line ---------------------------------------------------------------------------


def _file(tmp_path, rows: list[dict]):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_locate_records_the_answer_token_and_the_shortened_answers(capsys, tmp_path):
    rows = [
        {"clean": CLEAN, "corrupt": CORRUPT, "answer": LONG, "wrong_answer": " John"},
        {"clean": CORRUPT, "corrupt": CLEAN, "answer": [" John", " Johnny boy"], "wrong_answer": " Mary"},
    ]
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "locate", "--data", str(_file(tmp_path, rows)), "--method", "attribution", "--answer-token", "first",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [notes[0]] and "2 of 5 answers have several tokens" in notes[0]  # LONG, " Johnny boy"
    results = read_results(out)
    assert results["settings"]["answer_token"] == "first"
    answers = results["parts"]["locate"]["answers"]
    assert (answers["answer_token"], answers["candidates"], answers["shortened"]) == ("first", 5, 2)
    whole = answers["whole_answer_logprob"]
    assert whole["clean"] < 0 and whole["corrupt"] < 0


@pytest.mark.parametrize(
    "row, extra, message",
    [
        ({"answer": ""}, [], "field 'answer' must be a non-empty string"),
        ({}, ["--answer-token", "all"], "answer token 'all' is not supported"),
    ],
)
def test_bad_answers_are_one_line_errors(capsys, tmp_path, row, extra, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    data = _file(tmp_path, [{"clean": CLEAN, "corrupt": CORRUPT, "answer": " Mary", "wrong_answer": " John", **row}])
    code, _, err = run_cli(capsys, "locate", "--data", str(data), "--out", str(out), *extra)
    assert code == 2 and err.startswith("error:") and message in err and err.strip().count("\n") == 0, err
    assert "Traceback" not in err and read_results(out) == {"earlier": True}

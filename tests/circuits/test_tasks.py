"""Prompt-pair datasets: JSONL validation and the built-in generators on SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

import lmscope
from lmscope.circuits import tasks
from lmscope.circuits.head_roles import repeated_loss


def _write(tmp_path, lines):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_pairs_with_candidate_lists(tmp_path):
    obj = {"clean": "a b", "corrupt": "a c", "answer": [" x", " y"], "wrong_answer": " z"}
    (pair,) = tasks.load_pairs(_write(tmp_path, [json.dumps(obj), ""]))
    assert pair.answer == (" x", " y") and pair.wrong_answer == (" z",)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "pairs.jsonl:1: malformed JSON"),
        ('{"clean": "a", "corrupt": "b", "answer": "c"}', "pairs.jsonl:1: missing field 'wrong_answer'"),
        ('{"clean": "", "corrupt": "b", "answer": "c", "wrong_answer": "d"}', "'clean' must be"),
        ('{"clean": "a", "corrupt": "b", "answer": [], "wrong_answer": "d"}', "'answer' must be"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    with pytest.raises(lmscope.LmscopeError, match=message):
        tasks.load_pairs(_write(tmp_path, [line]))


def test_empty_file(tmp_path):
    with pytest.raises(lmscope.LmscopeError, match="no prompt pairs"):
        tasks.load_pairs(_write(tmp_path, [""]))


def _accuracy_and_logit_diff(model, name, n):
    pairs = tasks.tokenize_pairs(model, tasks.GENERATORS[name](model, n=n))
    correct, diffs = 0, []
    for p in pairs:
        logits = model.run(p.clean[None]).logits[0, -1]
        correct += int(logits.argmax() == p.answer[0])
        diffs.append(float(logits[p.answer].mean() - logits[p.wrong].mean()))
    return correct / len(pairs), sum(diffs) / len(diffs), len(pairs)


def test_smollm2_solves_the_builtin_tasks(smollm2):
    acc, diff, n = _accuracy_and_logit_diff(smollm2, "ioi", 40)
    assert n == 40 and acc >= 0.95 and diff > 3.0
    acc, diff, n = _accuracy_and_logit_diff(smollm2, "capitals", 10)
    assert n >= 8 and acc >= 0.8
    first, second = repeated_loss(smollm2)
    assert first > 10 and second < first / 3


def test_generated_pairs_tokenise_to_equal_lengths(smollm2):
    for name in tasks.GENERATORS:
        for p in tasks.tokenize_pairs(smollm2, tasks.builtin(smollm2, name)):
            assert p.clean.shape == p.corrupt.shape and torch.all(p.clean_mask == 1)

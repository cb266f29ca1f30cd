"""Directions and probes against the planted direction and hand computations."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lmscope.core.errors import LmscopeError
from lmscope.steering.directions import Examples, features, fit_logistic, load_examples, probe
from tests.steering.planted import pairs, planted, sentences


def test_probes_recover_the_planted_direction():
    model, u = planted()
    result = probe(model, pairs(32), layers=[0, 1], test_fraction=0.25)
    for method in ("mean_diff", "pca", "logistic"):
        cos = torch.nn.functional.cosine_similarity(result.directions[method], u[None], dim=-1)
        assert (cos > 0.9).all(), (method, cos)
        assert result.accuracy[method] == [1.0, 1.0]
    assert result.n_test == 16 and result.n_train == 48  # pairs stay together: 8 of 32 held out


def test_labelled_sets_and_positions_match_hf_hidden_states():
    model, _ = planted()
    texts = ["w1 [[w2 good]] w3", "w4 [[bad]] w5 w6 w7"]
    got = {p: features(model, texts, [0], position=p) for p in ("last", "mean", "span")}
    clean = ["w1 w2 good w3", "w4 bad w5 w6 w7"]
    spans = [(1, 3), (1, 2)]  # token ranges of the marked spans
    for i, text in enumerate(clean):
        ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
        h = model.hf(ids, output_hidden_states=True).hidden_states[1][0]  # layer 0's output [pos, d]
        torch.testing.assert_close(got["last"][i, 0], h[-1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["mean"][i, 0], h.mean(0), rtol=1e-5, atol=1e-6)
        a, b = spans[i]
        torch.testing.assert_close(got["span"][i, 0], h[a:b].mean(0), rtol=1e-5, atol=1e-6)


def test_logistic_probe_minimises_the_sklearn_objective():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(40, generator=g) > 0).long()
    fit = fit_logistic(x, y)
    z = (x - fit.mu).double()
    s = y.double() * 2 - 1
    # first-order optimality of 0.5|w|^2 + sum softplus(-s (z w + b)), by hand
    sig = torch.sigmoid(-s * (z @ fit.weight.double() + fit.bias))
    grad_w = fit.weight.double() - (sig * s) @ z
    grad_b = -(sig * s).sum()
    assert grad_w.abs().max() < 1e-4 and abs(float(grad_b)) < 1e-4


@pytest.mark.parametrize(
    "line, message",
    [
        ({"text": "a", "label": 2}, "field 'label' must be 0 or 1"),
        ({"prompt": "a", "positive": 1, "negative": "b"}, "field 'positive' must be a non-empty string"),
        ({"words": "a"}, "expected a JSON object {text, label} or {positive, negative[, prompt]}"),
    ],
)
def test_bad_example_files_name_the_line(tmp_path, line, message):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "ok", "label": 1}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(LmscopeError, match=f"x.jsonl:2: .*{re.escape(message)}"):
        load_examples(path)


def test_examples_need_both_labels_and_one_kind(tmp_path):
    with pytest.raises(LmscopeError, match="both labels"):
        Examples.from_labels(["a", "b"], [1, 1])
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"positive": "b", "negative": "c"}\n')
    with pytest.raises(LmscopeError, match="mixes"):
        load_examples(path)


def test_span_position_needs_a_marked_span():
    model, _ = planted()
    with pytest.raises(LmscopeError, match="marked"):
        features(model, sentences(2), [0], position="span")
    with pytest.raises(LmscopeError, match="unknown position"):
        features(model, sentences(2), [0], position="first")

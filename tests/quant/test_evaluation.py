"""Evaluation checked against naive loops over plain Hugging Face forwards: strided perplexity
in float64, per-choice log-probabilities without padding, JSONL validation, SmolLM2 sanity."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lmscope
from lmscope.quant.configs import KVQuant, QuantConfig
from lmscope.core.corpus import Corpus, load_corpus
from lmscope.quant.evaluation import Choice, choice_accuracy, choice_scores, load_choices, perplexity
from tests.helpers import kv_reference_interventions, logits_under


def _naive_perplexity(model, tokens, window, stride, interventions=()):
    """Loop over window starts 0, stride, ...; score all targets of the first window and the last
    ``stride`` targets of later ones; exp(mean nll) in float64."""
    nlls = []
    for i, start in enumerate(range(0, len(tokens) - window + 1, stride)):
        ids = tokens[start : start + window][None]
        logits = logits_under(model, ids, interventions=list(interventions))[0].double()
        logprobs = torch.log_softmax(logits, -1)
        first_target = 1 if i == 0 else max(window - stride, 1)  # target 0 has no context
        for target in range(first_target, window):
            nlls.append(-float(logprobs[target - 1, ids[0, target]]))
    mean = math.fsum(nlls) / len(nlls)
    return math.exp(mean), mean, len(nlls)


@pytest.mark.parametrize("window, stride, batch_size", [(16, None, 2), (16, 16, 4), (16, 8, 3), (12, 5, 2), (8, 1, 16)])
def test_perplexity_equals_naive_strided_loop(tiny_models, window, stride, batch_size):
    """Strided perplexity == a per-window loop scoring each token once (first window: all)."""
    model = tiny_models["llama"]
    corpus = Corpus("t", torch.randint(3, 90, (70,), generator=torch.Generator().manual_seed(0)))
    got = perplexity(model, corpus, window=window, stride=stride, batch_size=batch_size)
    ppl, nll, n = _naive_perplexity(model, corpus.tokens, window, stride or window)
    assert got["n_scored"] == n
    assert got["nll"] == pytest.approx(nll, rel=1e-5) and got["perplexity"] == pytest.approx(ppl, rel=1e-5)
    if stride is not None and stride < window:
        # every token after the first is predicted exactly once, up to the last full window
        n_windows = (70 - window) // stride + 1
        assert n == (n_windows - 1) * stride + window - 1


def test_perplexity_under_kv_quantisation(tiny_models):
    """A KV config applies inside perplexity: == the naive loop with hand-quantised k/v sites."""
    model = tiny_models["gemma2"]
    corpus = Corpus("t", torch.randint(3, 90, (50,), generator=torch.Generator().manual_seed(1)))
    kv = KVQuant(2, 3, group_size=16)
    got = perplexity(model, corpus, window=12, stride=6, config=QuantConfig(kv=kv))
    ppl, _, n = _naive_perplexity(model, corpus.tokens, 12, 6, kv_reference_interventions(model, kv))
    plain, _, _ = _naive_perplexity(model, corpus.tokens, 12, 6)
    assert got["n_scored"] == n and got["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert abs(ppl - plain) > 1e-3 * plain


def test_perplexity_rejects_stride_longer_than_window(tiny_models):
    """A stride past the window would skip tokens: an error."""
    corpus = Corpus("t", torch.randint(3, 90, (40,)))
    with pytest.raises(lmscope.LmscopeError, match="stride"):
        perplexity(tiny_models["llama"], corpus, window=8, stride=9)


@pytest.mark.slow
def test_smollm2_wikitext2_perplexity_under_kv_quantisation(smollm2):
    """SmolLM2 on 1024 WikiText-2 tokens: K8V8 within 1% of full precision, K2V2 worse than K4V4."""
    corpus = load_corpus(smollm2, "wikitext2", max_tokens=1024)
    assert len(corpus) == 1024
    ppl = {
        name: perplexity(smollm2, corpus, window=512, config=QuantConfig(kv=lmscope.quant.parse_kv(name)))["perplexity"]
        for name in ("fp", "k8v8", "k4v4", "k2v2")
    }
    assert 5 < ppl["fp"] < 60  # a 135M model on Wikipedia text, not a broken evaluation
    assert abs(ppl["k8v8"] - ppl["fp"]) < 0.01 * ppl["fp"]
    assert ppl["k2v2"] > ppl["k4v4"] > ppl["fp"]


# -- multiple choice -----------------------------------------------------------------------------


def _write(tmp_path, lines):
    path = tmp_path / "choices.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_choices(tmp_path):
    """Valid lines become Choice items; blank lines are skipped."""
    obj = {"context": "a b", "choices": [" x", " y", " z"], "answer": 2}
    items = load_choices(_write(tmp_path, [json.dumps(obj), "", json.dumps({**obj, "answer": 0})]))
    assert items == [Choice("a b", (" x", " y", " z"), 2), Choice("a b", (" x", " y", " z"), 0)]


@pytest.mark.parametrize(
    "lines, message",
    [
        (["{not json"], r"choices\.jsonl:1: malformed JSON"),
        (['{"context": "a", "choices": ["x", "y"], "answer": 0}', "", "[1"], r"choices\.jsonl:3: malformed JSON"),
        (['{"choices": ["x", "y"], "answer": 0}'], r"choices\.jsonl:1: missing field 'context'"),
        (['{"context": "a", "answer": 0}'], r"choices\.jsonl:1: missing field 'choices'"),
        (['{"context": "a", "choices": ["x"], "answer": 0}'], "at least 2 items"),
        (['{"context": "a", "choices": ["x", ""], "answer": 0}'], "each a non-empty string"),
        (['{"context": "a", "choices": ["x", "y"]}'], r"choices\.jsonl:1: missing field 'answer'"),
        (['{"context": "a", "choices": ["x", "y"], "answer": 2}'], r"'answer' must be the index.*0\.\.1"),
        (['{"context": "a", "choices": ["x", "y"], "answer": -1}'], "'answer' must be"),
        (['{"context": "a", "choices": ["x", "y"], "answer": "0"}'], "'answer' must be"),
        (['["a", "b"]'], "expected a JSON object"),
        ([""], "no multiple-choice items"),
    ],
)
def test_load_choices_errors_name_file_and_line(tmp_path, lines, message):
    """Malformed lines raise LmscopeError naming file:line and the bad field."""
    with pytest.raises(lmscope.LmscopeError, match=message):
        load_choices(_write(tmp_path, lines))


def test_load_choices_missing_file(tmp_path):
    """A missing file is an LmscopeError, not an OSError."""
    with pytest.raises(lmscope.LmscopeError, match="nope.jsonl: no such file"):
        load_choices(tmp_path / "nope.jsonl")


def _naive_choice_score(model, context, choice):
    """One unpadded HF forward of context + choice; sum of the choice tokens' log-probs."""
    tok = model.tokenizer
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model.hf(input_ids=ids, use_cache=False).logits[0].double(), -1)
    return sum(float(logprobs[len(ctx) + i - 1, t]) for i, t in enumerate(cont))


def test_choice_scores_equal_per_choice_forwards(smollm2):
    """Batched, padded scoring == each choice run alone through HF (choices of different lengths)."""
    item = Choice("The cat sat on the", (" mat", " extraordinarily comfortable sofa", " roof of the house"), 0)
    lengths = {len(smollm2.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in item.choices}
    assert len(lengths) > 1
    scores = choice_scores(smollm2, item)
    expected = torch.tensor([_naive_choice_score(smollm2, item.context, c) for c in item.choices], dtype=torch.float64)
    torch.testing.assert_close(scores, expected, atol=2e-3, rtol=1e-4)


def test_choice_accuracy_on_obvious_items(smollm2, tmp_path):
    """Three items any LM gets right (answers at different indices): accuracy 1.0, also at K8V8."""
    lines = [
        {"context": "The capital of France is", "choices": [" Paris", " banana"], "answer": 0},
        {"context": "One, two, three, four,", "choices": [" purple", " five", " yesterday"], "answer": 1},
        {"context": "The opposite of hot is", "choices": [" table", " swimming", " cold"], "answer": 2},
    ]
    items = load_choices(_write(tmp_path, [json.dumps(x) for x in lines]))
    assert choice_accuracy(smollm2, items) == {"accuracy": 1.0, "n": 3}
    assert choice_accuracy(smollm2, items, config=QuantConfig(kv=KVQuant(8, 8)))["accuracy"] == 1.0
    # the scoring is not constant: swapping the answers makes every prediction wrong
    swapped = [Choice(i.context, i.choices, (i.answer + 1) % len(i.choices)) for i in items]
    assert choice_accuracy(smollm2, swapped)["accuracy"] == 0.0

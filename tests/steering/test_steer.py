"""Steering vectors and the evaluated sweep, against the planted model and hand computations
with plain PyTorch forward hooks on the Hugging Face model (not lmscope's hooks)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from lmscope.core.errors import LmscopeError
from lmscope.steering.steer import (
    EvalItem,
    Setting,
    SweepCells,
    SweepData,
    choose,
    interventions,
    parse_layers,
    steering_vectors,
    sweep,
)
from tests.steering.planted import pairs, planted, sentences

INSTRUCTION = "good good"


@contextlib.contextmanager
def added(model, layer: int, vector: torch.Tensor):
    """Add ``vector`` to decoder layer ``layer``'s output with a plain forward hook."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + vector
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.hf.model.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def logp(model, ids: list[int]) -> torch.Tensor:
    return F.log_softmax(model.hf(torch.tensor([ids])).logits[0].float(), -1)


def encode(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def data() -> SweepData:
    items = [EvalItem(s, " P", " N") for s in sentences(4, seed=5)]
    windows = [encode(planted()[0], s) for s in sentences(2, seed=7)]
    return SweepData(items, sentences(3, seed=6), windows)


@pytest.fixture(scope="module")
def result():
    model, _ = planted()
    vectors = steering_vectors(model, pairs(16), [0, 1])
    settings = [Setting((1,), c) for c in (-1.0, 1.0, 2.0)] + [Setting((0, 1), 1.0)]
    return model, vectors, sweep(model, vectors, settings, data(), instruction=INSTRUCTION, samples=1, max_new_tokens=3)


def test_vectors_are_the_class_mean_difference_along_u():
    model, u = planted()
    vectors = steering_vectors(model, pairs(16), [1])
    assert F.cosine_similarity(vectors[1], u, dim=0) > 0.99


@torch.no_grad()
def test_sweep_rows_equal_hand_computation(result):
    model, vectors, res = result
    rows = {r["setting"]: r for r in res.rows}
    d = data()
    for setting in (Setting((1,), 2.0), Setting((0, 1), 1.0)):
        with contextlib.ExitStack() as stack:
            for layer in setting.layers:
                stack.enter_context(added(model, layer, setting.coeff * vectors[layer]))
            diffs = []
            for item in d.items:
                prompt = encode(model, item.prompt)
                lp_t = logp(model, prompt + encode(model, item.target))[len(prompt) - 1, encode(model, item.target)[0]]
                lp_o = logp(model, prompt + encode(model, item.opposite))[
                    len(prompt) - 1, encode(model, item.opposite)[0]
                ]
                diffs.append(float(lp_t - lp_o))
            steered = [logp(model, encode(model, t)) for t in d.neutral]
            nll = [-logp(model, w)[:-1].gather(1, torch.tensor(w[1:])[:, None]).sum() for w in d.windows]
        plain = [logp(model, encode(model, t)) for t in d.neutral]
        row = rows[setting.name]
        assert row["behaviour"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-4, abs=1e-5)
        n_tokens = sum(len(w) - 1 for w in d.windows)
        assert row["perplexity"] == pytest.approx(float(torch.exp(sum(nll) / n_tokens)), rel=1e-4)
        # the sweep averages over every position but the last (whose next token is unknown)
        kl_all = sum(float((p[:-1].exp() * (p[:-1] - q[:-1])).sum()) for p, q in zip(plain, steered))
        assert row["kl"] == pytest.approx(kl_all / sum(len(p) - 1 for p in plain), rel=1e-4, abs=1e-6)


@torch.no_grad()
def test_prompting_baseline_scores_only_the_original_tokens(result):
    model, _, res = result
    row = next(r for r in res.rows if r["setting"] == "prompting")
    prefix = encode(model, INSTRUCTION)
    diffs = []
    for item in data().items:
        ids = prefix + encode(model, item.prompt)
        out = logp(model, ids + encode(model, item.target))[len(ids) - 1]
        diffs.append(float(out[encode(model, item.target)[0]] - out[encode(model, item.opposite)[0]]))
    assert row["behaviour"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-4)


def test_steering_along_u_moves_the_output_as_designed(result):
    _, _, res = result
    b = {r["setting"]: r["behaviour"] for r in res.rows}
    assert b["L1 x-1"] < b["none"] < b["L1 x1"] < b["L1 x2"]


def test_batched_sweep_equals_the_naive_loop(result):
    model, vectors, res = result
    settings = [Setting((1,), c) for c in (-1.0, 1.0, 2.0)] + [Setting((0, 1), 1.0)]
    naive = sweep(model, vectors, settings, data(), instruction=INSTRUCTION, samples=0, batched=False)
    for a, b in zip(res.rows, naive.rows, strict=True):
        for key in ("behaviour", "kl", "perplexity", "p_target"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["setting"], key)


def test_samples_and_choice(result):
    _, _, res = result
    assert res.samples and {"prompt", "none", "prompting"} <= res.samples[0].keys()
    rows = [
        {"setting": "none", "layers": "", "behaviour": 0.0, "kl": 0.0, "perplexity": 10.0},
        {"setting": "a", "layers": "1", "behaviour": 5.0, "kl": 0.5, "perplexity": 10.0},
        {"setting": "b", "layers": "1", "behaviour": 3.0, "kl": 0.1, "perplexity": 12.0},
        {"setting": "c", "layers": "1", "behaviour": 2.0, "kl": 0.1, "perplexity": 10.5},
    ]
    assert choose(rows, max_kl=0.2, max_ppl_rise=0.1) == "c"
    assert choose(rows, max_kl=1.0, max_ppl_rise=0.5) == "a"
    assert choose(rows, max_kl=0.01, max_ppl_rise=0.1) is None
    assert res.to_json()["chosen"] == res.chosen


def test_bad_settings_are_one_line_errors():
    model, _ = planted()
    with pytest.raises(LmscopeError, match="out of range"):
        parse_layers("1,7", model.n_layers)
    with pytest.raises(LmscopeError, match="bad layer list"):
        parse_layers("1,x", model.n_layers)
    assert parse_layers("0,1,0+1", 2) == [(0,), (1,), (0, 1)]
    with pytest.raises(LmscopeError, match="no steering vector for layer"):
        interventions({0: torch.zeros(32)}, [Setting((1,), 1.0)])


def test_a_sweep_cell_by_cell_resumes_after_k_cells(result):
    """With one setting per batch, a sweep stopped after 3 cells (unsteered, prompting, one setting)
    and given them back measures the other 3 settings only, to the numbers of an uninterrupted run
    (which match the batched sweep's)."""
    model, vectors, batched = result
    settings = [Setting((1,), c) for c in (-1.0, 1.0, 2.0)] + [Setting((0, 1), 1.0)]
    kwargs = {"instruction": INSTRUCTION, "samples": 0, "cells_per_batch": 1}
    saved = []

    def stop_after_three(cells):
        saved.append(dict(cells.measures))
        if len(saved) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(model, vectors, settings, data(), on_cells=stop_after_three, **kwargs)
    assert list(saved[-1]) == ["none", "prompting", "L1 x-1"]
    progress = []
    earlier = SweepCells(saved[-1], total=6)
    resumed = sweep(
        model, vectors, settings, data(), earlier=earlier, on_cells=lambda c: progress.append(len(c.measures)), **kwargs
    )
    assert progress == [4, 5, 6]  # the three missing settings, one batch each
    full = sweep(model, vectors, settings, data(), **kwargs)
    assert resumed.rows == full.rows
    for a, b in zip(full.rows, batched.rows, strict=True):
        for key in ("behaviour", "kl", "perplexity", "p_target"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["setting"], key)

"""LinEAS: the 1-D transport loss against brute force, the learned maps on the planted model
(they move the source distribution onto the target's, and steering with them moves the output
as designed), the group-sparsity switch, and save/reload."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmscope.core.errors import LmscopeError
from lmscope.steering.directions import features
from lmscope.steering.lineas import load_transport, train_lineas, wasserstein_1d
from lmscope.steering.steer import EvalItem, SweepData, sweep
from tests.helpers import one_thread
from tests.steering.planted import planted, sentences


def test_wasserstein_equals_the_best_matching_by_brute_force():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g) * 2 + 1
    best = [
        min(sum(float((x[i, j] - y[p[i], j]) ** 2) for i in range(5)) / 5 for p in itertools.permutations(range(5)))
        for j in range(3)
    ]
    assert float(wasserstein_1d(x, y)) == pytest.approx(sum(best) / 3, rel=1e-5)


def test_wasserstein_interpolates_the_target_quantiles_for_unequal_counts():
    x = torch.tensor([[0.0], [1.0]])  # levels 0.25 and 0.75
    y = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # quantile at level q: 4q - 0.5 in index units
    # level 0.25 -> index 0.5 -> 0.5; level 0.75 -> index 2.5 -> 2.5
    assert float(wasserstein_1d(x, y)) == pytest.approx(((0 - 0.5) ** 2 + (1 - 2.5) ** 2) / 2)


@pytest.fixture(scope="module")
def trained():
    model, _ = planted()
    source = [f"{s} bad" for s in sentences(32, seed=1)]
    target = [f"{s} good" for s in sentences(32, seed=2)]
    with one_thread():
        transport = train_lineas(model, source, target, [0, 1], position="last", steps=60, lr=0.1, sparsity=1e-3)
    return model, source, target, transport


def test_transport_moves_the_source_onto_the_target(trained):
    model, source, target, transport = trained
    tgt = features(model, target, [1], position="last")[:, 0]
    before = features(model, source, [1], position="last")[:, 0]
    with torch.no_grad():
        moved = torch.stack(
            [
                model.run(
                    model.tokenizer(t, return_tensors="pt")["input_ids"],
                    ["blocks.1.resid_post"],
                    transport.interventions([1.0]),
                ).cache["blocks.1.resid_post"][0, -1]
                for t in source
            ]
        )
    assert float(wasserstein_1d(moved, tgt)) < 0.1 * float(wasserstein_1d(before, tgt))
    assert transport.info["loss"][-1] < 0.1 * transport.info["loss"][0]


def test_steering_with_the_transport_moves_the_output_as_designed(trained):
    model, _, _, transport = trained
    data = SweepData([EvalItem(f"{s} bad", " P", " N") for s in sentences(4, seed=8)], sentences(2, seed=9))
    settings = [transport.setting(s) for s in (0.5, 1.0)]
    res = sweep(model, transport.steerer(), settings, data, samples=0)
    b = [r["behaviour"] for r in res.rows]
    assert b[0] < b[1] < b[2]  # none < strength 0.5 < strength 1


def test_group_sparsity_switches_layers_off():
    model, _ = planted()
    source = [f"{s} bad" for s in sentences(8, seed=1)]
    target = [f"{s} good" for s in sentences(8, seed=2)]
    with one_thread():
        off = train_lineas(model, source, target, [0, 1], position="last", steps=5, lr=0.1, sparsity=1e4)
    assert off.active() == [] and off.interventions([1.0]) == []
    assert torch.equal(off.scale, torch.ones_like(off.scale)) and not off.shift.any()


def test_interventions_follow_the_formula_and_reload(trained, tmp_path):
    model, source, _, transport = trained
    ids = model.tokenizer(source[0], return_tensors="pt")["input_ids"]
    plain = model.run(ids, ["blocks.0.resid_post"]).cache["blocks.0.resid_post"]
    half = model.run(ids, ["blocks.0.resid_post"], transport.interventions([0.5])).cache["blocks.0.resid_post"]
    i = transport.layers.index(0)
    expected = plain + 0.5 * ((transport.scale[i] - 1) * plain + transport.shift[i])
    torch.testing.assert_close(half, expected)
    again = load_transport(transport.save(tmp_path / "t.safetensors"))
    assert again.layers == transport.layers and torch.equal(again.shift, transport.shift)
    with pytest.raises(LmscopeError, match="at least 2"):
        train_lineas(model, source[:1], source, [0])

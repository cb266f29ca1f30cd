"""Circuit selection, pruning, faithfulness and CRS."""

from __future__ import annotations

import json
import math

import pytest

from lmscope.circuits.edges import edge_attribution
from lmscope.circuits.faithfulness import crs, faithfulness
from lmscope.circuits.graph import Circuit, draw, prune, select
from tests.helpers import planted_model, token_pair
from tests.tiny import CONFIGS


@pytest.mark.parametrize(
    "b, c, expected",
    [
        # B > 0, C >= B: full score.
        (2.0, 3.0, 100.0),
        (2.0, 2.0, 100.0),
        # B > 0, 0 <= C < B: sf 1.0, dist = B - C.
        (2.0, 1.0, 100 * 1.0 * math.exp(-(2 - 1) / 2)),  # 100 exp(-0.5)
        (2.0, 0.0, 100 * 1.0 * math.exp(-(2 - 0) / 2)),  # 100 exp(-1)
        # B > 0, C < 0: sf 0.6, dist = B - C.
        (2.0, -1.0, 100 * 0.6 * math.exp(-(2 - (-1)) / 2)),  # 60 exp(-1.5)
        # B <= 0, C >= 0: sf 0.8, dist = |C| (the target is C = 0, not B).
        (-2.0, 1.0, 100 * 0.8 * math.exp(-1 / 2)),  # 80 exp(-0.5)
        (-2.0, 0.0, 100 * 0.8 * math.exp(0)),  # 80
        # B <= 0, C < 0: sf 0.5, dist = |C|, even when C > B.
        (-2.0, -3.0, 100 * 0.5 * math.exp(-3 / 2)),  # 50 exp(-1.5)
        (-2.0, -1.0, 100 * 0.5 * math.exp(-1 / 2)),  # 50 exp(-0.5)
        # B = 0: |B| replaced by eps = 1e-9.
        (0.0, 0.0, 100 * 0.8 * math.exp(0)),  # 80
        (0.0, -1e-9, 100 * 0.5 * math.exp(-1e-9 / 1e-9)),  # 50 exp(-1)
    ],
)
def test_crs_hand_values(b, c, expected):
    """CRS exactly as the ``CRS`` function of the paper's ``1.circuit_construction.ipynb``."""
    assert abs(crs(b, c) - expected) < 1e-9


def test_prune_keeps_only_paths_from_input_to_logits():
    edges = [
        ("input", "a0.h1<q>", 1.0),
        ("a0.h1", "m1", 0.5),
        ("m1", "logits", 2.0),
        ("a0.h3", "logits", 3.0),  # not reached from the input
        ("input", "a1.h0<v>", 1.0),  # leads nowhere
    ]
    kept = prune(Circuit(edges)).edges
    assert kept == edges[:3]
    assert prune(Circuit(edges)).nodes == ["input", "a0.h1", "m1", "logits"]


def test_planted_circuit_is_found_and_faithful(tmp_path):
    model, (layer, head) = planted_model()
    pair = token_pair(model, pos=8, differ=(2,))
    scores = edge_attribution(model, [pair], steps=10)
    circuit = select(scores, top=4)
    assert f"a{layer}.h{head}" in circuit.nodes and "logits" in circuit.nodes
    f = faithfulness(model, [pair], circuit)
    assert abs(f.normalised - 1.0) < 1e-4
    # The paper's CRS with C = B: 100 when B > 0; when B <= 0 the target is C = 0, dist = |C| = |B|.
    perfect = 100.0 if f.baseline > 0 else 100 * (0.8 if f.circuit >= 0 else 0.5) * math.exp(-1)
    assert abs(f.crs - perfect) < 1e-2
    assert json.loads(json.dumps(f.to_json())) == vars(f)
    nodes = faithfulness(model, [pair], circuit.nodes)  # node-level: all other heads and MLPs ablated
    assert abs(nodes.normalised - 1.0) < 1e-4
    empty = faithfulness(model, [pair], ["input", "logits"])  # everything ablated: the corrupted run
    assert abs(empty.normalised) < 1e-4
    graph = circuit.to_json()
    json.dumps(graph)
    assert {"from", "to", "input", "score"} <= set(graph["edges"][0])
    assert draw(circuit, tmp_path / "c.png").stat().st_size > 1000


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_edge_ablation_with_all_or_no_edges_reproduces_clean_or_corrupt_run(tiny_models, name):
    """Keeping every edge must give the clean run; keeping none must give the corrupted run
    (each input then reads the corrupted residual stream): independent references."""
    model = tiny_models[name]
    pair = token_pair(model, pos=8, differ=(2, 5))
    scores = edge_attribution(model, [pair], steps=1)
    assert len(json.loads(json.dumps(scores.to_json()))["edges"]) == int(scores.valid.sum())
    everything = faithfulness(model, [pair], Circuit(scores.edges()))
    nothing = faithfulness(model, [pair], Circuit([]))
    assert abs(everything.circuit - everything.baseline) < 1e-4
    assert abs(nothing.circuit - nothing.corrupt) < 1e-4


def test_selection_arguments(tiny_models):
    import lmscope

    model = tiny_models["llama"]
    scores = edge_attribution(model, [token_pair(model)], steps=1)
    with pytest.raises(lmscope.LmscopeError):
        select(scores)
    assert len(select(scores, threshold=0.0).edges) > 0

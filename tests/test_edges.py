"""Edge attribution (EAP / EAP-IG): the chain rule ties edges to nodes; planted circuit."""

from __future__ import annotations

import pytest

from lmscope.circuits.attribution import attribute
from lmscope.circuits.edges import edge_attribution, graph_nodes
from tests.test_attribution import planted_model
from tests.test_patching import token_pair


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "gpt_neox_serial", "qwen3", "phi3", "gemma"])
@pytest.mark.parametrize("steps", [1, 4])
def test_edges_leaving_a_node_sum_to_its_node_score(tiny_models, name, steps):
    """dM/d out_u = sum over the inputs v reading u of dM/d in_v, so the edge scores of u sum
    to u's node attribution, computed independently by autograd at the node's own output.
    (Not for post-norm families, where a head's share of the normalised output holds the
    norm's scale fixed.)"""
    model = tiny_models[name]
    pair = token_pair(model, pos=8, differ=(2, 5))
    edges = edge_attribution(model, [pair], steps=steps)
    method = "attribution" if steps == 1 else "eap-ig"
    heads = attribute(model, [pair], method, "head", steps=steps).scores[:, 0, :]
    mlps = attribute(model, [pair], method, "mlp", steps=steps).scores[:, 0, 0]
    resid0 = attribute(model, [pair], method, "resid", steps=steps).scores[0, 0, 0]
    sums = dict(zip(edges.upstream, edges.scores.sum(1).tolist()))
    scale = float(heads.abs().max())
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            assert abs(sums[f"a{layer}.h{head}"] - float(heads[layer, head])) < 1e-5 * (1 + scale)
        assert abs(sums[f"m{layer}"] - float(mlps[layer])) < 1e-5 * (1 + scale)
    assert abs(sums["input"] - float(resid0)) < 1e-5 * (1 + scale)


def test_graph_has_only_forward_edges(tiny_models):
    up, down, valid = graph_nodes(tiny_models["llama"])
    assert len(up) == 1 + 3 * (4 + 1) and len(down) == 3 * (3 * 4 + 1) + 1
    u, d = {n: i for i, n in enumerate(up)}, {n: i for i, n in enumerate(down)}
    assert valid[u["input"], d["a0.h0<q>"]] and valid[u["a0.h1"], d["m0"]] and valid[u["m2"], d["logits"]]
    assert not valid[u["a1.h0"], d["a1.h2<k>"]] and not valid[u["m1"], d["a1.h0<v>"]] and not valid[u["m1"], d["m1"]]
    _, _, parallel = graph_nodes(tiny_models["gpt_neox"])
    assert not parallel[u["a1.h0"], d["m1"]]  # parallel attention and MLP read the same residual


def test_planted_head_edges_are_strongest():
    """Only the planted head moves information: the two strongest edges run input -> planted
    head -> logits."""
    model, (layer, head) = planted_model()
    edges = edge_attribution(model, [token_pair(model, pos=8, differ=(2,))], steps=10)
    top = sorted(edges.edges(), key=lambda e: -abs(e[2]))[:2]
    node = f"a{layer}.h{head}"
    assert {(u, v.split("<")[0]) for u, v, _ in top} == {("input", node), (node, "logits")}

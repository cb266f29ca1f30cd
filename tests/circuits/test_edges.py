"""Edge attribution (EAP / EAP-IG): the chain rule ties edges to nodes; planted circuit."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from lmscope.circuits.attribution import attribute
from lmscope.circuits.edges import edge_attribution, graph_nodes
from tests.helpers import planted_model, token_pair


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


def _node_scores_by_hand(model, pair, steps: int) -> dict[str, float]:
    """EAP (steps=1) / EAP-IG node scores with plain PyTorch, independent of lmscope's hooks and
    attribution code: forwards of the Hugging Face model with plain forward hooks that add a zero
    tensor requiring grad to the embedding, every output projection and every MLP output, so
    autograd gives dM/d(what each writes to the residual stream). A head's output is its share of
    the output projection, z_h W_O[h]; its score is (out(clean) - out(corrupt)) . dM/d out, summed
    over positions, with the gradient averaged over embeddings interpolated from corrupted to
    clean (EAP-IG), divided by M(clean) - M(corrupt) for the logit difference M."""
    hf, fam, H, D = model.hf, model.family, model.n_heads, model.d_head
    embed = hf.get_submodule(fam.embed)
    layers = hf.get_submodule(fam.layers)
    o_projs = [layer.get_submodule(fam.o_proj) for layer in layers]
    mlps = [layer.get_submodule(fam.mlp) for layer in layers]

    def forward(ids, embeds=None):
        """Logit difference and, per tapped module, (its input, its output, the zero added to it)."""
        taps, handles = {}, []

        def tap(name, replace=None):
            def hook(module, args, out):
                taps[name] = (args[0].detach(), out.detach(), torch.zeros_like(out, requires_grad=True))
                return (out if replace is None else replace) + taps[name][2]

            return hook

        handles.append(embed.register_forward_hook(tap("input", embeds)))
        for i, (o, mlp) in enumerate(zip(o_projs, mlps)):
            handles += [o.register_forward_hook(tap(f"a{i}")), mlp.register_forward_hook(tap(f"m{i}"))]
        try:
            logits = hf(input_ids=ids[None]).logits[0, -1]
        finally:
            for handle in handles:
                handle.remove()
        return logits[pair.answer].mean() - logits[pair.wrong].mean(), taps

    def head_outputs(o, z):  # [pos, H, d_model]: z_h W_O[h]
        w = o.weight if isinstance(o, Conv1D) else o.weight.T  # [H * D, d_model]
        return torch.einsum("phd,hde->phe", z[0].unflatten(-1, (H, D)), w.unflatten(0, (H, D)))

    with torch.no_grad():
        clean_m, clean = forward(pair.clean)
        corrupt_m, corrupt = forward(pair.corrupt)
    grads = {}
    for k in range(steps):
        e_clean, e_corrupt = clean["input"][1], corrupt["input"][1]
        m, taps = forward(pair.corrupt, e_corrupt + k / steps * (e_clean - e_corrupt))
        m.backward()
        for name, (_, _, zero) in taps.items():
            grads[name] = grads.get(name, 0) + zero.grad[0] / steps
    hf.zero_grad(set_to_none=True)
    with torch.no_grad():
        scores = {"input": ((clean["input"][1] - corrupt["input"][1])[0] * grads["input"]).sum()}
        for i, o in enumerate(o_projs):
            per_head = head_outputs(o, clean[f"a{i}"][0]) - head_outputs(o, corrupt[f"a{i}"][0])
            for h in range(H):
                scores[f"a{i}.h{h}"] = (per_head[:, h] * grads[f"a{i}"]).sum()
            scores[f"m{i}"] = ((clean[f"m{i}"][1] - corrupt[f"m{i}"][1])[0] * grads[f"m{i}"]).sum()
    return {name: float(s / (clean_m - corrupt_m)) for name, s in scores.items()}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("steps", [1, 3])
def test_edges_leaving_a_node_sum_to_a_plain_autograd_reference(tiny_models, name, steps):
    """The chain rule against an independent reference: the edge scores leaving each node sum to
    its EAP / EAP-IG node score computed by hand with plain autograd (:func:`_node_scores_by_hand`),
    with grouped-query attention (Llama) and with a fused Conv1D projection (GPT-2)."""
    model = tiny_models[name]
    pair = token_pair(model, pos=8, differ=(2, 5))
    edges = edge_attribution(model, [pair], steps=steps)
    sums = dict(zip(edges.upstream, edges.scores.sum(1).tolist()))
    reference = _node_scores_by_hand(model, pair, steps)
    assert sorted(reference) == sorted(sums)
    scale = max(abs(v) for v in reference.values())
    assert scale > 1e-2  # the pair moves the metric: the comparison is not between zeros
    for node, value in reference.items():
        assert abs(sums[node] - value) < 1e-5 * (1 + scale), node


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


def test_paper_schedule_edges_sum_to_paper_schedule_nodes(tiny_models):
    """With the Temporal Heads code's schedule (k = 1..steps) edges still sum to the node scores
    integrated on the same schedule, and differ from the upstream schedule's (k = 0..steps-1)."""
    model = tiny_models["llama"]
    pair = token_pair(model, pos=8, differ=(2, 5))
    paper = edge_attribution(model, [pair], steps=2, schedule="paper")
    upstream = edge_attribution(model, [pair], steps=2)
    heads = attribute(model, [pair], "eap-ig", "head", steps=2, schedule="paper").scores[:, 0, :]
    sums = dict(zip(paper.upstream, paper.scores.sum(1).tolist()))
    scale = float(heads.abs().max())
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            assert abs(sums[f"a{layer}.h{head}"] - float(heads[layer, head])) < 1e-5 * (1 + scale)
    assert not torch.allclose(paper.scores, upstream.scores)


def test_edge_scores_do_not_depend_on_the_budget(tiny_models):
    """One interpolation step per backward, two with the gradients held over chunks, or all five
    at once: the same edge scores."""
    model = tiny_models["qwen2"]
    pairs = [token_pair(model, pos=8, differ=(2, 5), seed=s) for s in range(2)]
    from lmscope.circuits.attribution import step_bytes
    from lmscope.circuits.edges import _chunking

    up, down, _ = graph_nodes(model)
    fixed, held = len(up) * 8 * model.d_model * 4, len(down) * 8 * model.d_model * 4
    middle = fixed + held + 2 * step_bytes(model, 8, edges=True)  # two steps per backward, gradients held
    assert _chunking(model, 8, 5, middle, fixed, len(down)) == (2, True)
    assert _chunking(model, 8, 5, 1, fixed, len(down)) == (1, False)
    small, held_run, large = (edge_attribution(model, pairs, steps=5, max_memory=b).scores for b in (1, middle, 10**11))
    torch.testing.assert_close(small, large, rtol=0, atol=1e-5)
    torch.testing.assert_close(held_run, large, rtol=0, atol=1e-5)


def test_a_smaller_budget_lowers_peak_memory(smollm2):
    """SmolLM2, one 40-token pair, 8 steps: with a budget of one step per backward the peak
    resident memory is well under that of all 8 steps at once."""
    from lmscope.circuits.pairs import TokenPair
    from lmscope.core.memory import PeakMemory

    ids, ones = torch.arange(1000, 1040), torch.ones(40, dtype=torch.long)
    pair = TokenPair(ids, ids.flip(0), torch.tensor([5]), torch.tensor([6]), ones, ones.clone())
    peaks = {}
    for name, budget in (("one step", 1), ("all steps", 10**12)):
        edge_attribution(smollm2, [pair], steps=8, max_memory=budget)  # warm the allocator
        with PeakMemory("cpu") as peak:
            edge_attribution(smollm2, [pair], steps=8, max_memory=budget)
        peaks[name] = peak.peak
    assert peaks["one step"] < 0.6 * peaks["all steps"], peaks

"""Exact activation patching against the naive loop (one full forward per patch)."""

from __future__ import annotations

import random

import pytest
import torch

import lmscope
from lmscope.circuits import tasks
from lmscope.circuits.metrics import get_metric
from lmscope.circuits.patching import activation_patching
from tests.helpers import check_against_naive, token_pair

FAMILIES = ["llama", "gpt2", "gemma2", "qwen3", "gpt_neox", "phi3", "mistral", "olmo2", "gemma3"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("per_position", [False, True])
def test_heads_match_naive_loop(tiny_models, name, per_position):
    model = tiny_models[name]
    check_against_naive(model, token_pair(model, pos=9, differ=(3, 6)), "head", per_position)


@pytest.mark.parametrize("component", ["attn", "mlp", "resid"])
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_layer_components_match_naive_loop(tiny_models, component, direction):
    model = tiny_models["llama"]
    check_against_naive(model, token_pair(model, differ=(2,)), component, True, direction)


@pytest.mark.parametrize("metric", ["logprob", "prob", "kl"])
def test_other_metrics_match_naive_loop(tiny_models, metric):
    model = tiny_models["qwen2"]
    check_against_naive(model, token_pair(model, differ=(5,)), "head", False, metric=metric)


def test_mean_over_pairs_and_padding_alignment(tiny_models):
    """Two pairs of different lengths, one clean/corrupt pair of unequal length aligned on the
    final position: scores are the normalised mean over pairs."""
    model = tiny_models["llama"]
    a = token_pair(model, pos=9, differ=(4,), seed=1)
    b = token_pair(model, pos=7, differ=(1,), seed=2)
    result = activation_patching(model, [a, b], "head")
    metric = get_metric("logit_diff")
    m = lambda ids, ivs=(): model.run(ids[None], interventions=list(ivs)).logits[:, -1]
    for layer, head in [(0, 1), (2, 3)]:
        vals, cleans, corrupts = [], [], []
        for pair in (a, b):
            site = f"blocks.{layer}.attn.z"
            src = model.run(pair.clean[None], capture=[site]).cache
            vals.append(float(metric(m(pair.corrupt, [lmscope.patch(site, src, head=head)]), pair)[0]))
            cleans.append(float(metric(m(pair.clean), pair)[0]))
            corrupts.append(float(metric(m(pair.corrupt), pair)[0]))
        mean = lambda xs: sum(xs) / len(xs)
        ref = (mean(vals) - mean(corrupts)) / (mean(cleans) - mean(corrupts))
        assert abs(float(result.scores[layer, 0, head]) - ref) < 1e-4


def test_unequal_lengths_rejected_unless_aligned(smollm2):
    pair = tasks.PromptPair(
        "The capital of France is", "The capital of the United Kingdom is", (" Paris",), (" London",)
    )
    with pytest.raises(lmscope.LmscopeError, match="align on the final position"):
        tasks.tokenize_pairs(smollm2, [pair])
    with pytest.raises(lmscope.LmscopeError, match="align on the final position"):
        activation_patching(smollm2, [pair], "mlp")  # prompt pairs are aligned at the boundary only
    (tp,) = tasks.tokenize_pairs(smollm2, [pair], align="final")
    assert len(tp.clean) == len(tp.corrupt) and tp.clean_mask[0] == 0 and tp.clean[-1] == tp.corrupt[-1]
    result = activation_patching(smollm2, [tp], "mlp")
    # reference: the naive loop with the left-padded clean prompt as the patch source
    site = "blocks.3.mlp.out"
    clean = {"input_ids": tp.clean[None], "attention_mask": tp.clean_mask[None]}
    corrupt = {"input_ids": tp.corrupt[None], "attention_mask": tp.corrupt_mask[None]}
    src = smollm2.run(clean, capture=[site]).cache
    metric = get_metric("logit_diff")
    lg = lambda inputs, ivs=(): smollm2.run(inputs, interventions=list(ivs)).logits[:, -1]
    patched = float(metric(lg(corrupt, [lmscope.patch(site, src)]), tp)[0])
    c, k = float(metric(lg(clean), tp)[0]), float(metric(lg(corrupt), tp)[0])
    assert abs(float(result.scores[3, 0, 0]) - (patched - k) / (c - k)) < 1e-4


def test_smollm2_ioi_heads_match_naive_loop(smollm2):
    (pair,) = tasks.tokenize_pairs(smollm2, tasks.ioi(smollm2, n=1))
    check_against_naive(smollm2, pair, "head", False, cells=[(L, 0, h) for L in range(0, 30, 3) for h in range(9)])
    rng = random.Random(0)
    cells = [(rng.randrange(30), rng.randrange(8, len(pair.clean)), rng.randrange(9)) for _ in range(12)]
    result = check_against_naive(smollm2, pair, "head", True, cells=cells)
    first = int((pair.clean != pair.corrupt).nonzero()[0])
    assert torch.all(result.scores[:, :first] == 0)  # nothing before the first differing token moves


@pytest.mark.parametrize(
    ("family", "per_position", "direction"),
    [("mixtral", False, "denoising"), ("mixtral", True, "noising"), ("llama4_text", True, "denoising")],
)
def test_experts_match_naive_loop(family, per_position, direction):
    """Expert level: every routed expert's output patched (weighted by the base run's routing),
    batched with the cached prefix, equals one full forward with lmscope.patch per expert; Mixtral
    routes top-k with weights on the outputs, Llama 4 scales the experts' inputs."""
    from tests.families import tiny_family_model

    model = tiny_family_model(family)
    pair = token_pair(model, pos=7, differ=(2, 4), seed=3)
    result = check_against_naive(model, pair, "expert", per_position, direction)
    assert result.scores.shape == (model.n_layers, 7 if per_position else 1, 4)
    assert result.scores.abs().max() > 1e-3  # some expert matters


def test_experts_in_dense_layers_keep_the_base_score():
    """Qwen2-MoE's first layer is dense (mlp_only_layers): nothing is patched there (score 0 when
    denoising), the MoE layers match the naive loop."""
    from tests.families import tiny_family_model

    model = tiny_family_model("qwen2_moe")
    pair = token_pair(model, pos=6, differ=(1, 3), seed=2)
    cells = [(layer, 0, e) for layer in (1, 2) for e in range(4)]
    result = check_against_naive(model, pair, "expert", False, cells=cells)
    assert bool((result.scores[0] == 0).all())

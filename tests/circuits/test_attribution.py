"""Attribution patching and EAP-IG: exact where the model is linear in the patched
component, first-order close elsewhere, and the right head on a planted circuit."""

from __future__ import annotations

import pytest
import torch

from lmscope.circuits.attribution import attribute
from lmscope.circuits.patching import activation_patching
from lmscope.core.errors import LmscopeError
from tests.helpers import planted_model, token_pair


@pytest.mark.parametrize("method", ["exact", "attribution", "eap-ig"])
def test_every_method_ranks_the_planted_head_first(method):
    model, (layer, head) = planted_model()
    pair = token_pair(model, pos=8, differ=(2,))
    if method == "exact":
        result = activation_patching(model, [pair], "head")
    else:
        result = attribute(model, [pair], method, "head", steps=20)
    scores = result.scores[:, 0, :].abs()
    assert divmod(int(scores.argmax()), model.n_heads) == (layer, head)
    others = scores.clone()
    others[layer, head] = 0
    assert float(others.max()) < 1e-4  # no other head can matter
    if method == "exact":
        assert abs(float(result.scores[layer, 0, head]) - 1.0) < 1e-4


def test_attribution_approximates_exact_patching_of_the_last_mlp(tiny_models):
    """The last MLP reaches the logits only through the final norm: nearly linear, so the
    first-order estimate must be close to exact patching there."""
    model = tiny_models["llama"]
    pair = token_pair(model, pos=8, differ=(6,))
    exact = activation_patching(model, [pair], "mlp").scores
    approx = attribute(model, [pair], "attribution", "mlp").scores
    assert torch.allclose(exact[-1], approx[-1], atol=0.15)


def test_eap_ig_with_one_step_equals_attribution_patching(tiny_models):
    model = tiny_models["gpt2"]
    pair = token_pair(model, pos=8, differ=(3,))
    a = attribute(model, [pair], "attribution", "head")
    e = attribute(model, [pair], "eap-ig", "head", steps=1)
    torch.testing.assert_close(a.scores, e.scores)


def test_eap_ig_completeness_on_the_input(tiny_models):
    """Integrated gradients are complete (Sundararajan et al. 2017): summed over the input
    embedding, the attribution equals M(clean) - M(corrupt) as steps grow."""
    from lmscope.circuits.attribution import integrated_gradients
    from lmscope.circuits.metrics import get_metric
    from lmscope.circuits.pairs import bind

    model = tiny_models["qwen2"]
    pair = token_pair(model, pos=6, differ=(1, 4))
    metric = get_metric("logit_diff")
    clean = model.run(pair.clean[None], capture=["embed"])
    corrupt = model.run(pair.corrupt[None], capture=["embed"])
    grads = integrated_gradients(model, bind(metric, pair, clean.logits[0, -1]), ["embed"], steps=200)
    total = float(((clean.cache["embed"][0] - corrupt.cache["embed"][0]) * grads["embed"]).sum())
    m = lambda logits: float(metric(logits[:, -1], pair)[0])
    assert abs(total - (m(clean.logits) - m(corrupt.logits))) < 0.02 * abs(m(clean.logits) - m(corrupt.logits)) + 1e-3


def test_paper_schedule_integrates_over_k_1_to_steps(tiny_models):
    """schedule="paper" (the EAP-IG code vendored by "Temporal Heads"): alphas k / steps for
    k = 1 .. steps, so one step is the gradient at the clean input; "upstream": k = 0 .. steps-1."""
    from lmscope.circuits.attribution import integrated_gradients, interpolations
    from lmscope.circuits.metrics import get_metric
    from lmscope.circuits.pairs import bind

    model = tiny_models["llama"]
    pair = token_pair(model, pos=8, differ=(2, 5))
    clean = model.run(pair.clean[None], capture=["embed"]).cache["embed"]
    corrupt = model.run(pair.corrupt[None], capture=["embed"]).cache["embed"]
    for schedule, ks in (("paper", [1, 2, 3, 4]), ("upstream", [0, 1, 2, 3])):
        embeds = []
        for inputs, iv in interpolations(model, pair, steps=4, batch=3, schedule=schedule):
            embeds.append(model.run(inputs, capture=["embed"], interventions=[iv]).cache["embed"])
        want = torch.cat([corrupt + (k / 4) * (clean - corrupt) for k in ks])
        torch.testing.assert_close(torch.cat(embeds), want)

    bound = bind(get_metric("logit_diff"), pair, model.run(pair.clean[None]).logits[0, -1])
    run = model.run(pair.clean[None], capture=["blocks.1.attn.z"], grad=True)
    bound(run.logits[:, -1]).sum().backward()
    grads = integrated_gradients(model, bound, ["blocks.1.attn.z"], steps=1, schedule="paper")
    torch.testing.assert_close(grads["blocks.1.attn.z"], run.cache["blocks.1.attn.z"].grad[0])
    a = attribute(model, [pair], "eap-ig", "head", steps=1, schedule="paper").scores
    c = model.run(pair.clean[None], capture=["blocks.1.attn.z"]).cache["blocks.1.attn.z"][0]
    k = model.run(pair.corrupt[None], capture=["blocks.1.attn.z"]).cache["blocks.1.attn.z"][0]
    m = lambda which: float(bound(model.run(pair.inputs(which)).logits[:, -1])[0])
    want = ((c - k) * run.cache["blocks.1.attn.z"].grad[0]).sum((0, 2)) / (m("clean") - m("corrupt"))
    torch.testing.assert_close(a[1, 0], want)
    with pytest.raises(LmscopeError, match="unknown schedule"):
        attribute(model, [pair], "eap-ig", "head", schedule="k=1")


def test_steps_per_backward_follow_the_budget(smollm2):
    """gradient_rows: one step when the budget holds less than one, all steps when it holds
    them all, and more steps for more memory; a longer prompt or edges cost more per step."""
    from lmscope.circuits.attribution import gradient_rows

    assert gradient_rows(smollm2, 16, 100, budget=1) == 1
    assert gradient_rows(smollm2, 16, 100, budget=10**13) == 100
    rows = [gradient_rows(smollm2, 16, 100, budget=b) for b in (2**28, 2**30, 2**32)]
    assert 1 < rows[0] < rows[1] < rows[2] <= 100
    assert gradient_rows(smollm2, 256, 100, budget=2**30) < rows[1]
    assert gradient_rows(smollm2, 16, 100, budget=2**30, edges=True) < rows[1]


@pytest.mark.parametrize("method", ["attribution", "eap-ig"])
def test_scores_do_not_depend_on_the_budget(tiny_models, method):
    """One step per backward (a 1-byte budget) or all of them at once: the same scores."""
    model = tiny_models["llama"]
    pairs = [token_pair(model, pos=8, differ=(2, 5), seed=s) for s in range(2)]
    small, large = (attribute(model, pairs, method, steps=5, max_memory=b).scores for b in (1, "100GB"))
    torch.testing.assert_close(small, large, rtol=0, atol=1e-5)


def test_expert_attribution_is_the_first_order_effect_of_each_expert():
    """Expert level (mixture-of-experts): each expert's score is (a_clean - a_corrupt) . dM/da at
    the corrupted run, normalised; the reference is a finite difference of the metric with the
    expert's output moved a step eps towards the clean one (an edit of the site)."""
    from lmscope.circuits.metrics import get_metric
    from lmscope.core.interventions import apply
    from tests.families import tiny_family_model

    model = tiny_family_model("mixtral")
    pair = token_pair(model, pos=7, differ=(1, 3), seed=1)
    result = attribute(model, [pair], "attribution", "expert")
    assert result.scores.shape == (model.n_layers, 1, 4)
    assert {row["expert"] for row in result.rows()} == {0, 1, 2, 3}
    metric = get_metric("logit_diff")
    m = lambda run: float(metric(run.logits[:, -1], pair)[0])
    clean_m, corrupt_m = m(model.run(pair.clean[None])), m(model.run(pair.corrupt[None]))
    eps = 1e-3
    for layer in range(model.n_layers):
        for e in range(4):
            site = f"blocks.{layer}.moe.expert.{e}"
            a_clean = model.run(pair.clean[None], capture=[site]).cache[site]
            step = apply(site, lambda x, a=a_clean: x + eps * (a - x))
            moved = m(model.run(pair.corrupt[None], interventions=[step]))
            reference = (moved - corrupt_m) / eps / (clean_m - corrupt_m)
            assert float(result.scores[layer, 0, e]) == pytest.approx(reference, rel=2e-2, abs=1e-3)


def test_expert_level_errors(tiny_models):
    from lmscope.circuits.locate import locate

    pair = token_pair(tiny_models["llama"], pos=6)
    with pytest.raises(LmscopeError, match="no mixture-of-experts layers"):
        attribute(tiny_models["llama"], [pair], "attribution", "expert")
    with pytest.raises(LmscopeError, match="no mixture-of-experts layers"):
        locate(tiny_models["llama"], [pair], "exact", "expert")

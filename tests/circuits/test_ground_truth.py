"""Ground truth the methods did not see: a tiny attention-only transformer trained, here, to copy
in context must show a previous-token head in layer 0 and induction heads in layer 1; every
method must rank an induction head first; zeroing the induction heads must destroy copying."""

from __future__ import annotations

import pytest
import torch

import lmscope
from lmscope.circuits import tasks
from lmscope.circuits.attribution import attribute
from lmscope.circuits.head_roles import head_roles, repeated_loss, repeated_tokens
from lmscope.circuits.patching import activation_patching
from tests.tiny import train_induction_model


@pytest.fixture(scope="module")
def trained():
    model = train_induction_model()
    roles = head_roles(model, length=10, seed=5)
    return model, roles


def _induction_heads(roles) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for a, b in (roles.induction > 0.5).nonzero()}


def test_it_learned_to_copy(trained):
    model, _ = trained
    first, second = repeated_loss(model, length=10, seed=5)
    assert first > 2.0 and second < 0.5


def test_roles_find_previous_token_and_induction_heads(trained):
    _, roles = trained
    layer, _, score = roles.top("induction", 1)[0]
    assert layer == 1 and score > 0.5
    layer, _, score = roles.top("previous_token", 1)[0]
    assert layer == 0 and score > 0.4
    assert all(layer == 1 for layer, _ in _induction_heads(roles))


@pytest.mark.parametrize("method", ["exact", "attribution", "eap-ig"])
def test_methods_rank_an_induction_head_first(trained, method):
    model, roles = trained
    pairs = tasks.tokenize_pairs(model, tasks.induction(model, n=6, length=10))
    if method == "exact":
        scores = activation_patching(model, pairs, "head").scores[:, 0]
    else:
        scores = attribute(model, pairs, method, "head", steps=20).scores[:, 0]
    top = divmod(int(scores.argmax()), model.n_heads)
    assert top in _induction_heads(roles)


def test_zeroing_the_induction_heads_destroys_copying(trained):
    model, roles = trained
    ids = repeated_tokens(model, batch=8, length=10, seed=5)

    def second_half_loss(interventions):
        logits = model.run(ids, interventions=interventions).logits
        return float(torch.nn.functional.cross_entropy(logits[:, 10:-1].flatten(0, 1), ids[:, 11:].flatten()))

    intact = second_half_loss([])
    ablated = second_half_loss([lmscope.zero(f"blocks.{L}.attn.z", head=h) for L, h in _induction_heads(roles)])
    assert intact < 0.5 and ablated > 2.0

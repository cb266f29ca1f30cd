"""Routing statistics against a naive per-token loop over Hugging Face's own router logits, and
specialisation on a model whose experts are planted (tests/experts/synthetic.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lmscope.core.errors import LmscopeError
from lmscope.experts import expert_stats
from lmscope.core.corpus import Corpus
from tests.experts import synthetic
from tests.families import tiny_family_model
from tests.tiny import tiny_model

WINDOW = 8


@pytest.fixture(scope="module")
def mixtral():
    return tiny_family_model("mixtral")


def _corpora(m) -> list[Corpus]:
    g = torch.Generator().manual_seed(3)
    return [
        Corpus("low", torch.randint(3, 40, (40,), generator=g)),
        Corpus("high", torch.randint(40, 96, (24,), generator=g)),
    ]


def _hf_routing(m, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE layer, (router logits, dense routing weights) [tokens, experts] from the plain HF
    forward (``output_router_logits``) and Mixtral's rule by hand: softmax, top-2, renormalised."""
    out = m.hf(input_ids=ids, output_router_logits=True, use_cache=False)
    routing = []
    for logits in out.router_logits:
        top = logits.softmax(-1).topk(2, dim=-1)
        dense = torch.zeros_like(logits).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
        routing.append((logits, dense))
    return routing


def test_statistics_equal_a_naive_loop_over_hf_router_logits(mixtral):
    m = mixtral
    corpora = _corpora(m)
    stats = expert_stats(m, corpora, window=WINDOW, batch_size=2, top=3, context=2)
    n_layers, n = m.n_layers, 4
    assert stats.layers == list(range(n_layers)) and stats.n_experts == n and stats.tokens == [40, 24]
    pairs = torch.zeros(n_layers, n, n)
    best: dict[tuple[int, int], list[tuple[float, str, int]]] = {}
    for d, corpus in enumerate(corpora):
        with torch.no_grad():
            routing = _hf_routing(m, corpus.windows(WINDOW))
        for layer, (logits, dense) in enumerate(routing):
            load = torch.zeros(n)
            score = torch.zeros(n)
            entropy = 0.0
            for t in range(len(corpus)):  # one token at a time
                chosen = [e for e in range(n) if dense[t, e] != 0]
                for e in chosen:
                    load[e] += 1
                    score[e] += dense[t, e]
                    best.setdefault((layer, e), []).append((float(dense[t, e]), corpus.name, t))
                    for f in chosen:
                        pairs[layer, e, f] += 1
                p = logits[t].softmax(-1)
                entropy -= float((p * p.log()).sum())
            torch.testing.assert_close(stats.load[d, layer], load / len(corpus))
            torch.testing.assert_close(stats.score[d, layer], score / len(corpus), rtol=1e-5, atol=1e-6)
            assert math.isclose(float(stats.entropy[d, layer]), entropy / len(corpus), rel_tol=1e-5)
    coact = pairs / pairs.diagonal(dim1=-2, dim2=-1)[..., None].clamp_min(1)
    torch.testing.assert_close(stats.coactivation, coact)
    for (layer, e), found in best.items():
        expected = sorted(found, reverse=True)[:3]
        got = [
            (t["weight"], t["domain"], t["position"])
            for t in stats.top_tokens
            if (t["layer"], t["expert"]) == (layer, e)
        ]
        assert [w for w, _, _ in got] == pytest.approx([w for w, _, _ in expected], rel=1e-5)
        assert {(dom, pos) for _, dom, pos in got} == {(dom, pos) for _, dom, pos in expected}
    # the context is the two tokens before the occurrence, the token in brackets
    row = stats.top_tokens[0]
    tokens = corpora[stats.domains.index(row["domain"])].tokens
    before = " ".join(str(i) for i in tokens[max(0, row["position"] - 2) : row["position"]].tolist())
    assert row["context"] == f"{before}[{int(tokens[row['position']])}]"


def test_balance_and_specialisation_formulas(mixtral):
    stats = expert_stats(mixtral, _corpora(mixtral), window=WINDOW)
    w = torch.tensor([40.0, 24.0])[:, None, None]
    load = (stats.load * w).sum(0)
    p = load / load.sum(-1, keepdim=True)
    h = -(p * torch.where(p > 0, p.log(), 0)).sum(-1)
    torch.testing.assert_close(stats.balance, h / math.log(4))
    spec = stats.specialisation
    torch.testing.assert_close(spec[0], (stats.score[0] + 1e-6) / (stats.score[1] + 1e-6))
    torch.testing.assert_close(spec[1], (stats.score[1] + 1e-6) / (stats.score[0] + 1e-6))


def test_planted_experts_are_found():
    """Layer 0 routes domain a to experts 0-3 and b to 4-7 by construction: the experts most
    specialised to each domain are its planted ones, and the other domain never uses them."""
    m = synthetic.trained_model()
    stats = expert_stats(m, [synthetic.corpus("a"), synthetic.corpus("b")], window=64)
    assert float(stats.load[0, 0, synthetic.B_EXPERTS].sum()) == 0.0
    assert float(stats.load[1, 0, synthetic.A_EXPERTS].sum()) == 0.0
    for domain, planted in (("a", synthetic.A_EXPERTS), ("b", synthetic.B_EXPERTS)):
        top = stats.most_specialised(domain, 2)
        assert all(layer == 0 and e in planted for layer, e in top), top
    # top tokens of an a-expert at layer 0 are a-words
    a_expert = stats.most_specialised("a", 1)[0][1]
    tops = [t for t in stats.top_tokens if t["layer"] == 0 and t["expert"] == a_expert]
    assert tops and all(t["domain"] == "a" and t["token"].startswith("a") for t in tops)


def test_dense_model_and_one_domain_errors(mixtral):
    with pytest.raises(LmscopeError, match="no mixture-of-experts layers"):
        expert_stats(tiny_model("llama"), [Corpus("x", torch.arange(3, 19))], window=8)
    stats = expert_stats(mixtral, _corpora(mixtral)[:1], window=WINDOW)
    assert stats.specialisation is None
    with pytest.raises(LmscopeError, match="at least two corpora"):
        stats.most_specialised("low", 1)
    with pytest.raises(LmscopeError, match="names must differ"):
        expert_stats(mixtral, [_corpora(mixtral)[0]] * 2, window=WINDOW)

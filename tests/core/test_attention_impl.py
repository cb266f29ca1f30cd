"""Fast attention stays on: every analysis gives the same numbers with SDPA (the default) as
with eager attention, and only pattern captures switch to eager (for their duration)."""

from __future__ import annotations

import copy

import pytest
import torch

import lmscope
from lmscope.circuits.edges import edge_attribution
from lmscope.circuits.patching import activation_patching
from lmscope.core.corpus import Corpus
from lmscope.quant.outliers import activation_stats
from tests.helpers import token_pair
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def sdpa_and_eager() -> tuple[lmscope.Model, lmscope.Model]:
    sdpa = tiny_model("llama")
    sdpa.hf.config._attn_implementation = "sdpa"
    eager_hf = copy.deepcopy(sdpa.hf)
    eager_hf.config._attn_implementation = "eager"
    return sdpa, lmscope.Model(eager_hf, tokenizer=None, source="tiny llama (eager)", name="tiny-llama-eager")


def test_the_default_is_sdpa_and_analyses_leave_it_on(sdpa_and_eager):
    sdpa, _ = sdpa_and_eager
    ids = torch.randint(3, sdpa.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(1)
        return original(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        sdpa.run(ids, capture=["blocks.1.attn.z", "blocks.1.resid_post"])
        activation_patching(sdpa, [token_pair(sdpa, pos=9, differ=(3,))], "head")
        assert seen, "SDPA was not used"
        before = len(seen)
        sdpa.run(ids, capture=["blocks.1.attn.pattern"])  # patterns need eager, for this run only
        assert len(seen) == before
        sdpa.run(ids)
        assert len(seen) > before
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert sdpa.hf.config._attn_implementation == "sdpa"


def test_same_numbers_under_sdpa_and_eager(sdpa_and_eager):
    sdpa, eager = sdpa_and_eager
    pair = token_pair(sdpa, pos=9, differ=(3, 6))
    ids = torch.randint(3, sdpa.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    sites = ["blocks.1.attn.z", "blocks.1.resid_post", "blocks.0.attn.v"]
    a, b = sdpa.run(ids, capture=sites), eager.run(ids, capture=sites)
    for s in sites:
        assert torch.allclose(a.cache[s], b.cache[s], atol=1e-5), s
    for component in ("head", "mlp"):
        pa, pb = (activation_patching(m, [pair], component, True) for m in (sdpa, eager))
        assert torch.allclose(pa.scores, pb.scores, atol=1e-4), component
    ea, eb = (edge_attribution(m, [pair], steps=3) for m in (sdpa, eager))
    assert torch.allclose(ea.scores, eb.scores, atol=1e-4)
    corpus = Corpus("random", torch.randint(3, sdpa.d_vocab, (64,), generator=torch.Generator().manual_seed(1)))
    sa, sb = (activation_stats(m, corpus, window=16) for m in (sdpa, eager))
    for name in sa.sites:
        assert torch.allclose(sa.sites[name].m2, sb.sites[name].m2, rtol=1e-4, atol=1e-4), name

"""Models spread over devices: SmolLM2 with part of it offloaded to disk (a small
``max_memory`` for the CPU, accelerate's ``device_map="auto"``) gives the in-memory model's
numbers for capture, interventions, generation and exact patching."""

from __future__ import annotations

import pytest
import torch

import lmscope
from lmscope.circuits.pairs import tokenize_pairs
from lmscope.circuits.patching import activation_patching
from lmscope.circuits.tasks import pairs_for
from lmscope.core.errors import LmscopeError

PROMPT = ["When Mary and John went to the store, John gave a drink to"]


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory) -> lmscope.Model:
    folder = tmp_path_factory.mktemp("offload")
    return lmscope.load("smollm2-135m", device_map="auto", max_memory={"cpu": "300MB"}, offload_folder=str(folder))


def test_part_of_the_model_is_on_disk(offloaded):
    placed = set(offloaded.hf.hf_device_map.values())
    assert "disk" in placed and "cpu" in placed
    assert any(p.device.type == "meta" for p in offloaded.hf.parameters())  # weights not in memory


def test_capture_interventions_generation_equal_in_memory(offloaded, smollm2):
    ids = smollm2.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    sites = ["blocks.25.attn.z", "blocks.29.resid_post", "blocks.3.mlp.post"]
    a, b = smollm2.run(ids, capture=sites), offloaded.run(ids, capture=sites)
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(a.cache[s], b.cache[s]) for s in sites)
    iv = [lmscope.zero("blocks.25.attn.z", head=3), lmscope.add("blocks.27.resid_post", torch.ones(576), coeff=0.5)]
    assert torch.equal(smollm2.run(ids, interventions=iv).logits, offloaded.run(ids, interventions=iv).logits)
    ga = smollm2.generate("The capital of France is", max_new_tokens=4)
    gb = offloaded.generate("The capital of France is", max_new_tokens=4)
    assert torch.equal(ga.ids, gb.ids)


def test_exact_patching_equals_in_memory(offloaded, smollm2):
    pairs = tokenize_pairs(smollm2, pairs_for(smollm2, task="ioi", n=1))
    a, b = (activation_patching(m, pairs, "mlp", True) for m in (smollm2, offloaded))
    assert torch.equal(a.scores, b.scores)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[lmscope.Model, lmscope.Model]:
    """A tiny Llama in memory and the same weights with most layers offloaded to disk."""
    import transformers as T

    from tests.tiny import tiny_model

    model = tiny_model("llama")
    root = tmp_path_factory.mktemp("tiny_offload")
    model.hf.save_pretrained(root / "model")
    hf = T.AutoModelForCausalLM.from_pretrained(
        root / "model", device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=str(root / "offload")
    )
    assert "disk" in set(hf.hf_device_map.values())
    return model, lmscope.Model(hf, tokenizer=None, source="tiny llama, offloaded", name="tiny-llama-offloaded")


def test_weight_reading_analyses_equal_in_memory(tiny_pair):
    """EAP-IG edges, direct logit attribution and K/V weight norms read offloaded weights from
    the offload's copy: the same numbers as in memory."""
    from lmscope.circuits.edges import edge_attribution
    from lmscope.quant.kv import weight_norms
    from lmscope.readout import direct_logit_attribution
    from tests.helpers import token_pair

    memory, offloaded = tiny_pair
    pair = token_pair(memory, pos=9, differ=(3, 6))
    a, b = (edge_attribution(m, [pair], steps=2) for m in (memory, offloaded))
    assert torch.allclose(a.scores, b.scores, atol=1e-6)
    ids = pair.clean[None]
    da, db = (direct_logit_attribution(m, ids, pair.answer, pair.wrong) for m in (memory, offloaded))
    assert torch.equal(da.heads, db.heads) and torch.equal(da.mlps, db.mlps)
    wa, wb = weight_norms(memory), weight_norms(offloaded)
    assert wa == wb


def test_weight_quantisation_of_offloaded_weights_equals_in_memory(tiny_pair):
    """W4 (groups of 16) perplexity with most layers on disk equals the in-memory model's, the
    quantised weights being read through accelerate's weights map; both models come back
    unchanged."""
    from lmscope.quant.apply import block_linears
    from lmscope.quant.configs import QuantConfig
    from lmscope.core.corpus import Corpus
    from lmscope.quant.evaluation import perplexity

    memory, offloaded = tiny_pair
    corpus = Corpus("random", torch.randint(3, memory.d_vocab, (96,), generator=torch.Generator().manual_seed(4)))
    config = QuantConfig(weight_bits=4, weight_group=16)
    maps = [getattr(m, "_hf_hook", None) and m._hf_hook.weights_map for m in block_linears(offloaded)]
    assert any(m is not None for m in maps)
    plain = perplexity(memory, corpus, window=16)["perplexity"]
    pa, pb = (perplexity(m, corpus, window=16, config=config)["perplexity"] for m in (memory, offloaded))
    assert pa == pytest.approx(pb, rel=1e-6) and pa != plain
    assert perplexity(offloaded, corpus, window=16)["perplexity"] == pytest.approx(plain, rel=1e-6)
    assert [getattr(m, "_hf_hook", None) and m._hf_hook.weights_map for m in block_linears(offloaded)] == maps


def test_every_analysis_equals_in_memory(tiny_pair):
    """Attribution and EAP-IG node scores, faithfulness of a circuit, outlier statistics, K/V
    norms and perplexity under KV and activation fake-quantisation, with most layers on disk."""
    from lmscope.circuits.attribution import attribute
    from lmscope.circuits.edges import edge_attribution
    from lmscope.circuits.faithfulness import faithfulness
    from lmscope.circuits.graph import select
    from lmscope.quant.configs import KVQuant, QuantConfig
    from lmscope.core.corpus import Corpus
    from lmscope.quant.evaluation import perplexity
    from lmscope.quant.kv import kv_norms
    from lmscope.quant.outliers import activation_stats
    from tests.helpers import token_pair

    memory, offloaded = tiny_pair
    pair = token_pair(memory, pos=9, differ=(3, 6))
    for method in ("attribution", "eap-ig"):
        a, b = (attribute(m, [pair], method, steps=3).scores for m in (memory, offloaded))
        assert torch.allclose(a, b, atol=1e-6), method
    circuit = select(edge_attribution(memory, [pair], steps=2), top=20)
    fa, fb = (faithfulness(m, [pair], circuit) for m in (memory, offloaded))
    assert abs(fa.circuit - fb.circuit) < 1e-5 and abs(fa.crs - fb.crs) < 1e-3
    corpus = Corpus("random", torch.randint(3, memory.d_vocab, (96,), generator=torch.Generator().manual_seed(2)))
    sa, sb = (activation_stats(m, corpus, window=16) for m in (memory, offloaded))
    assert all(torch.equal(sa.sites[s].m2, sb.sites[s].m2) for s in sa.sites)
    ka, kb = (kv_norms(m, corpus, window=16).to_json() for m in (memory, offloaded))
    assert ka == kb
    config = QuantConfig(kv=KVQuant(4, 2, group_size=8), act_bits=8)
    pa, pb = (perplexity(m, corpus, window=16, config=config)["perplexity"] for m in (memory, offloaded))
    assert pa == pb and pa != perplexity(memory, corpus, window=16)["perplexity"]  # quantisation was on


def test_max_memory_specs(capsys):
    from lmscope.core.loading import parse_max_memory
    from tests.helpers import run_cli

    assert parse_max_memory("cpu=300MB,0=20GB") == {"cpu": "300MB", 0: "20GB"}
    assert parse_max_memory(None) is None
    with pytest.raises(LmscopeError, match="DEVICE=SIZE"):
        parse_max_memory("cpu:300MB")
    code, _, err = run_cli(capsys, "heads", "--max-memory", "cpu:1GB")
    assert code == 2 and "DEVICE=SIZE" in err

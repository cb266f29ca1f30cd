"""Key/value statistics checked against direct computations: SVDs in float64 of the captured
k/v matrices, and norms of W_k / W_v rows sliced by hand from the projection weights."""

from __future__ import annotations

import pytest
import torch

from lmscope.core.corpus import Corpus, load_corpus
from lmscope.quant.kv import kv_stats, weight_norms


def _direct_norms(matrices):
    """Frobenius, spectral and singular values of each [n_tokens, width] matrix, in float64."""
    sv = [torch.linalg.svdvals(m.double()) for m in matrices]
    return [float(s.square().sum().sqrt()) for s in sv], [float(s[0]) for s in sv], sv


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_kv_stats_equal_direct_svd(tiny_models, name):
    """Gram-matrix norms == svdvals of the concatenated captured keys/values, per layer and KV head."""
    model = tiny_models[name]
    corpus = Corpus("t", torch.randint(3, 90, (85,), generator=torch.Generator().manual_seed(2)))
    stats = kv_stats(model, corpus, window=16, batch_size=2)
    windows = corpus.tokens[:80].reshape(5, 16)  # the 5 full windows; the last 5 tokens are dropped
    assert stats.n_tokens == 80
    sites = [f"blocks.{layer}.attn.{t}" for layer in range(model.n_layers) for t in "kv"]
    cache = model.run(windows, capture=sites).cache
    summary = stats.summary()
    assert summary.n_tokens == 80
    for t, key in (("k", "keys"), ("v", "values")):
        got = getattr(summary, key)
        assert got["n_layers"] == model.n_layers
        for layer in range(model.n_layers):
            x = cache[f"blocks.{layer}.attn.{t}"]  # [5, 16, n_kv, d_head]
            tokens = x.reshape(80, model.n_kv_heads, model.d_head)
            fro, spec, _ = _direct_norms([tokens.reshape(80, -1)])
            assert got["frobenius"][layer] == pytest.approx(fro[0], rel=1e-5)
            assert got["spectral"][layer] == pytest.approx(spec[0], rel=1e-5)
            fro, spec, sv = _direct_norms([tokens[:, h] for h in range(model.n_kv_heads)])
            assert got["head_frobenius"][layer] == pytest.approx(fro, rel=1e-5)
            assert got["head_spectral"][layer] == pytest.approx(spec, rel=1e-5)
            for h in range(model.n_kv_heads):
                values = torch.tensor(got["head_singular_values"][layer][h], dtype=torch.float64)
                torch.testing.assert_close(values, sv[h], atol=1e-4 * float(sv[h][0]), rtol=1e-4)


def _kv_rows(model, layer):
    """W_k and W_v rows [n_kv, d_head, d_model] sliced by hand from the projection weights."""
    attn = model.layer_module(layer, model.family.attn)
    K, D, d = model.n_kv_heads, model.d_head, model.d_model
    if hasattr(attn, "k_proj"):  # Llama-style separate projections, rows h*D:(h+1)*D
        k, v = attn.k_proj.weight, attn.v_proj.weight
    elif hasattr(attn, "c_attn"):  # GPT-2 Conv1D [d_model, 3 d_model]: columns q | k | v
        w = attn.c_attn.weight.T
        k, v = w[d : 2 * d], w[2 * d : 3 * d]
    elif hasattr(attn, "qkv_proj"):  # Phi-3 fused [H D + 2 K D, d_model]: rows q | k | v
        w, q_rows = attn.qkv_proj.weight, model.n_heads * D
        k, v = w[q_rows : q_rows + K * D], w[q_rows + K * D :]
    else:  # GPT-NeoX [3 d_model, d_model], per head rows q_h | k_h | v_h
        w = attn.query_key_value.weight.unflatten(0, (K, 3 * D))
        return w[:, D : 2 * D], w[:, 2 * D :]
    return k.unflatten(0, (K, D)), v.unflatten(0, (K, D))


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "phi3", "qwen3"])
def test_weight_norms_equal_rows_of_the_projections(tiny_models, name):
    """Frobenius/spectral norms of W_k, W_v per layer and per KV head == norms of hand-sliced rows."""
    model = tiny_models[name]
    got = weight_norms(model)
    for layer in range(model.n_layers):
        k, v = _kv_rows(model, layer)
        for t, w in (("k", k), ("v", v)):
            w = w.detach().double()
            fro, spec, _ = _direct_norms([w.flatten(0, 1)])
            assert got[t]["frobenius"][layer] == pytest.approx(fro[0], rel=1e-5)
            assert got[t]["spectral"][layer] == pytest.approx(spec[0], rel=1e-5)
            fro, spec, _ = _direct_norms(list(w))
            assert got[t]["head_frobenius"][layer] == pytest.approx(fro, rel=1e-5)
            assert got[t]["head_spectral"][layer] == pytest.approx(spec, rel=1e-5)


@pytest.mark.slow
def test_smollm2_keys_have_larger_norms_than_values(smollm2):
    """Known property of SmolLM2 (KV-AdaQuant): layer 10's key norm is several times its value norm."""
    corpus = load_corpus(smollm2, "wikitext2", max_tokens=2048)
    summary = kv_stats(smollm2, corpus, window=512).summary()
    k, v = summary.keys["frobenius"][10], summary.values["frobenius"][10]
    assert summary.n_tokens == 2048 and k > 3 * v

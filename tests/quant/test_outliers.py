"""Activation outliers: streaming moments, OSP kurtosis and massive activations, checked
against direct float64 computations and the plain Hugging Face forward."""

from __future__ import annotations

import pytest
import torch

import lmscope
from lmscope.core.corpus import Corpus, load_corpus
from lmscope.quant.outliers import OutlierStats, SiteStats, activation_stats, hidden_state_sites, osp_token_kurtosis

BATCHES = [1, 37, 250, 412, 300]  # uneven, including a single row
OFFSET_CHANNEL = 3


def _planted_data(seed: int = 0) -> torch.Tensor:
    """[1000, 8] float32: Gaussian channels of varied scale, a channel at 25000 +- 1, a Student-t(3)
    channel and a skewed (exponential) channel."""
    g = torch.Generator().manual_seed(seed)
    n = sum(BATCHES)
    x = torch.randn(n, 8, generator=g) * torch.tensor([1.0, 0.1, 3.0, 1.0, 10.0, 0.5, 1.0, 1.0])
    x[:, OFFSET_CHANNEL] += 25000.0
    x[:, 6] = torch.distributions.StudentT(3.0).sample((n,))
    x[:, 7] = torch.empty(n).exponential_(generator=g) * 3 - 1
    return x.float()


def _stream(x: torch.Tensor, batches: list[int], start: int = 0, k: int = 16) -> SiteStats:
    stats = SiteStats(x.shape[1], k)
    for rows in x.split(batches):
        stats.update(rows, torch.arange(start, start + rows.shape[0]))
        start += rows.shape[0]
    return stats


def _moments(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: population moments over rows, directly in float64."""
    r = x.double()
    mean = r.mean(0)
    c = r - mean
    m2, m3, m4 = (c**2).mean(0), (c**3).mean(0), (c**4).mean(0)
    return {"mean": mean, "variance": m2, "skewness": m3 / m2**1.5, "kurtosis": m4 / m2**2 - 3}


def _check_moments(stats: SiteStats, x: torch.Tensor, channels: list[int]) -> None:
    ref = _moments(x)
    assert stats.n == x.shape[0]
    for name, expected in ref.items():
        got = getattr(stats, name)
        torch.testing.assert_close(got[channels], expected[channels], rtol=1e-5, atol=1e-6, msg=name)


def test_streaming_moments_equal_direct_float64():
    """Reference: central moments of the concatenated data in float64."""
    x = _planted_data()
    stats = _stream(x, BATCHES)
    ordinary = [c for c in range(8) if c != OFFSET_CHANNEL]
    _check_moments(stats, x, ordinary)
    ref = _moments(x)
    assert ref["kurtosis"][6] > 3 and ref["skewness"][7] > 1  # the heavy-tailed/skewed channels are present
    torch.testing.assert_close(stats.mean[OFFSET_CHANNEL], ref["mean"][OFFSET_CHANNEL], rtol=1e-6, atol=0)


def test_streaming_moments_of_a_huge_offset_channel():
    """Reference: central moments in float64 of the float32 data of the channel at 25000 +- 1."""
    x = _planted_data()
    _check_moments(_stream(x, BATCHES), x, [OFFSET_CHANNEL])


def _spiky_data(seed: int = 1) -> torch.Tensor:
    """[1000, 8] float32: Gaussian, a Student-t channel and spikes planted in both halves."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(BATCHES), 8, generator=g)
    x[:, 6] = torch.distributions.StudentT(2.5).sample((x.shape[0],)).clamp(-50, 50)  # below the planted spikes
    for token, channel, value in [(5, 2, -90.0), (100, 4, 70.0), (640, 4, -300.0), (700, 0, 55.0), (999, 2, 80.0)]:
        x[token, channel] = value
    return x


def test_merging_two_partial_runs_equals_one_run():
    """Reference: float64 moments, max |x| / argmax, top-k of |x| and the median of |x| computed
    directly on the concatenation."""
    x = _spiky_data()
    split = sum(BATCHES[:3])
    merged = _stream(x[:split], BATCHES[:3]).merge_(_stream(x[split:], BATCHES[3:], start=split))
    whole = _stream(x, BATCHES)
    offset = _stream(x[:split], BATCHES[:3]).merge_(_stream(x[split:], BATCHES[3:]), token_offset=split)
    assert torch.equal(offset.top_token, merged.top_token) and torch.equal(offset.absmax_token, merged.absmax_token)
    _check_moments(merged, x, list(range(8)))
    for name in ("mean", "m2", "m3", "m4"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), rtol=1e-9, atol=1e-9)

    mag = x.double().abs()
    top, arg = mag.max(0)
    assert torch.equal(merged.absmax, top) and torch.equal(merged.absmax_token, arg)

    values, flat = mag.flatten().topk(16)
    assert torch.equal(merged.top_value.abs(), values)
    assert torch.equal(merged.top_value, x.double().flatten()[flat])  # signed
    assert torch.equal(merged.top_channel, flat % 8) and torch.equal(merged.top_token, flat // 8)
    assert merged.top_token[:5].tolist() == [640, 5, 999, 100, 700]

    median = float(mag.flatten().median())
    assert abs(merged.median_abs - median) / median < 0.05
    assert merged.median_abs == whole.median_abs


def test_merge_rejects_a_different_width():
    with pytest.raises(lmscope.LmscopeError):
        SiteStats(4).merge_(_stream(torch.randn(3, 5), [3]))


def test_osp_token_kurtosis_equals_osp_formula():
    """Reference: OSP's ``((x**4).mean(-1) / x.std(-1) ** 4 - 3).relu()`` in float64; for one spike
    M among d-1 zeros, by hand: mean(x^4) = M^4/d, unbiased var = M^2/d, so d - 3."""
    g = torch.Generator().manual_seed(0)
    d = 64
    x = torch.randn(5, d, generator=g)
    x[1, 17] = 3000.0  # a massive outlier
    x[2] = torch.distributions.StudentT(2.0).sample((d,))
    x[3] = torch.zeros(d)
    x[3, 0] = 25000.0
    x[4] = torch.linspace(-1, 1, d)  # platykurtic: relu gives exactly 0
    xd = x.double()
    expected = ((xd**4).mean(-1) / xd.std(-1) ** 4 - 3).relu()
    got = osp_token_kurtosis(x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-8)
    assert abs(float(got[3]) - (d - 3)) < 1e-4
    assert float(got[4]) == 0.0 and float(got[1]) > 50


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 90, (200,), generator=torch.Generator().manual_seed(3))


def _hidden_states(model, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model.hf(inputs, output_hidden_states=True).hidden_states


def _osp_by_hand(hidden_states) -> list[float]:
    """OSP's procedure: per hidden state, the per-token formula (float64) averaged over tokens."""
    out = []
    for h in hidden_states:
        h = h.double().flatten(0, 1)
        out.append(float(((h**4).mean(-1) / h.std(-1) ** 4 - 3).relu().mean()))
    return out


@pytest.mark.parametrize("protocol", ["osp", "in-context"])
def test_activation_stats_osp_kurtosis_equals_hf_hidden_states(llama, ids, protocol):
    """Reference: HF ``output_hidden_states`` on every token as its own sequence (osp) or on the
    windows as one batch (in-context), with OSP's formula applied by hand."""
    window, n = 32, 192  # 200 tokens -> 6 windows of 32; the last 8 tokens are dropped
    stats = activation_stats(llama, Corpus("t", ids), protocol=protocol, window=window, batch_size=2)
    inputs = ids[:n].unsqueeze(1) if protocol == "osp" else ids[:n].view(-1, window)
    hidden = _hidden_states(llama, inputs)
    expected = _osp_by_hand(hidden)
    names = hidden_state_sites(llama.n_layers)
    assert len(names) == len(hidden) == llama.n_layers + 1
    assert stats.n_tokens == n and stats.token_ids.tolist() == ids[:n].tolist()
    got = [stats.sites[name].osp_kurtosis for name in names]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert max(expected) > 0.1
    assert stats.osp_kurtosis == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_in_context_channel_moments_and_topk_equal_hf(llama, ids):
    """Reference: HF hidden_states[2] (= blocks.1.resid_post) flattened over tokens, float64."""
    window = 32
    stats = activation_stats(llama, Corpus("t", ids), window=window, batch_size=4, top_k=8)
    h = _hidden_states(llama, ids[:192].view(-1, window))[2].flatten(0, 1)
    s = stats.sites["blocks.1.resid_post"]
    ref = _moments(h)
    torch.testing.assert_close(s.mean, ref["mean"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.variance, ref["variance"], rtol=1e-5, atol=1e-6)
    values, flat = h.double().abs().flatten().topk(8)
    torch.testing.assert_close(s.top_value.abs(), values, rtol=1e-6, atol=0)
    assert torch.equal(s.top_channel, flat % llama.d_model) and torch.equal(s.top_token, flat // llama.d_model)


def _halves(llama, ids):
    whole = activation_stats(llama, Corpus("t", ids[:192]), window=32, batch_size=2)
    merged = activation_stats(llama, Corpus("a", ids[:96]), window=32, batch_size=2)
    merged.merge_(activation_stats(llama, Corpus("b", ids[96:192]), window=32, batch_size=2))
    return whole, merged


def _top_entries(s: SiteStats, token_ids: torch.Tensor) -> list[tuple]:
    return sorted(zip(s.top_value.tolist(), s.top_channel.tolist(), token_ids[s.top_token].tolist()))


def test_merging_runs_on_two_halves_equals_one_run(llama, ids):
    """Reference: one run over the whole corpus (itself checked against HF above)."""
    whole, merged = _halves(llama, ids)
    assert merged.n_tokens == whole.n_tokens == 192
    assert torch.equal(merged.token_ids, ids[:192])
    for name, w in whole.sites.items():
        m = merged.sites[name]
        # the halves group the windows into different batches, whose float32 sums differ slightly
        torch.testing.assert_close(m.mean, w.mean, rtol=0, atol=1e-6 * float(w.variance.max().sqrt()))
        torch.testing.assert_close(m.variance, w.variance, rtol=1e-6, atol=0)
        torch.testing.assert_close(m.skewness, w.skewness, rtol=0, atol=1e-5)
        torch.testing.assert_close(m.kurtosis, w.kurtosis, rtol=1e-5, atol=1e-5)
        assert torch.equal(m.absmax, w.absmax) and torch.equal(m.hist, w.hist)
        assert m.osp_kurtosis == pytest.approx(w.osp_kurtosis, rel=1e-12)
        # token indices of the second run (numbered from 0 by activation_stats) follow the first's
        # (at blocks.0.resid_pre repeated token ids tie exactly, so top-k order is compared as a set)
        assert torch.equal(m.absmax_token, w.absmax_token), name
        assert _top_entries(m, merged.token_ids) == _top_entries(w, ids), name
    assert merged.osp_kurtosis == pytest.approx(whole.osp_kurtosis, rel=1e-12)
    second = [t for s in merged.sites.values() for t in s.absmax_token.tolist() if t >= 96]
    assert second  # the check above involves tokens of the second half


def test_merge_rejects_different_protocols(llama, ids):
    corpus = Corpus("t", ids)
    a = activation_stats(llama, corpus, protocol="osp", window=64, batch_size=1)
    b = activation_stats(llama, corpus, protocol="in-context", window=64, batch_size=1)
    with pytest.raises(lmscope.LmscopeError):
        a.merge_(b)


def test_invalid_protocol_raises(llama, ids):
    with pytest.raises(lmscope.LmscopeError, match="unknown protocol"):
        activation_stats(llama, Corpus("t", ids), protocol="bogus")


def test_massive_reports_exactly_the_planted_activation():
    """Reference: planted by hand — 5000 at (token 123, channel 5) among N(0, 1) entries (median
    |x| ~ 0.67); a 500 elsewhere passes 100 but not 1000 x median, so it is not massive."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g)
    x[123, 5] = 5000.0
    y = torch.randn(300, 16, generator=g)
    y[40, 2] = 500.0
    sites = {"blocks.0.resid_post": _stream(x, [100, 150, 50]), "blocks.1.resid_post": _stream(y, [300])}
    stats = OutlierStats(sites, "in-context", n_layers=2, n_tokens=300, token_ids=torch.arange(1000, 1300))
    (row,) = stats.massive()
    assert row["site"] == "blocks.0.resid_post" and row["channel"] == 5 and row["max_abs"] == 5000.0
    assert row["tokens"] == [{"index": 123, "id": 1123, "text": None}]
    median = float(x.abs().flatten().median())
    assert abs(row["median_abs"] - median) / median < 0.05


def test_smollm2_massive_activation_channel_507(smollm2):
    """Reference: SmolLM2-135M's known massive activation, measured independently earlier: channel
    507 of the mid-layer residual stream reaches ~25,600 on the first token of a window."""
    corpus = load_corpus(smollm2, "wikitext2", max_tokens=512)
    stats = activation_stats(smollm2, corpus, window=512, batch_size=1)
    rows = {(r["site"], r["channel"]): r for r in stats.massive(smollm2.tokenizer)}
    row = rows[("blocks.15.resid_post", 507)]
    assert row["max_abs"] > 10000 and row["ratio"] > 1000
    token = row["tokens"][0]
    assert token["id"] == int(corpus.tokens[token["index"]])
    assert token["text"] == smollm2.tokenizer.decode([token["id"]])


def test_capture_without_unembedding_equals_full_run(any_model):
    """The base-model forward used for statistics gives the same hidden states as the full run."""
    from lmscope.quant.outliers import residual_sites
    from tests.tiny import random_ids

    ids = random_ids(any_model, batch=2, pos=7)
    sites = residual_sites(any_model.n_layers) + ["blocks.1.attn.k"]
    fast = any_model.run(ids, capture=sites, logits=False).cache
    full = any_model.run(ids, capture=sites).cache
    for site in sites:
        assert torch.equal(fast[site], full[site]), site


def test_run_without_unembedding_rejects_the_logits_site(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(lmscope.LmscopeError, match="logits"):
        model.run(torch.tensor([[3, 4, 5]]), capture=["logits"], logits=False)

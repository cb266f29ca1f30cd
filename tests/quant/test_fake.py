"""Simulated quantisation checked against hand-worked numbers, hand-written quantisers applied
through plain interventions on the k/v sites, hand-quantised weights and brute-force allocation."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import lmscope
from lmscope.quant.apply import block_linears, kv_attention, quantized_activations, quantized_weights
from lmscope.quant.configs import KVQuant, QuantConfig, allocate_kv_bits, parse_kv
from lmscope.quant.kernels import fake_quant_asym, fake_quant_sym
from lmscope.quant.simulate import quantized
from tests.helpers import asym_last, kv_reference_interventions, logits_under, per_channel_quant, per_token_quant
from tests.tiny import random_ids, tiny_model

# -- fake_quant_asym: numbers worked out by hand --------------------------------------------
#
# X row a = [0, 1.2, 7.5, 1, 2.2, 4], row b = [-3, 3, 0.5, 1, 2.5, 2.2]
#
# 2 bits (levels 0..3), whole row:
#   a: lo 0, hi 7.5, scale 2.5; x/2.5 = [0, .48, 3, .4, .88, 1.6] -> [0,0,3,0,1,2] -> [0,0,7.5,0,2.5,5]
#   b: lo -3, hi 3, scale 2; (x+3)/2 = [0, 3, 1.75, 2, 2.75, 2.6] -> [0,3,2,2,3,3] -> [-3,3,1,1,3,3]
# 2 bits, groups of 3:
#   a1 [0,1.2,7.5]: scale 2.5 -> [0,0,7.5];  a2 [1,2.2,4]: lo 1, scale 1, 1.2 -> 1 -> [1,2,4]
#   b1 [-3,3,.5]: scale 2 -> [-3,3,1];       b2 [1,2.5,2.2]: lo 1, scale .5, 2.4 -> 2 -> [1,2.5,2]
# 1 bit (levels 0..1, i.e. min or max), whole row:
#   a: scale 7.5; x/7.5 = [0,.16,1,.13,.29,.53] -> [0,0,1,0,0,1] -> [0,0,7.5,0,0,7.5]
#   b: scale 6; (x+3)/6 = [0,1,.58,.67,.92,.87] -> [0,1,1,1,1,1] -> [-3,3,3,3,3,3]
# 1 bit, groups of 3:
#   a1 -> [0,0,7.5];  a2 [1,2.2,4]: scale 3, (x-1)/3 = [0,.4,1] -> [1,1,4]
#   b1 [-3,3,.5]: scale 6, [0,1,.58] -> [-3,3,3];  b2 [1,2.5,2.2]: scale 1.5, [0,1,.8] -> [1,2.5,2.5]

X = torch.tensor([[0.0, 1.2, 7.5, 1.0, 2.2, 4.0], [-3.0, 3.0, 0.5, 1.0, 2.5, 2.2]])

ASYM_CASES = {
    (2, None): [[0, 0, 7.5, 0, 2.5, 5], [-3, 3, 1, 1, 3, 3]],
    (2, 3): [[0, 0, 7.5, 1, 2, 4], [-3, 3, 1, 1, 2.5, 2]],
    (1, None): [[0, 0, 7.5, 0, 0, 7.5], [-3, 3, 3, 3, 3, 3]],
    (1, 3): [[0, 0, 7.5, 1, 1, 4], [-3, 3, 3, 1, 2.5, 2.5]],
}


@pytest.mark.parametrize("bits, group", list(ASYM_CASES))
def test_fake_quant_asym_per_row(bits, group):
    """Per-row (dim=-1) asymmetric quantisation equals the values worked out by hand above."""
    expected = torch.tensor(ASYM_CASES[bits, group], dtype=torch.float32)
    torch.testing.assert_close(fake_quant_asym(X, bits, -1, group), expected)
    torch.testing.assert_close(fake_quant_asym(X, bits, 1, group), expected)


@pytest.mark.parametrize("bits, group", list(ASYM_CASES))
def test_fake_quant_asym_per_column(bits, group):
    """dim=0 quantises each column: the hand values above, transposed."""
    expected = torch.tensor(ASYM_CASES[bits, group], dtype=torch.float32).T
    torch.testing.assert_close(fake_quant_asym(X.T.contiguous(), bits, 0, group), expected)


def test_fake_quant_asym_partial_last_group():
    """A last partial group uses its own min/max (hand-worked; zero padding would give 1.33 for 1)."""
    # v = [0, 1.2, 7.5, 5 | 1, 2.2, 4], groups of 4, 2 bits:
    #   [0,1.2,7.5,5]: scale 2.5, x/2.5 = [0,.48,3,2] -> [0,0,7.5,5]
    #   [1,2.2,4] (partial): lo 1, hi 4, scale 1 -> [1,2,4]
    v = torch.tensor([0.0, 1.2, 7.5, 5.0, 1.0, 2.2, 4.0])
    expected = torch.tensor([0.0, 0.0, 7.5, 5.0, 1.0, 2.0, 4.0])
    torch.testing.assert_close(fake_quant_asym(v, 2, 0, 4), expected)
    # as columns of a matrix, along dim 0; the negated column quantises to the negation
    m = torch.stack([v, -v], 1)
    torch.testing.assert_close(fake_quant_asym(m, 2, 0, 4), torch.stack([expected, -expected], 1))
    # size 5 with groups of 2: [0,4] [-1,2] [3]: every group is its own min and max -> unchanged
    w = torch.tensor([0.0, 4.0, -1.0, 2.0, 3.0])
    for bits in (1, 2):
        torch.testing.assert_close(fake_quant_asym(w, bits, -1, 2), w)


def test_fake_quant_asym_constant_group_unchanged():
    """A constant group (max == min) comes back unchanged, not NaN; other groups still quantise."""
    x = torch.tensor([[2.0, 2.0, 2.0, 0.0, 1.2, 7.5], [-0.25, -0.25, -0.25, -0.25, -0.25, -0.25]])
    out = fake_quant_asym(x, 2, -1, 3)
    expected = torch.tensor([[2.0, 2.0, 2.0, 0.0, 0.0, 7.5], [-0.25] * 6])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(fake_quant_asym(x[1], 3), x[1])


# -- fake_quant_sym ----------------------------------------------------------------------------
#
# W row 1 = [1.4, -0.52, 0.35, -0.07], row 2 = [-0.7, 0.21, 0.42, 0.04]
# 4 bits (q in -8..7, scale = max|w| / 7), per row:
#   1: scale .2; w/.2 = [7, -2.6, 1.75, -.35] -> [7,-3,2,0] -> [1.4, -0.6, 0.4, 0]
#   2: scale .1; w/.1 = [-7, 2.1, 4.2, .4] -> [-7,2,4,0] -> [-0.7, 0.2, 0.4, 0]
# 4 bits, groups of 2:
#   [1.4,-.52]: scale .2 -> [1.4,-0.6];  [.35,-.07]: scale .05, [7,-1.4] -> [0.35,-0.05]
#   [-.7,.21]: scale .1 -> [-0.7,0.2];   [.42,.04]: scale .06, [7,.67] -> [0.42,0.06]
# 2 bits (q in -2..1, scale = max|w|), per row:
#   1: w/1.4 = [1,-.37,.25,-.05] -> [1,0,0,0];  2: w/.7 = [-1,.3,.6,.06] -> [-1,0,1,0]

W = torch.tensor([[1.4, -0.52, 0.35, -0.07], [-0.7, 0.21, 0.42, 0.04]])


@pytest.mark.parametrize(
    "bits, group, expected",
    [
        (4, None, [[1.4, -0.6, 0.4, 0.0], [-0.7, 0.2, 0.4, 0.0]]),
        (4, 2, [[1.4, -0.6, 0.35, -0.05], [-0.7, 0.2, 0.42, 0.06]]),
        (2, None, [[1.4, 0.0, 0.0, 0.0], [-0.7, 0.0, 0.7, 0.0]]),
    ],
)
def test_fake_quant_sym_hand_values(bits, group, expected):
    """Symmetric RTN per row equals the hand-worked values above; per column = the transpose."""
    expected = torch.tensor(expected)
    torch.testing.assert_close(fake_quant_sym(W, bits, -1, group), expected)
    torch.testing.assert_close(fake_quant_sym(W.T.contiguous(), bits, 0, group), expected.T)


def test_fake_quant_sym_needs_two_bits():
    """One bit has no symmetric grid: an error, not a silent result."""
    with pytest.raises(lmscope.LmscopeError, match="at least 2 bits"):
        fake_quant_sym(W, 1)


_values = st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=24)


@settings(max_examples=150, deadline=None)
@given(values=_values, group=st.integers(1, 8), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_8bit_error_bounded_by_half_step(values, group, scale):
    """8 bits: every element moves by at most half its group's step (computed directly per group)."""
    x = torch.tensor(values, dtype=torch.float64) * scale
    asym, sym = fake_quant_asym(x, 8, -1, group), fake_quant_sym(x, 8, -1, group)
    for start in range(0, len(x), group):
        g = x[start : start + group]
        step_asym = float(g.max() - g.min()) / 255
        step_sym = float(g.abs().max()) / 127
        tol = 1e-12 * float(g.abs().max()) + 1e-300
        assert (asym[start : start + group] - g).abs().max() <= step_asym / 2 + tol
        assert (sym[start : start + group] - g).abs().max() <= step_sym / 2 + tol


# -- KV configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, bits",
    [("k4v2", (4, 2)), ("K8V8", (8, 8)), ("fp", (None, None)), ("fp16", (None, None)), ("kfpv4", (None, 4))],
)
def test_parse_kv(spec, bits):
    """Spec strings map to the (k_bits, v_bits) they spell."""
    kv = parse_kv(spec)
    assert (kv.k_bits, kv.v_bits) == bits and kv.bits(0) == bits


@pytest.mark.parametrize("spec", ["k9v2", "k0v2", "x", "k4", "k4v", "k44v2", ""])
def test_parse_kv_rejects_bad_specs(spec):
    """Out-of-range bits and malformed specs raise LmscopeError."""
    with pytest.raises(lmscope.LmscopeError):
        parse_kv(spec)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k_bits": 0},
        {"v_bits": 9},
        {"k_axis": "head"},
        {"v_axis": "tokens"},
        {"window": -1},
        {"group_size": 0},
        {"layers": {1: (4, 12)}},
    ],
)
def test_kvquant_validation(kwargs):
    """Bits outside 1..8, unknown axes, negative windows and empty groups are rejected."""
    with pytest.raises(lmscope.LmscopeError):
        KVQuant(**kwargs)


def test_kvquant_per_layer_bits():
    """``layers`` overrides the default pair for exactly the layers it names."""
    kv = KVQuant(4, 2, layers={1: (8, None)})
    assert kv.bits(0) == (4, 2) and kv.bits(1) == (8, None) and kv.bits(2) == (4, 2)
    assert KVQuant(4, 2).name == "K4V2" and KVQuant().name == "fp"


# -- kv_attention against interventions on the k/v sites ----------------------------------------


KV_CONFIGS = {
    "k4v2-head-groups": KVQuant(4, 2, group_size=16),
    "k3v2-channel-keys": KVQuant(3, 2, group_size=4, k_axis="channel"),
    "v2-whole-token-mixed": KVQuant(None, 2, group_size=None, layers={1: (2, None)}),
    "k2v3-channel-values": KVQuant(2, 3, group_size=8, v_axis="channel"),
}


def _decode_reference(model, ids, kv: KVQuant):
    """Token-by-token decoding with a real (full-precision) KV cache, as a quantised cache is
    read: at step t an intervention on every layer's k/v site quantises the cached positions
    j < n_old for that step only, where n_old excludes the ``window`` most recent positions and,
    with per-channel groups, the tokens of the group not complete at t (KIVI's full-precision
    residual); complete channel groups use their own statistics. Logits [batch, pos, vocab]."""
    channel = "channel" in (kv.k_axis, kv.v_axis)

    def quantise(bits, axis):
        def fn(x):  # [batch, t + 1, n_kv, d_head]; the query is position t
            n = x.shape[1]
            n_old = max(n - kv.window, 0)
            if channel:
                n_old = min(n_old, n // kv.group_size * kv.group_size)
            if axis == "token":
                done = per_token_quant(bits, kv.group_size)(x[:, :n_old])
            else:  # the complete groups, then the first n_old positions of them
                done = per_channel_quant(bits, kv.group_size)(x[:, : n // kv.group_size * kv.group_size])[:, :n_old]
            return torch.cat([done, x[:, n_old:]], 1)

        return fn

    ivs = []
    for layer in range(model.n_layers):
        for t, bits, axis in zip("kv", kv.bits(layer), (kv.k_axis, kv.v_axis)):
            if bits is not None:
                ivs.append(lmscope.apply(f"blocks.{layer}.attn.{t}", quantise(bits, axis)))
    cache, steps = DynamicCache(), []
    with torch.no_grad(), model.hooks(interventions=ivs):
        for t in range(ids.shape[1]):
            steps.append(model.hf(input_ids=ids[:, t : t + 1], use_cache=True, **model.with_cache(cache)).logits[:, -1])
    return torch.stack(steps, 1)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gemma3", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("config", list(KV_CONFIGS))
def test_kv_attention_equals_quantised_kv_sites(tiny_models, name, config):
    """Attention replacement == plain forward with hand-quantised k/v site tensors [b, pos, h, d]
    (per token); per-channel groups == token-by-token decoding that quantises complete groups."""
    model, kv = tiny_models[name], KV_CONFIGS[config]
    ids = random_ids(model, batch=2, pos=11)
    got = logits_under(model, ids, attention=kv_attention(kv))
    if "channel" in (kv.k_axis, kv.v_axis):
        expected = _decode_reference(model, ids, kv)
    else:
        expected = logits_under(model, ids, interventions=kv_reference_interventions(model, kv))
    plain = logits_under(model, ids)
    assert (expected - plain).abs().max() > 1e-2  # the quantisation does change the logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_kv_window_keeps_recent_tokens_in_full_precision(tiny_models, name):
    """Window w == incremental decoding where step t reads cached k/v at j <= t - w quantised;
    w >= length gives the plain HF forward, w = 0 the fully quantised reference."""
    model = tiny_models[name]
    ids = random_ids(model, batch=2, pos=8)
    plain = logits_under(model, ids)
    for window in (8, 30):
        got = logits_under(model, ids, attention=kv_attention(KVQuant(2, 2, group_size=None, window=window)))
        torch.testing.assert_close(got, plain, atol=1e-4, rtol=1e-4)
    kv = KVQuant(2, 2, group_size=None)
    all_quantised = logits_under(model, ids, interventions=kv_reference_interventions(model, kv))
    torch.testing.assert_close(
        logits_under(model, ids, attention=kv_attention(kv)), all_quantised, atol=1e-4, rtol=1e-4
    )
    for window in (0, 1, 3):
        got = logits_under(model, ids, attention=kv_attention(KVQuant(2, 2, group_size=None, window=window)))
        expected = _decode_reference(model, ids, KVQuant(2, 2, group_size=None, window=window))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert (got - plain).abs().max() > 1e-2


# -- weights and activations -----------------------------------------------------------------


def _rtn_per_output(weight, bits, conv1d, group=None):
    """Symmetric RTN of each output channel (rows of [out, in]; columns of Conv1D's [in, out])."""
    w = weight.T if conv1d else weight
    g = group or w.shape[1]
    rows = w.unflatten(1, (-1, g))
    qmax = 2 ** (bits - 1) - 1
    scale = rows.abs().amax(-1, keepdim=True) / qmax
    out = (torch.clamp(torch.round(rows / scale), -qmax - 1, qmax) * scale).flatten(1)
    return out.T if conv1d else out


def _block_linear_names(model):
    """Names of nn.Linear / Conv1D weights inside the decoder layers, found by name."""
    prefix = model.family.layers + "."
    names = []
    for name, module in model.hf.named_modules():
        if name.startswith(prefix) and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            names.append(name)
    return names


@pytest.mark.parametrize("name, bits, group", [("llama", 4, None), ("llama", 3, 16), ("gpt2", 4, None)])
def test_quantized_weights_in_place_and_restored(name, bits, group):
    """Inside: block linear weights == hand RTN copies, everything else untouched; after exit
    (also after an exception) every parameter is bitwise the original."""
    model = tiny_model(name)
    originals = {n: p.detach().clone() for n, p in model.hf.named_parameters()}
    linears = _block_linear_names(model)
    assert len(linears) == model.n_layers * (4 if name == "gpt2" else 7)
    weights = {f"{n}.weight" for n in linears}
    with quantized_weights(model, bits, group):
        params = dict(model.hf.named_parameters())
        for n, original in originals.items():
            if n in weights:
                expected = _rtn_per_output(original, bits, name == "gpt2", group)
                torch.testing.assert_close(params[n].detach(), expected)
                assert not torch.equal(params[n], original)
            else:
                assert torch.equal(params[n], original), n
    for n, p in model.hf.named_parameters():
        assert torch.equal(p, originals[n]), n
    with pytest.raises(RuntimeError, match="boom"), quantized_weights(model, bits, group):
        raise RuntimeError("boom")
    for n, p in model.hf.named_parameters():
        assert torch.equal(p, originals[n]), n


@pytest.mark.parametrize("name, group", [("llama", None), ("llama", 16), ("gpt2", 8)])
def test_quantized_activations_feed_quantised_inputs(name, group):
    """Each block linear's output == the layer applied by hand to its hand-quantised raw input."""
    model = tiny_model(name)
    conv1d = name == "gpt2"
    linears = [model.hf.get_submodule(n) for n in _block_linear_names(model)]
    assert all(not m._forward_pre_hooks for m in linears)
    seen, handles = {}, []
    for i, m in enumerate(linears):
        # Registered before the context: pre-hooks run in registration order, so this one sees
        # the raw input, before the context's quantising pre-hook replaces it.
        handles.append(m.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(("in", i), args[0])))
        handles.append(m.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(("out", i), out)))
    ids = random_ids(model)
    try:
        with torch.no_grad(), quantized_activations(model, 4, group):
            model.hf(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for i, m in enumerate(linears):
        raw = seen["in", i]
        g = group or raw.shape[-1]
        q = asym_last(raw.unflatten(-1, (-1, g)), 4).flatten(-2)
        expected = q @ m.weight + m.bias if conv1d else F.linear(q, m.weight, m.bias)
        torch.testing.assert_close(seen["out", i], expected.detach(), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(q, raw, atol=1e-3)
    assert all(not m._forward_pre_hooks for m in linears)
    with pytest.raises(RuntimeError, match="boom"), quantized_activations(model, 4, group):
        assert all(len(m._forward_pre_hooks) == 1 for m in linears)
        raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in linears)
    assert len(block_linears(model)) == len(linears)


def test_quantized_combines_weights_and_kv():
    """quantized(QuantConfig) == a deep copy with hand-quantised weights run with k/v interventions."""
    model = tiny_model("llama")
    config = QuantConfig(kv=KVQuant(4, 3, group_size=16), weight_bits=4)
    assert config.name == "K4V3-W4"
    ids = random_ids(model)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for n in _block_linear_names(reference):
            w = reference.hf.get_submodule(n).weight
            w.copy_(_rtn_per_output(w, 4, False))
    expected = logits_under(reference, ids, interventions=kv_reference_interventions(reference, config.kv))
    with torch.no_grad(), quantized(model, config):
        got = model.hf(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert model.hf.config._attn_implementation == "sdpa"


# -- bit allocation -------------------------------------------------------------------------------


def _objective(k_scales, v_scales, allocation):
    return sum(
        k**2 * 2.0 ** (-2 * kb) + v**2 * 2.0 ** (-2 * vb) for k, v, (kb, vb) in zip(k_scales, v_scales, allocation)
    )


@pytest.mark.parametrize(
    "k_scales, v_scales, budget, lo, hi",
    [
        ([10.0, 1.0], [3.0, 0.5], 2.5, 1, 4),
        ([1540.0, 300.0, 40.0], [346.0, 90.0, 5.0], 3.0, 1, 5),
        ([2.0, 2.0, 2.0], [2.0, 2.0, 2.0], 2.0, 2, 4),
        ([5.0, 0.1, 7.0], [0.2, 9.0, 1.0], 2.34, 1, 4),
        ([1.0, 100.0], [1.0, 1.0], 3.75, 2, 4),
    ],
)
def test_allocate_kv_bits_matches_brute_force(k_scales, v_scales, budget, lo, hi):
    """The greedy allocation reaches the minimum of sum s^2 4^-b over all allocations in range."""
    n = len(k_scales)
    total = round(budget * 2 * n)
    alloc = allocate_kv_bits(k_scales, v_scales, budget, min_bits=lo, max_bits=hi)
    flat = [b for pair in alloc for b in pair]
    assert len(alloc) == n and sum(flat) == total and all(lo <= b <= hi for b in flat)
    best = min(
        _objective(k_scales, v_scales, list(zip(bits[:n], bits[n:])))
        for bits in itertools.product(range(lo, hi + 1), repeat=2 * n)
        if sum(bits) == total
    )
    assert _objective(k_scales, v_scales, alloc) == pytest.approx(best, rel=1e-12)


def test_allocate_kv_bits_rejects_bad_input():
    """Budgets outside [min_bits, max_bits] and mismatched scale lists raise."""
    for budget in (0.5, 8.5):
        with pytest.raises(lmscope.LmscopeError, match="budget"):
            allocate_kv_bits([1.0], [1.0], budget)
    with pytest.raises(lmscope.LmscopeError, match="budget"):
        allocate_kv_bits([1.0], [1.0], 5, min_bits=2, max_bits=4)
    with pytest.raises(lmscope.LmscopeError):
        allocate_kv_bits([1.0, 2.0], [1.0], 4)
    with pytest.raises(lmscope.LmscopeError):
        allocate_kv_bits([], [], 4)


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("window", [0, 2])
def test_kv_quantisation_is_causal(tiny_models, axis, window):
    """A causal LM's logits at t never depend on tokens after t, also with a quantised KV cache."""
    model = tiny_models["llama"]
    ids = random_ids(model, batch=1, pos=8)
    changed = ids.clone()
    changed[0, -1] = 3 if ids[0, -1] != 3 else 4
    attention = kv_attention(KVQuant(4, 4, group_size=4, k_axis=axis, v_axis=axis, window=window))
    first, second = logits_under(model, ids, attention=attention), logits_under(model, changed, attention=attention)
    assert (first[:, -1] - second[:, -1]).abs().max() > 1e-2
    torch.testing.assert_close(first[:, :-1], second[:, :-1])

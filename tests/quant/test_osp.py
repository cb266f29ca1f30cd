"""OSP's W4A4KV4 (lmscope.quant.osp) against naive transcriptions of its quantisers (GPTQ's MSE
clipping loop, QuaRot's activation quantiser, numbers worked out by hand), the KV path against
plain interventions on the q/k/v sites, and the rotation against planted outlier channels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmscope
from lmscope.quant.configs import QuantConfig, osp_w4a4kv4
from lmscope.quant.kernels import fake_quant_sym_mse, fake_quant_zero_point
from lmscope.quant.osp import osp_activations, osp_kv_attention, osp_quantized
from lmscope.quant.simulate import quantized
from tests.helpers import run_cli
from tests.tiny import random_ids, tiny_model

# -- GPTQ's MSE clipping search ---------------------------------------------------------------


def gptq_find_params_mse(x, bits, grid=100, maxshrink=0.8, norm=2.4):
    """IST-DASLab/gptq ``Quantizer.find_params`` (perchannel, sym, mse) and ``quantize``, line by line."""
    maxq = 2 ** (bits - 1) - 1
    tmp = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    xmax = torch.maximum(torch.abs(xmin), xmax).clamp(min=1e-5)
    scale = xmax / maxq
    best = torch.full([x.shape[0]], float("inf"))
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        scale1 = p * xmax / maxq
        q = scale1.unsqueeze(1) * torch.clamp(torch.round(x / scale1.unsqueeze(1)), -(maxq + 1), maxq)
        q -= x
        q.abs_()
        q.pow_(norm)
        err = torch.sum(q, 1)
        tmp = err < best
        if torch.any(tmp):
            best[tmp] = err[tmp]
            scale[tmp] = scale1[tmp]
    scale = scale.unsqueeze(1)
    return scale * torch.clamp(torch.round(x / scale), -(maxq + 1), maxq)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_clipping_equals_gptq_loop(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(12, 40, generator=g)
    w[:, 3] *= 25  # an outlier input channel: clipping pays off
    w[4] *= 1e-7  # a row below GPTQ's 1e-5 floor
    torch.testing.assert_close(fake_quant_sym_mse(w, bits, 1), gptq_find_params_mse(w, bits), rtol=0, atol=0)
    torch.testing.assert_close(fake_quant_sym_mse(w.T, bits, 0), gptq_find_params_mse(w, bits).T, rtol=0, atol=0)


def test_mse_clipping_clips_the_tail():
    """A Gaussian row with one value at 4.5, 4 bits: max scaling (scale 4.5 / 7) wastes levels on
    the tail; the search shrinks the range and does better in the 2.4-norm."""
    w = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    w[0, 0] = 4.5
    plain = (w / (4.5 / 7)).round().clamp(-8, 7) * (4.5 / 7)
    clipped = fake_quant_sym_mse(w, 4)
    err = lambda q: float((q - w).abs().pow(2.4).sum())
    assert err(clipped) < 0.95 * err(plain)
    assert float(clipped.max()) < 4.5


# -- QuaRot's asymmetric activation quantiser ------------------------------------------------
#
# 2 bits (levels 0..3), scale = (hi - lo) / 3, zero = round(-lo / scale), x' = scale (q - zero)
#   [0.7, 1, 2.2, 3.6], 0 in range: lo 0, hi 3.6, scale 1.2, zero 0;
#       x / 1.2 = [.58, .83, 1.83, 3] -> [1, 1, 2, 3] -> [1.2, 1.2, 2.4, 3.6]
#   same, min/max only: lo .7, hi 3.6, scale 2.9 / 3 = .9667, zero round(-.724) = -1;
#       x / s = [.72, 1.03, 2.28, 3.72] -> [1, 1, 2, 4] - 1 -> clamp [0, 0, 1, 3] -> s * (q + 1)
#       = [.9667, .9667, 1.9333, 3.8667]
#   [-2, -.4, 1.3, 4]: lo -2, hi 4, scale 2, zero 1; x / 2 = [-1, -.2, .65, 2] -> [-1, 0, 1, 2]
#       + 1 = [0, 1, 2, 3] -> 2 (q - 1) = [-2, 0, 2, 4]
#   [0, 0, 0, 0]: lo -1, hi 1 (QuaRot's guard), scale 2/3, zero 2 -> q 2 -> 0
S = 2.9 / 3
ZERO_POINT_CASES = [
    ([0.7, 1.0, 2.2, 3.6], True, [1.2, 1.2, 2.4, 3.6]),
    ([0.7, 1.0, 2.2, 3.6], False, [S, S, 2 * S, 4 * S]),
    ([-2.0, -0.4, 1.3, 4.0], True, [-2.0, 0.0, 2.0, 4.0]),
    ([0.0, 0.0, 0.0, 0.0], True, [0.0, 0.0, 0.0, 0.0]),
]


@pytest.mark.parametrize("x, include_zero, expected", ZERO_POINT_CASES)
def test_zero_point_quantiser_by_hand(x, include_zero, expected):
    out = fake_quant_zero_point(torch.tensor([x]), 2, include_zero=include_zero)
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_zero_point_groups_by_hand():
    """Groups of 4 along a row: each group on its own (the first two cases above side by side)."""
    row = torch.tensor([[0.7, 1.0, 2.2, 3.6, -2.0, -0.4, 1.3, 4.0]])
    out = fake_quant_zero_point(row, 2, -1, 4)
    torch.testing.assert_close(out, torch.tensor([[1.2, 1.2, 2.4, 3.6, -2.0, 0.0, 2.0, 4.0]]))
    torch.testing.assert_close(fake_quant_zero_point(row.T, 2, 0, 4), out.T)


def quarot_act(x, bits, include_zero):
    """QuaRot ``ActQuantizer.find_params`` + ``forward`` on rows of ``x`` (last axis), naively."""
    out = torch.empty_like(x)
    maxq = 2**bits - 1
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in x.shape[:-1]]).view(-1, x.ndim - 1).tolist():
        row = x[tuple(idx)]
        lo, hi = float(row.min()), float(row.max())
        if include_zero:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        if lo == 0 and hi == 0:
            lo, hi = -1.0, 1.0
        scale = torch.tensor((hi - lo) / maxq, dtype=x.dtype)
        zero = torch.round(-torch.tensor(lo, dtype=x.dtype) / scale)
        out[tuple(idx)] = scale * (torch.clamp(torch.round(row / scale) + zero, 0, maxq) - zero)
    return out


# -- activations and KV in the model ---------------------------------------------------------


def test_osp_activations_per_token_and_per_head():
    """The inputs the linears of a block see: per token (0 in range), the output projection's
    per head (min/max of each head), as hand-run QuaRot quantisers give them."""
    model = tiny_model("llama")
    ids = random_ids(model, batch=1, pos=5)
    layer = 1
    q_proj = model.layer_module(layer, model.family.q_proj)
    o_proj = model.layer_module(layer, model.family.o_proj)
    raw, seen = {}, {}
    handles = [
        m.register_forward_pre_hook(lambda mod, a, m=m: raw.setdefault(m, a[0].clone())) for m in (q_proj, o_proj)
    ]
    with torch.no_grad(), osp_activations(model, 4):
        handles += [
            m.register_forward_pre_hook(lambda mod, a, m=m: seen.setdefault(m, a[0].clone())) for m in (q_proj, o_proj)
        ]
        model.hf(input_ids=ids)
    for h in handles:
        h.remove()
    torch.testing.assert_close(seen[q_proj], quarot_act(raw[q_proj], 4, True))
    heads = raw[o_proj].unflatten(-1, (model.n_heads, model.d_head))
    torch.testing.assert_close(seen[o_proj], quarot_act(heads, 4, False).flatten(-2))


def _kv_reference(model, bits, group):
    """Interventions on the attention-interface sites ([batch, pos, heads, d_head]): queries and
    keys times the Sylvester Hadamard of order d_head, keys per token in groups of ``group``
    channels (0 in range), values per token per head."""
    d = model.d_head
    i = torch.arange(d)
    h = torch.tensor([[(-1.0) ** b.bit_count() for b in row] for row in (i[:, None] & i[None, :]).tolist()]) / d**0.5

    def keys(x):
        flat = (x @ h).flatten(2)
        return quarot_act(flat.unflatten(-1, (-1, group)), bits, True).flatten(2).unflatten(-1, x.shape[2:])

    ivs = []
    for layer in range(model.n_layers):
        ivs.append(lmscope.apply(f"blocks.{layer}.attn.q", lambda x: x @ h))
        ivs.append(lmscope.apply(f"blocks.{layer}.attn.k", keys))
        ivs.append(lmscope.apply(f"blocks.{layer}.attn.v", lambda x: quarot_act(x, bits, False)))
    return ivs


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_osp_kv_equals_hand_quantised_sites(tiny_models, name):
    model = tiny_models[name]
    ids = random_ids(model, batch=2, pos=6)
    with torch.no_grad():
        with model.hooks(attention=osp_kv_attention(3, 3, k_group=8)):
            got = model.hf(input_ids=ids, use_cache=False).logits
        with model.hooks(interventions=_kv_reference(model, 3, 8)):
            expected = model.hf(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_osp_weights_are_mse_clipped_and_restored(tiny_models):
    model = tiny_models["llama"]
    q_proj = model.layer_module(0, model.family.q_proj)
    original = q_proj.weight.detach().clone()
    with osp_quantized(model, 4, None, None, None):
        torch.testing.assert_close(q_proj.weight.detach(), gptq_find_params_mse(original, 4), rtol=0, atol=0)
    assert torch.equal(q_proj.weight, original)


# -- configs ------------------------------------------------------------------------------


def test_osp_config_names_and_validation():
    assert osp_w4a4kv4().name == "W4A4KV4"
    assert QuantConfig.osp(8, rotation="quarot").name == "W8A8KV8+QuaRot"
    assert osp_w4a4kv4("ffn").name == "W4A4KV4+FFN-Had"
    with pytest.raises(lmscope.LmscopeError, match="between 2 and 8"):
        QuantConfig.osp(1)
    with pytest.raises(lmscope.LmscopeError, match="unknown quantisation scheme"):
        QuantConfig(scheme="gptq")
    with pytest.raises(lmscope.LmscopeError, match="unknown rotation"):
        QuantConfig.osp(4, rotation="spin")


def _kl(model, ids, config) -> float:
    """Mean KL(full precision || ``config``) over the next-token distributions."""
    with torch.no_grad():
        ref = F.log_softmax(model.hf(input_ids=ids, use_cache=False).logits, -1)
        with quantized(model, config):
            out = F.log_softmax(model.hf(input_ids=ids, use_cache=False).logits, -1)
    return float((ref.exp() * (ref - out)).sum(-1).mean())


def test_osp_restores_the_model_and_8_bits_is_close(tiny_models):
    model = tiny_models["phi3"]
    ids = random_ids(model, batch=1, pos=8)
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    assert _kl(model, ids, QuantConfig.osp(8, rotation="quarot")) < 0.01 < _kl(model, ids, osp_w4a4kv4())
    assert all(torch.equal(v, model.hf.state_dict()[k]) for k, v in before.items())


# -- rotation against planted outliers ----------------------------------------------------------


def test_rotation_removes_planted_outlier_features():
    """Outlier features as norms make them: channels 5 and 40 of every pre-attention and pre-MLP
    norm scaled by 50 and the reading weights' columns by 1/50 (the same function): the inputs of
    q/k/v and gate/up have massive channels, which per-token 4-bit activations cannot hold.
    QuaRot's folding and rotation remove them; W4A4KV4's damage drops several-fold."""
    model = tiny_model("llama", seed=0)
    ids = random_ids(model, batch=2, pos=16)
    readers = {
        "input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"],
    }
    channels = [5, 40]
    with torch.no_grad():
        for layer in range(model.n_layers):
            for norm, linears in readers.items():
                model.layer_module(layer, norm).weight[channels] *= 50
                for linear in linears:
                    model.layer_module(layer, linear).weight[:, channels] /= 50
    plain, rotated_kl = _kl(model, ids, osp_w4a4kv4()), _kl(model, ids, osp_w4a4kv4("quarot"))
    assert rotated_kl < 0.3 * plain


def test_ffn_hadamard_spreads_planted_neuron_outliers():
    """Three MLP neurons scaled up 30-fold (their down-projection columns down, the same
    function): 4-bit activations of the down projection's input lose less with the Hadamard."""
    model = tiny_model("llama", seed=0)
    ids = random_ids(model, batch=2, pos=16)
    neurons = [5, 40, 77]
    with torch.no_grad():
        for layer in range(model.n_layers):
            model.layer_module(layer, "mlp.up_proj").weight[neurons] *= 30
            model.layer_module(layer, model.family.mlp_down).weight[:, neurons] /= 30
    a4 = QuantConfig(scheme="osp", act_bits=4)
    assert _kl(model, ids, QuantConfig(scheme="osp", act_bits=4, rotation="ffn")) < 0.75 * _kl(model, ids, a4)


# -- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["quant", "--scheme", "gptq"], "unknown --scheme 'gptq'"),
        (["quant", "--scheme", "osp", "--bits", "1"], "--bits must be at least 2, not 1"),
        (["quant", "--rotate", "--rotation", "spin"], "unknown --rotation 'spin'"),
    ],
)
def test_quant_command_rejects_bad_osp_options(capsys, tmp_path, argv, message):
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "out"))
    assert code == 2 and message in err

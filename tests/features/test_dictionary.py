"""The dictionary module against hand computations: activations by naive loops, the JumpReLU
straight-through estimators against the pseudo-derivatives of Rajamanoharan et al. (2024), the
error term and the linear part of decoding, the L1 penalty, hook-name mapping."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmscope.core.errors import LmscopeError
from lmscope.features import Dictionary, load_dictionary
from lmscope.features.activations import batch_topk, groupmax, jumprelu, step, topk
from lmscope.features.hooknames import hf_sites, tl_hook, tl_site

DATA = Path(__file__).resolve().parent.parent / "data" / "dictionaries"


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_topk_groupmax_batch_topk_by_hand():
    x = _x(5, 12)
    for row, got_tk, got_gm in zip(x, topk(x, 3), groupmax(x, 4), strict=True):
        keep = sorted(range(12), key=lambda i: -row[i])[:3]
        want = torch.tensor([max(float(row[i]), 0.0) if i in keep else 0.0 for i in range(12)])
        torch.testing.assert_close(got_tk, want)
        want = torch.zeros(12)
        for g in range(4):
            i = max(range(3 * g, 3 * g + 3), key=lambda j: row[j])
            want[i] = max(float(row[i]), 0.0)
        torch.testing.assert_close(got_gm, want)
    bt = batch_topk(x, 2.0)  # the 10 largest of all 60
    cut = torch.relu(x).flatten().sort(descending=True).values[9]
    torch.testing.assert_close(bt, torch.where(torch.relu(x) >= cut, torch.relu(x), 0.0))


def test_jumprelu_and_step_straight_through_estimators():
    x = torch.tensor([[0.10, 0.30, -0.18, 0.52], [0.49, 0.05, 0.60, 0.50]], requires_grad=True)
    threshold = torch.tensor([0.10, 0.31, -0.25, 0.50], requires_grad=True)
    bandwidth = 0.1
    out = jumprelu(x, threshold, bandwidth)
    mask = (x > threshold) & (x > 0)
    torch.testing.assert_close(out, torch.where(mask, x, 0.0).detach())
    upstream = torch.arange(1.0, 9.0).view(2, 4)
    out.backward(upstream)
    inside = ((x - threshold).abs() < bandwidth / 2).float()  # rectangle((x - t) / bw)
    torch.testing.assert_close(x.grad, upstream * mask)
    torch.testing.assert_close(threshold.grad, (-(threshold / bandwidth) * inside * upstream).sum(0).detach())
    x.grad = threshold.grad = None
    l0 = step(x, threshold, bandwidth).sum()
    assert l0.item() == (x > threshold).sum().item()
    l0.backward()
    assert x.grad is None
    torch.testing.assert_close(threshold.grad, (-inside / bandwidth).sum(0).detach())


@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize("arch", ["standard", "topk", "gated", "jumprelu"])
def test_error_term_and_decode_delta(arch, normalize):
    d = Dictionary(8, 20, arch, k=4 if arch == "topk" else None, normalize=normalize).init_(1)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1 * _x(*p.shape, seed=p.numel()))
    x = _x(3, 5, 8, seed=2)
    with torch.no_grad():
        f = d.encode(x)
        assert f.shape == (3, 5, 20) and (f >= 0).all()
        torch.testing.assert_close(d.error(x), x - d.decode(f, x))
        torch.testing.assert_close(d.decode(f, x) + d.error(x), x)
        df = _x(3, 5, 20, seed=3)
        torch.testing.assert_close(d.decode_delta(df, x), d.decode(f + df, x) - d.decode(f, x), rtol=1e-5, atol=1e-5)


def test_l1_penalty_by_hand():
    d = Dictionary(4, 6).init_(0)
    f = torch.relu(_x(2, 6))
    want = torch.tensor([sum(float(f[b, i]) * float(d.W_dec[i].detach().norm()) for i in range(6)) for b in range(2)])
    torch.testing.assert_close(d.l1_penalty(f).detach(), want)


def test_construction_errors():
    for kwargs, message in [
        ({"arch": "relu2"}, "unknown dictionary architecture"),
        ({"arch": "topk"}, "needs k"),
        ({"d_out": 9}, "reconstructs its input"),
        ({"transcoder": True, "apply_b_dec_to_input": True}, "cannot subtract b_dec"),
        ({"normalize": "whiten"}, "unknown input normalisation"),
    ]:
        with pytest.raises(LmscopeError, match=message):
            Dictionary(8, 16, **kwargs)
    tc = Dictionary(8, 16, transcoder=True, d_out=4)
    with pytest.raises(LmscopeError, match="needs the output site"):
        tc.error(torch.zeros(8))
    with pytest.raises(LmscopeError, match="reads vectors of 8"):
        tc.encode(torch.zeros(5))


def test_saelens_5_scaling_factor_is_folded_into_the_decoder(tmp_path):
    folder = tmp_path / "scaled"
    shutil.copytree(DATA / "saelens_legacy_topk" / "dictionary", folder)
    weights = load_file(str(folder / "sae_weights.safetensors"))
    scale = torch.linspace(0.5, 2.0, 32)
    save_file({**weights, "scaling_factor": scale}, str(folder / "sae_weights.safetensors"))
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "finetuning_scaling_factor": True}))
    d = load_dictionary(folder)
    x = _x(4, 16)
    with torch.no_grad():
        f = d.encode(x)
        want = (f * scale) @ weights["W_dec"] + weights["b_dec"]  # SAELens 5's decode
        torch.testing.assert_close(d.decode(f), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "hook,site,folded",
    [
        ("blocks.3.hook_resid_pre", "blocks.3.resid_pre", False),
        ("blocks.3.hook_resid_mid", "blocks.3.resid_mid", False),
        ("blocks.3.hook_mlp_in", "blocks.3.resid_mid", False),
        ("blocks.3.hook_mlp_out", "blocks.3.mlp.out", False),
        ("blocks.3.mlp.hook_post", "blocks.3.mlp.post", False),
        ("blocks.3.attn.hook_z", "blocks.3.attn.z", False),
        ("blocks.3.ln2.hook_normalized", "blocks.3.mlp.in", True),
        ("hook_embed", "embed", False),
    ],
)
def test_transformerlens_hooks(hook, site, folded):
    assert tl_site(hook) == (site, folded)
    if hook not in ("blocks.3.hook_mlp_in",):
        assert tl_hook(site) == hook


def test_hugging_face_module_paths():
    assert hf_sites("model.layers.7") == ("blocks.7.resid_pre", "blocks.7.resid_post")
    assert hf_sites("layers.7.mlp") == ("blocks.7.mlp.in", "blocks.7.mlp.out")
    assert hf_sites("transformer.h.2.mlp.c_proj") == ("blocks.2.mlp.post", "blocks.2.mlp.out")
    assert hf_sites("gpt_neox.layers.1.attention") == (None, "blocks.1.attn.out")
    assert hf_sites("model.embed_tokens") == (None, "embed")
    for bad in ("model.layers.7.mlp.act_fn", "lm_head"):
        with pytest.raises(LmscopeError, match="no lmscope site"):
            hf_sites(bad)
    with pytest.raises(LmscopeError, match="no lmscope site"):
        tl_site("blocks.1.attn.hook_pattern")

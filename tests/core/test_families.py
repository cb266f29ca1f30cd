"""The family table: every entry resolves on a tiny model; unsupported families fail clearly."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import lmscope
from lmscope.core.families import FAMILIES, family_for
from tests.conftest import FAMILY_NAMES


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_table_paths_resolve(tiny_models, name):
    m = tiny_models[name]
    fam = m.family
    for path in (fam.layers, fam.embed, fam.final_norm, fam.unembed):
        m.module(path)
    fields = ("attn", "o_proj", "attn_contrib", "mlp", "mlp_down", "attn_norm", "mlp_norm")
    for field in fields + ("q_proj", "k_proj", "v_proj", "qkv_proj"):
        path = getattr(fam, field)
        if path is not None:
            m.layer_module(m.n_layers - 1, path)
    assert (m.n_layers, m.n_heads, m.d_model) == (3, 4, 64)
    assert m.n_heads % m.n_kv_heads == 0 and m.d_head * m.n_heads == m.layer_module(0, fam.o_proj).weight.numel() // 64


def test_required_families_are_in_the_table():
    for name in [
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3",
        "phi3",
        "gpt2",
        "gpt_neox",
        "olmo2",
    ]:
        family_for(name)
    assert family_for("gemma3") is FAMILIES["gemma3_text"]


def test_unsupported_family_names_supported_ones_and_table():
    hf = T.AutoModelForCausalLM.from_config(T.XLMConfig(vocab_size=32, emb_dim=16, n_layers=1, n_heads=2))
    with pytest.raises(lmscope.LmscopeError, match=r"'xlm' is not supported \(supported: .*llama.*\).*FAMILIES"):
        lmscope.Model(hf, None)


def test_left_out_family_says_why():
    hf = T.AutoModelForCausalLM.from_config(T.MambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1))
    with pytest.raises(lmscope.LmscopeError, match=r"'mamba' is not supported: state-space"):
        lmscope.Model(hf, None)


def test_formula_fields_over_the_config():
    from types import SimpleNamespace

    from lmscope.core.families import config_value

    config = SimpleNamespace(scale_depth=1.4, num_hidden_layers=4, attn_config=SimpleNamespace(clip_qkv=8), off=None)
    assert config_value(config, "scale_depth / sqrt(num_hidden_layers)") == 1.4 / 2
    assert config_value(config, "attn_config.clip_qkv") == 8
    assert config_value(config, "-2 ** 2 + 1") == -3
    assert config_value(config, None) is None
    assert config_value(config, "off") is None and config_value(config, "1 / missing") is None
    for bad in ("__import__('os')", "scale_depth.__class__", "'text'", "max(1, 2)", "a if b else c", "1 +"):
        with pytest.raises(lmscope.LmscopeError, match="family formula"):
            config_value(config, bad)
    with pytest.raises(lmscope.LmscopeError, match="not a number"):
        config_value(config, "attn_config")


def test_scales_follow_the_family_entry(tiny_models):
    from dataclasses import replace

    m = tiny_models["llama"]
    assert (m.residual_scale, m.logit_scale, m.embed_scale) == (1.0, 1.0, 1.0)
    scaled = lmscope.Model(m.hf, None, family=replace(m.family, logit_scale="2 * hidden_size"))
    x = torch.randn(3, m.d_model)
    torch.testing.assert_close(scaled.unembed(x), m.unembed(x) * 2 * m.d_model)

"""The certificate: every family in the table passes on a tiny model; wrong entries fail, naming
the check; unknown families are derived and used only once certified (CLI)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import transformers as T

import lmscope
from lmscope.cli import main
from lmscope.core.derive import derive_family
from lmscope.core.families import FAMILIES
from lmscope.verify import certify
from tests.families import MATRIX_END, MATRIX_START, render_matrix, table_families, tiny_family_model

MODELS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "models.md"  # the family matrix


@pytest.fixture(scope="module")
def certificates() -> dict:
    return {name: certify(tiny_family_model(name)) for name in table_families()}


def test_at_least_60_families_and_the_required_ones():
    required = [
        "llama",
        "llama4_text",
        "mistral",
        "ministral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi",
        "phi3",
        "phimoe",
        "gpt2",
        "gpt_neo",
        "gptj",
        "gpt_neox",
        "gpt_bigcode",
        "bloom",
        "falcon",
        "mpt",
        "opt",
        "codegen",
        "olmo",
        "olmo2",
        "olmo3",
        "olmoe",
        "cohere",
        "cohere2",
        "starcoder2",
        "stablelm",
        "granite",
        "granitemoe",
        "glm",
        "glm4",
        "glm4_moe",
        "exaone4",
        "smollm3",
        "helium",
        "deepseek_v2",
        "deepseek_v3",
        "gpt_oss",
        "ernie4_5",
        "ernie4_5_moe",
        "seed_oss",
        "apertus",
        "internlm3",
        "nemotron",
        "qwen3_5_text",
        "dbrx",
        "jetmoe",
        "minicpm3",
    ]
    assert len(FAMILIES) >= 60
    assert not [name for name in required if name not in FAMILIES]


@pytest.mark.parametrize("family", table_families())
def test_family_passes_its_certificate(certificates, family):
    cert = certificates[family]
    assert cert.passed, [(c.name, c.detail) for c in cert.checks if c.status == "fail"]
    applicable = {c.name for c in cert.checks if c.status == "pass"}
    assert {"logits_hooked", "hidden_states", "residual_sum", "logit_lens", "self_patch"} <= applicable
    if FAMILIES[family].attn is not None:  # JetMoE's attention is read as a whole (no heads)
        assert "head_ablation" in applicable
    if FAMILIES[family].experts:
        assert {"moe_routing", "moe_resection"} <= applicable


def test_docs_matrix_is_current(certificates):
    text = MODELS_PAGE.read_text()
    section = text[text.index(MATRIX_START) : text.index(MATRIX_END) + len(MATRIX_END)]
    assert section == render_matrix(certificates), "run: python scripts/family_matrix.py"


def test_a_wrong_entry_fails_naming_the_check():
    m = tiny_family_model("gemma2")
    wrong = lmscope.Model(m.hf, None, name="gemma2-as-llama", family=FAMILIES["llama"])
    cert = certify(wrong)
    assert not cert.passed and "residual_sum" in cert.failed
    swapped = replace(FAMILIES["llama"], v_proj="self_attn.k_proj")
    cert = certify(lmscope.Model(tiny_family_model("llama").hf, None, family=swapped))
    assert cert.failed == ["qkv"]
    with pytest.raises(lmscope.LmscopeError, match="failed lmscope's correctness checks: .*residual_sum"):
        from lmscope.verify import require

        require(certify(wrong))


def test_hybrid_entry_needs_its_mixer_and_query_gate():
    """Qwen 3.5: the head checks run on its full-attention layer; without the mixer the linear-attention
    layers' outputs are missed, without the query gate q is read from the wrong rows of q_proj."""
    hf, entry = tiny_family_model("qwen3_5_text").hf, FAMILIES["qwen3_5_text"]
    assert hf.config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    assert certify(lmscope.Model(hf, None, family=replace(entry, q_gate=False))).failed == ["qkv"]
    assert "residual_sum" in certify(lmscope.Model(hf, None, family=replace(entry, mixer=None))).failed


def test_derived_entries_equal_the_table_for_known_layouts():
    for name in ("llama", "gemma2", "gpt2", "opt", "mixtral", "qwen2_moe", "phi", "olmo2"):
        derived = derive_family(tiny_family_model(name).hf)
        table = FAMILIES[name]
        for field in ("layers", "embed", "final_norm", "unembed", "attn", "o_proj", "attn_contrib", "mlp"):
            assert getattr(derived, field) == getattr(table, field), (name, field)
        assert (derived.attn_norm, derived.mlp_norm, derived.router, derived.experts) == (
            table.attn_norm,
            table.mlp_norm,
            table.router,
            table.experts,
        ), name


def _saved(tmp_path, config) -> Path:
    from tests.temporal.synthetic import WORLD

    hf = T.AutoModelForCausalLM.from_config(config)
    hf.save_pretrained(tmp_path / "model")
    WORLD.tokenizer().save_pretrained(tmp_path / "model")  # the CLI loads a tokenizer with the model
    return tmp_path / "model"


def test_cli_derives_an_unknown_family_and_certifies_it(tmp_path, monkeypatch, capsys):
    from tests.families import tiny_config

    path = _saved(tmp_path, tiny_config("arcee"))
    monkeypatch.delitem(FAMILIES, "arcee")
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(path), "--out", str(tmp_path / "out")])
    assert exit_.value.code in (0, None)
    err = capsys.readouterr().err
    assert "derived from the module tree" in err and '"arcee": Family(' in err
    with pytest.raises(SystemExit):
        main(["sites", str(path)])
    assert "its certificate passed" in capsys.readouterr().err


def test_cli_refuses_a_derived_family_that_fails(tmp_path, monkeypatch, capsys):
    from tests.families import tiny_config

    path = _saved(tmp_path, tiny_config("gemma2"))
    monkeypatch.delitem(FAMILIES, "gemma2")
    # a deliberately wrong derivation: the post-attention norm is missed
    monkeypatch.setattr("lmscope.core.derive.derive_family", lambda hf: replace(FAMILIES["llama"]))
    with pytest.raises(SystemExit) as exit_:
        main(["sites", str(path)])
    assert exit_.value.code == 2
    assert "failed lmscope's correctness checks" in capsys.readouterr().err


def test_families_file(tmp_path, monkeypatch, capsys):
    from lmscope.core import families
    from tests.families import tiny_config

    path = _saved(tmp_path, tiny_config("arcee"))
    monkeypatch.delitem(FAMILIES, "arcee")
    monkeypatch.setattr(families, "USER_FAMILIES", {})
    entry = tmp_path / "families.toml"
    entry.write_text('[arcee]\nbase = "llama"\n')
    with pytest.raises(SystemExit) as exit_:
        main(["--families", str(entry), "verify", str(path), "--out", str(tmp_path / "out")])
    assert exit_.value.code in (0, None)
    assert "derived" not in capsys.readouterr().err
    entry.write_text('[arcee]\nbase = "llama"\nnot_a_field = 1\n')
    with pytest.raises(SystemExit) as exit_:
        main(["--families", str(entry), "sites", str(path)])
    assert exit_.value.code == 2
    assert "unknown field(s) not_a_field" in capsys.readouterr().err

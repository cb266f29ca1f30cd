"""Device and precision: bfloat16 models run as loaded, with no silent upcast; statistics still
accumulate in float32/float64; devices are validated with one-line errors."""

from __future__ import annotations

import pytest
import torch

import lmscope
from lmscope.core.errors import LmscopeError
from lmscope.core.loading import resolve_device
from tests.helpers import check_against_naive, run_cli, token_pair
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def smollm2_bf16() -> lmscope.Model:
    return lmscope.load("smollm2-135m", dtype="bfloat16")


def _all_bf16(model: lmscope.Model) -> bool:
    return all(p.dtype == torch.bfloat16 for p in model.hf.parameters())


def test_bfloat16_capture_is_bitwise_the_plain_forward(smollm2_bf16):
    model = smollm2_bf16
    assert _all_bf16(model) and model.card()["dtype"] == "bfloat16"
    ids = model.tokenizer(["When Mary and John went to the store, John gave a drink to"], return_tensors="pt")
    with torch.no_grad():
        plain = model.hf(**ids, output_hidden_states=True)
    run = model.run(ids["input_ids"], capture=["blocks.7.resid_post", "blocks.29.resid_post"])
    assert run.logits.dtype == torch.bfloat16 and torch.equal(run.logits, plain.logits)
    assert torch.equal(run.cache["blocks.7.resid_post"], plain.hidden_states[8])
    assert run.cache["blocks.7.resid_post"].dtype == torch.bfloat16
    assert _all_bf16(model)  # nothing upcast the model


def test_bfloat16_patching_matches_the_naive_loop():
    model = tiny_model("llama")
    model.hf.to(torch.bfloat16)
    pair = token_pair(model, pos=9, differ=(3, 6))
    # bfloat16 keeps ~3 significant digits; scores are normalised to [0, 1]-ish
    check_against_naive(model, pair, "head", False, tol=0.03)
    check_against_naive(model, pair, "mlp", True, tol=0.03)
    assert _all_bf16(model)


def test_bfloat16_statistics_accumulate_in_float64(smollm2_bf16):
    """Outlier statistics of a bfloat16 model equal a float64 reference computed from the same
    bfloat16 activations (the accumulators do not run in bfloat16)."""
    from lmscope.core.corpus import Corpus
    from lmscope.quant.outliers import activation_stats

    model = smollm2_bf16
    tokens = torch.randint(100, 20000, (64,), generator=torch.Generator().manual_seed(0))
    site_name = "blocks.4.resid_post"
    stats = activation_stats(model, Corpus("random", tokens), sites=[site_name], window=32, batch_size=2)
    x = model.run(tokens.view(2, 32), capture=[site_name]).cache[site_name]
    x = x.double().flatten(0, 1)  # [tokens, d], exact bfloat16 values in float64
    site = stats.sites[site_name]
    assert site.mean.dtype == torch.float64 and site.n == 64
    assert torch.allclose(site.mean, x.mean(0), rtol=1e-5, atol=1e-5)  # bfloat16 sums: ~1e-2
    assert torch.allclose(site.m2, ((x - x.mean(0)) ** 2).sum(0), rtol=1e-6, atol=1e-6)
    assert torch.equal(site.absmax, x.abs().amax(0))
    assert _all_bf16(model)


def test_devices_are_validated():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(LmscopeError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(LmscopeError, match="CUDA is not available"):
            resolve_device("cuda")


def test_cli_device_and_dtype_errors_are_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "heads", "--device", "cuda:7" if torch.cuda.is_available() else "cuda")
    assert code == 2 and "CUDA" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "heads", "--dtype", "float8")
    assert code == 2 and "unknown --dtype 'float8'" in err


def test_fake_quantisation_arithmetic_runs_in_float32():
    """Quantising a bfloat16 tensor gives the float32 computation's result rounded to bfloat16:
    scales and levels are not computed in bfloat16 (which holds only 8 significant bits)."""
    from lmscope.quant.kernels import fake_quant_asym, fake_quant_sym

    x = (torch.randn(4, 6, 128, generator=torch.Generator().manual_seed(0)) * 3 + 40).to(torch.bfloat16)
    for quant in (fake_quant_asym, fake_quant_sym):
        out = quant(x, 8, group_size=64)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, quant(x.float(), 8, group_size=64).to(torch.bfloat16))

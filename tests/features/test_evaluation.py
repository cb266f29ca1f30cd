"""Evaluating dictionaries: the reconstruction numbers against hand computations, an identity
dictionary recovers all of the cross-entropy (KL 0), a zero one none of it (it is the zero
ablation), the captured numbers against the dictionary applied by hand to Hugging Face's hidden
states; ``lmscope features train`` and ``features eval`` end to end on SmolLM2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmscope.features import Dictionary, load_dictionary
from lmscope.features.evaluation import Sums, density_histogram, evaluate, reconstruction_metrics
from tests.helpers import one_thread, read_results, run_cli
from tests.tiny import tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _windows(model, n=6, pos=10, seed=5):
    return torch.randint(3, model.d_vocab, (n, pos), generator=torch.Generator().manual_seed(seed))


def test_reconstruction_metrics_by_hand():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[3.0, 3.0], [2.0, 0.0], [0.0, 1.0]])
    f = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    sums = Sums(2, 4)
    sums.add(x[:2], x_hat[:2], f[:2])  # two batches
    sums.add(x[2:], x_hat[2:], f[2:])
    m = reconstruction_metrics(sums, dense=0.5)
    mean = [4 / 3, 2.0]
    variance = sum((x[i, j].item() - mean[j]) ** 2 for i in range(3) for j in range(2))
    assert m["tokens"] == 3 and m["l0"] == pytest.approx(4 / 3)
    assert m["fvu"] == pytest.approx((1 + 1 + 1) / variance)
    assert m["mse"] == pytest.approx(1.0)
    cosines = [(9 + 12) / (5 * math.sqrt(18)), 1.0, 1.0]
    assert m["cosine"] == pytest.approx(sum(cosines) / 3)
    assert m["l2_ratio"] == pytest.approx((math.sqrt(18) / 5 + 2 + 0.5) / 3)
    # gamma = argmin_g sum ||x_hat / g - x||^2 = sum ||x_hat||^2 / sum <x, x_hat>
    assert m["relative_bias"] == pytest.approx((18 + 4 + 1) / (21 + 2 + 2))
    grid = torch.linspace(0.5, 1.5, 100001)
    loss = [((x_hat / g - x) ** 2).sum() for g in grid[::1000]]
    assert abs(float(grid[::1000][int(torch.stack(loss).argmin())]) - m["relative_bias"]) < 0.011
    assert m["dead"] == pytest.approx(2 / 4)  # features 1 and 3 never fire
    assert m["dense"] == pytest.approx(1 / 4)  # feature 2 fires on 3 of 3 tokens (> 50%), feature 0 on 1 of 3


def test_density_histogram():
    density = torch.tensor([0.0, 0.0, 1.0, 0.5, 0.05, 0.004, 1 / 1000])
    hist = density_histogram(density, n_tokens=1000)
    assert hist["dead"] == 2
    assert list(hist)[1] == "-3" and list(hist)[-1] == "-0.5"
    assert hist["-0.5"] == 2 and hist["-1.5"] == 1 and hist["-2.5"] == 1 and hist["-3"] == 1
    assert sum(hist.values()) == len(density)


def _identity(model, site: str, shift: float) -> Dictionary:
    """W_enc = W_dec = I, b_dec = -shift: f = relu(x + shift) = x + shift, x_hat = f - shift = x."""
    d = Dictionary(model.d_model, model.d_model, "standard", site=site)
    with torch.no_grad():
        d.W_enc.copy_(torch.eye(model.d_model))
        d.W_dec.copy_(torch.eye(model.d_model))
        d.b_dec.fill_(-shift)
    return d


def test_identity_dictionary_recovers_everything_and_zero_nothing(llama):
    site = "blocks.1.resid_post"
    windows = _windows(llama)
    with torch.no_grad():
        largest = llama.run(windows, [site], logits=False).cache[site].abs().max().item()
    identity = _identity(llama, site, shift=2 * largest)
    zero = Dictionary(llama.d_model, 32, "standard", site=site)
    result = evaluate(llama, {"identity": identity, "zero": zero}, windows, batch_size=4, outlier=0)
    ident, nothing = (e.metrics for e in result.dictionaries)
    assert ident["ce_zero_ablated"] > ident["ce_clean"] + 0.02  # the site matters
    assert ident["ce_recovered_zero"] == pytest.approx(1, abs=1e-4)
    assert ident["ce_recovered_mean"] == pytest.approx(1, abs=1e-4)
    assert ident["kl"] < 1e-8 and ident["fvu"] < 1e-10
    assert ident["l0"] == llama.d_model and ident["dead"] == 0 and ident["dense"] == 1
    assert nothing["ce_recovered_zero"] == 0 and nothing["kl"] == nothing["kl_zero_ablated"]
    assert nothing["ce_spliced"] == nothing["ce_zero_ablated"]  # spliced in, it is the zero ablation
    gap = nothing["ce_mean_ablated"] - nothing["ce_clean"]
    assert nothing["ce_recovered_mean"] == pytest.approx((nothing["ce_mean_ablated"] - nothing["ce_spliced"]) / gap)
    assert nothing["dead"] == 1 and nothing["l0"] == 0


def test_evaluation_against_hugging_face_hidden_states(llama):
    site = "blocks.0.resid_post"
    d = Dictionary(llama.d_model, 96, "topk", k=6, site=site).init_(seed=3, scale=0.5)
    with torch.no_grad():
        d.b_dec.copy_(torch.randn(llama.d_model, generator=torch.Generator().manual_seed(4)) * 0.1)
    windows = _windows(llama, n=5)
    got = evaluate(llama, d, windows, batch_size=2, skip_first=2, outlier=0, downstream=False).dictionaries[0].metrics
    with torch.no_grad():
        x = llama.hf(input_ids=windows, output_hidden_states=True).hidden_states[1][:, 2:].flatten(0, 1)
        pre = (x - d.b_dec) @ d.W_enc + d.b_enc
        f = torch.zeros_like(pre).scatter(1, pre.topk(6, dim=1).indices, torch.relu(pre.topk(6, dim=1).values))
        x_hat = f @ d.W_dec + d.b_dec
    assert got["tokens"] == x.shape[0]
    assert got["fvu"] == pytest.approx(float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-5)
    assert got["l0"] == pytest.approx(float((f > 0).sum(1).float().mean()))
    cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=1).mean()
    assert got["cosine"] == pytest.approx(float(cos), rel=1e-5)


def test_outliers_are_neither_scored_nor_spliced(llama):
    site = "blocks.1.resid_post"
    windows = _windows(llama)
    with torch.no_grad():
        x = llama.run(windows, [site], logits=False).cache[site][:, 1:].flatten(0, 1)
    norms = x.norm(dim=1)
    ratio = float(norms.max() / norms.median()) * 0.999  # the largest token is an outlier
    zero = Dictionary(llama.d_model, 8, "standard", site=site)
    kept = evaluate(llama, zero, windows, outlier=ratio).dictionaries[0].metrics
    assert kept["tokens"] == x.shape[0] - 1
    keep = norms <= ratio * norms.median()
    assert kept["fvu"] == pytest.approx(
        float(x[keep].pow(2).sum() / (x[keep] - x[keep].mean(0)).pow(2).sum()), rel=1e-5
    )


# -- the commands ------------------------------------------------------------------------------------


def test_features_train_and_eval_commands(capsys, tmp_path):
    out = tmp_path / "train"
    code, _, err = run_cli(
        capsys, "features", "train", "smollm2-135m", "--site", "blocks.3.resid_post", "--arch", "topk", "--k", "8",
        "--width", "1x", "--tokens", "1024", "--batch-size", "256", "--seq-len", "64", "--harvest-batch", "16",
        "--eval-tokens", "256", "--out", str(out), "--cache", str(tmp_path / "shards"),
    )  # fmt: skip
    assert code == 0, err
    results = read_results(out)
    assert results["command"] == "features train" and results["status"] == "complete"
    log = results["parts"]["training"]["logs"]["blocks.3.resid_post"]
    assert log[-1]["step"] == 4 and log[-1]["l0"] == pytest.approx(8)
    folder = out / "dictionaries" / "blocks.3.resid_post"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    d = load_dictionary(folder)
    assert d.site == "blocks.3.resid_post" and d.d_sae == 576 and d.k == 8
    evaluation = results["parts"]["evaluation"]["dictionaries"][0]["metrics"]
    assert 0 < evaluation["fvu"] < 1.5 and "ce_recovered_zero" in evaluation
    assert (tmp_path / "shards" / "manifest.json").is_file() and (out / "checkpoint.pt").is_file()

    code, _, err = run_cli(
        capsys, "features", "eval", "smollm2-135m", "--dict", str(out / "dictionaries"), "--tokens", "256",
        "--seq-len", "64", "--out", str(tmp_path / "eval"),
    )  # fmt: skip
    assert code == 0, err
    again = read_results(tmp_path / "eval")["parts"]["evaluation"]["dictionaries"][0]["metrics"]
    for key in ("fvu", "l0", "ce_recovered_zero", "kl"):  # the same tokens, the saved dictionary
        assert again[key] == pytest.approx(evaluation[key], rel=1e-4, abs=1e-6), key
    assert (tmp_path / "eval" / "feature_density.png").is_file()

    code, _, err = run_cli(capsys, "features", "train", "smollm2-135m", "--arch", "gated", "--recipe", "sparsify")
    assert code == 2 and "sparsify recipe" in err

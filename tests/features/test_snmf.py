"""SNMF of MLP activations: the updates against their definitions (torch.linalg.lstsq, the
Frobenius norm of the residual, a sort), recovery of a planted factorisation, top tokens by hand,
and steering with a feature at a KL calibrated by bisection, checked with a plain forward hook."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmscope.features import Dictionary, save_dictionary
from lmscope.features.snmf import (
    balance,
    f_step,
    fit_snmf,
    g_step,
    load_snmf,
    save_snmf,
    sq_error,
    top_tokens,
    winner_take_all,
)
from lmscope.steering.steer import caa, calibrate, neutral_prompts
from lmscope.steering.vectors import load_direction
from tests.helpers import read_results, run_cli
from tests.steering.planted import planted, sentences


def _planted(d=64, rank=6, n=400, per=8, seed=0):
    """``F`` [d, rank] with ``per`` nonzero neurons per column (mixed signs) and ``G`` [n, rank] >= 0
    with one or two active features per token."""
    g = torch.Generator().manual_seed(seed)
    F_ = torch.zeros(d, rank)
    for j in range(rank):
        F_[torch.randperm(d, generator=g)[:per], j] = torch.randn(per, generator=g)
    G = torch.zeros(n, rank)
    for i in range(n):
        k = int(torch.randint(1, 3, (1,), generator=g))
        G[i, torch.randperm(rank, generator=g)[:k]] = 0.2 + torch.rand(k, generator=g)
    return F_, G


def _mean_best_cosine(truth, found):
    return float((F.normalize(truth, dim=0).T @ F.normalize(found, dim=0)).max(1).values.mean())


def _loss(A, F_, G):
    return float(torch.linalg.matrix_norm(A - F_ @ G.T) ** 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_a_planted_factorisation_up_to_permutation(seed):
    truth_F, truth_G = _planted(seed=seed)
    A = truth_F @ truth_G.T
    fit = fit_snmf(A, 6, sparsity=8 / 64, max_iter=200, patience=30, tol=1e-6, seed=seed)
    assert _mean_best_cosine(truth_F, fit.F) > 0.95
    assert (fit.G >= 0).all()
    assert fit.error == pytest.approx(math.sqrt(_loss(A, fit.F, fit.G)) / float(A.norm()), rel=1e-3)
    assert ((fit.F != 0).sum(0) <= 8).all()  # winner-take-all: 8 of 64 neurons per feature


def test_g_stays_nonnegative_after_every_update():
    truth_F, truth_G = _planted(seed=3)
    A = truth_F @ truth_G.T + 0.05 * torch.randn(64, 400, generator=torch.Generator().manual_seed(0))
    G = torch.rand(400, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(60):  # the fit's iteration, step by step
        F_, G = balance(winner_take_all(f_step(A, G), 0.25), G)
        assert (G >= 0).all()
        G = g_step(A, F_, G)
        assert (G >= 0).all() and torch.isfinite(G).all()


def test_the_g_step_with_f_fixed_never_increases_the_loss():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(40, 300, generator=g, dtype=torch.float64)
    F_ = torch.randn(40, 5, generator=g, dtype=torch.float64)  # mixed signs, held fixed
    G = torch.rand(300, 5, generator=g, dtype=torch.float64)
    losses = [_loss(A, F_, G)]
    for _ in range(300):
        G = g_step(A, F_, G)
        losses.append(_loss(A, F_, G))
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(losses))
    assert losses[-1] < 0.9 * losses[0]  # and it does descend


def test_the_f_step_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 200, generator=g, dtype=torch.float64)
    G = torch.rand(200, 7, generator=g, dtype=torch.float64)
    expected = torch.linalg.lstsq(G, A.T).solution.T  # argmin_F ||A - F G^T||
    torch.testing.assert_close(f_step(A, G), expected, rtol=1e-9, atol=1e-9)


def test_winner_take_all_keeps_each_columns_largest_magnitudes():
    F_ = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    kept = winner_take_all(F_, 0.2)  # ceil(0.2 * 20) = 4 per column
    for j in range(4):
        order = sorted(range(20), key=lambda i: -abs(float(F_[i, j])))
        expected = torch.zeros(20)
        expected[order[:4]] = F_[order[:4], j]
        assert torch.equal(kept[:, j], expected)


def test_the_error_formula_and_balance_keep_the_product():
    g = torch.Generator().manual_seed(0)
    A, F_, G = torch.randn(10, 50, generator=g), torch.randn(10, 3, generator=g), torch.rand(50, 3, generator=g)
    assert float(sq_error(A, F_, G)) == pytest.approx(_loss(A, F_, G), rel=1e-4)
    F2, G2 = balance(F_, G)
    torch.testing.assert_close(F2 @ G2.T, F_ @ G.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(G2.norm(dim=0), torch.ones(3))


def test_top_tokens_group_the_largest_coefficients_by_text():
    texts = ["a", "b", "a", "c", "b", "a"]
    G = torch.tensor([[5.0, 0.0], [4.0, 1.0], [3.0, 0.0], [0.5, 9.0], [0.0, 2.0], [0.0, 0.0]])
    tops = top_tokens(G, texts, occurrences=4, n=2)
    assert tops[0] == [("a", 8.0, 2), ("b", 4.0, 1)]  # occurrences 0, 1, 2, 3: a 5+3, b 4, c 0.5
    assert tops[1] == [("c", 9.0, 1), ("b", 3.0, 2)]  # occurrences 3, 4, 1 (and 0 with 0: dropped)


# -- steering with a feature -------------------------------------------------------------------


def _hand_kl(model, layer, vector, prompts):
    """Mean KL(clean || steered) of the next-token distributions over every position but the last
    of each prompt (BOS first), the steered run adding ``vector`` to the down-projection's input."""
    down = model.hf.model.layers[layer].mlp.down_proj
    total, count = 0.0, 0
    for text in prompts:
        ids = torch.tensor([model.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            clean = F.log_softmax(model.hf(ids).logits[0, :-1].float(), -1)
            handle = down.register_forward_pre_hook(lambda mod, args: (args[0] + vector,))
            try:
                steered = F.log_softmax(model.hf(ids).logits[0, :-1].float(), -1)
            finally:
                handle.remove()
        total += float((clean.exp() * (clean - steered)).sum())
        count += len(clean)
    return total / count


def test_kl_calibration_hits_the_target_by_hand():
    model, _ = planted()
    v = F.normalize(torch.randn(model.d_mlp, generator=torch.Generator().manual_seed(0)), dim=0)
    prompts = sentences(4, seed=3)
    result = calibrate(model, caa({1: v}, site="mlp.post"), [1], 0.05, prompts, rtol=0.02)
    assert result.kl == pytest.approx(0.05, rel=0.02)
    assert _hand_kl(model, 1, result.coeff * v, prompts) == pytest.approx(0.05, rel=0.025)
    assert _hand_kl(model, 1, 0.5 * result.coeff * v, prompts) < 0.04  # the coefficient matters


def test_directions_from_an_snmf_file_and_a_dictionary(tmp_path):
    F_, G = _planted()
    save_snmf(tmp_path / "snmf.safetensors", F_, G, torch.arange(400), layer=3, model="m")
    snmf = load_direction(f"{tmp_path / 'snmf.safetensors'}#2")
    assert (snmf.name, snmf.kind, snmf.layers) == ("snmf2", "mlp.post", (3,))
    assert torch.equal(snmf.vectors[3], F_[:, 2])
    assert torch.equal(load_snmf(tmp_path / "snmf.safetensors")[0]["G"], G)
    d = Dictionary(16, 32, "topk", k=4, site="blocks.1.resid_post").init_(0)
    save_dictionary(d, tmp_path / "sae")
    row = load_direction(f"{tmp_path / 'sae'}#5")
    assert (row.name, row.kind, row.layers) == ("sae5", "resid_post", (1,))
    torch.testing.assert_close(row.vectors[1], d.W_dec[5].detach())


# -- the commands --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("snmf")
    model, _ = planted()
    model.hf.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    (root / "corpus.txt").write_text(" ".join(sentences(150, seed=1)))
    (root / "pairs.jsonl").write_text(
        "".join(json.dumps({"prompt": s, "positive": " good", "negative": " bad"}) + "\n" for s in sentences(8))
    )
    (root / "eval.jsonl").write_text(
        "".join(json.dumps({"prompt": s, "target": " P", "opposite": " N"}) + "\n" for s in sentences(2, seed=4))
    )
    (root / "neutral.txt").write_text("\n".join(sentences(3, seed=9)))
    return root


def test_snmf_command_then_steering_with_its_feature_at_matched_kl(capsys, files, tmp_path):
    args = ["features", "snmf", str(files / "model"), "--layer", "1", "--rank", "4", "--tokens", "300",
            "--window", "16", "--corpus", str(files / "corpus.txt"), "--sparsity", "0.25", "--max-iter", "40",
            "--top", "3", "--out", str(tmp_path / "snmf")]  # fmt: skip
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    parts = read_results(tmp_path / "snmf")["parts"]
    assert parts["fit"]["rank"] == 4 and parts["fit"]["tokens"] == 300
    assert parts["fit"]["neurons_per_feature"] == [16] * 4  # ceil(0.25 * 64)
    assert [row["feature"] for row in parts["features"]["rows"]] == [0, 1, 2, 3]
    tensors, meta = load_snmf(tmp_path / "snmf" / "snmf.safetensors")
    assert tensors["F"].shape == (64, 4) and meta["layer"] == "1"
    code, _, err = run_cli(capsys, *args)  # resumed: the same settings, read back
    assert code == 0, err
    assert read_results(tmp_path / "snmf")["resumed"] == ["fit", "features"]

    code, _, err = run_cli(
        capsys, "steer", str(files / "model"), "--pairs", str(files / "pairs.jsonl"), "--eval",
        str(files / "eval.jsonl"), "--layers", "1", "--neutral", str(files / "neutral.txt"), "--windows", "0",
        "--samples", "0", "--instruction", "good", "--vectors", f"{tmp_path / 'snmf' / 'snmf.safetensors'}#0",
        "--match-kl", "0.02",
        "--out", str(tmp_path / "steer"),
    )  # fmt: skip
    assert code == 0, err
    parts = read_results(tmp_path / "steer")["parts"]
    calibration = parts["calibration"]["rows"]
    assert [r["method"] for r in calibration] == ["vector", "snmf0"]
    rows = {r["method"]: r for r in parts["steer"]["rows"]}
    for method in ("vector", "snmf0"):
        assert rows[method]["kl"] == pytest.approx(0.02, rel=0.06)  # the sweep measures the calibrated KL again
    coeff = next(r["coeff"] for r in calibration if r["method"] == "snmf0")
    model, _ = planted()
    v = tensors["F"][:, 0]
    assert _hand_kl(model, 1, coeff * v, (files / "neutral.txt").read_text().splitlines()) == pytest.approx(
        rows["snmf0"]["kl"], rel=1e-3
    )


def test_bad_vectors_are_one_line_errors(capsys, files, tmp_path):
    base = ["steer", str(files / "model"), "--pairs", str(files / "pairs.jsonl"), "--eval", str(files / "eval.jsonl"),
            "--layers", "1", "--windows", "0", "--samples", "0", "--out", str(tmp_path)]  # fmt: skip
    save_snmf(tmp_path / "s.safetensors", torch.ones(64, 2), torch.ones(5, 2), torch.arange(5), layer=1, model="m")
    for spec, message in ((tmp_path / "s.safetensors", "name one of its 2 SNMF features"),
                          (f"{tmp_path / 's.safetensors'}#7", "SNMF features 7 out of range"),
                          (tmp_path / "missing", "no such file")):  # fmt: skip
        code, _, err = run_cli(capsys, *base, "--vectors", str(spec))
        assert code == 2 and message in err, err
    assert neutral_prompts()  # the bundled prompts the calibration uses by default

"""Expert resection on the model trained on two synthetic domains, and the ``experts`` command."""

from __future__ import annotations

import json

import pytest
import torch

from lmscope.experts import domain_loss, expert_stats, resection
from lmscope.core.corpus import Corpus
from tests.experts import synthetic
from tests.helpers import read_results, run_cli


@pytest.fixture(scope="module")
def model():
    return synthetic.trained_model()


@pytest.fixture(scope="module")
def corpora():
    return [synthetic.corpus("a"), synthetic.corpus("b")]


def _hand_loss(m, corpus: Corpus, removed: list[int], window: int = 64) -> float:
    """Mean next-token loss with the layer-0 experts ``removed`` zeroed in the weights themselves:
    their gate/up/down weights are 0, so they add nothing where chosen (the reference for
    resection, which sets their routing weights to 0)."""
    experts = m.hf.model.layers[0].mlp.experts
    saved = [experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()]
    try:
        with torch.no_grad():
            experts.down_proj[removed] = 0
            ids = corpus.windows(window)
            logits = m.hf(input_ids=ids, use_cache=False).logits[:, :-1]
            return float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:]))
    finally:
        with torch.no_grad():
            experts.gate_up_proj.copy_(saved[0])
            experts.down_proj.copy_(saved[1])


def test_resecting_specialists_hurts_their_domain_only(model, corpora):
    stats = expert_stats(model, corpora, window=64)
    result = resection(model, corpora, stats, 2, draws=3, window=64)
    rows = {(r["target"], r["kind"]): r for r in result.rows}
    spec_a, random_a = rows[("a", "specialised")], rows[("a", "random")]
    # the loss with the experts removed from the weights (independent of the routing hooks)
    removed = [e for layer, e in spec_a["experts"]]
    assert all(layer == 0 for layer, _ in spec_a["experts"])
    for corpus in corpora:
        assert spec_a["loss"][corpus.name] == pytest.approx(_hand_loss(model, corpus, removed), rel=1e-4)
        assert result.baseline[corpus.name] == pytest.approx(_hand_loss(model, corpus, []), rel=1e-4)
    # a's specialists: a's loss rises by far, b's not at all (b never routes to them)
    assert result.delta(spec_a, "a") > 1.0
    assert abs(result.delta(spec_a, "b")) < 1e-4
    assert result.delta(spec_a, "a") > 3 * result.delta(random_a, "a")
    spec_b = rows[("b", "specialised")]
    assert result.delta(spec_b, "b") > 1.0 and abs(result.delta(spec_b, "a")) < 1e-4
    # random draws: n distinct experts each, and the mean of their losses
    assert all(len(set(map(tuple, pick))) == 2 for pick in random_a["experts"])
    assert random_a["loss"]["a"] == pytest.approx(sum(d["a"] for d in random_a["draws"]) / 3)


def test_domain_loss_without_removal_is_the_plain_loss(model, corpora):
    assert domain_loss(model, corpora[:1], window=64)["a"] == pytest.approx(_hand_loss(model, corpora[0], []), rel=1e-5)


def test_experts_command_writes_report_and_tables(capsys, tmp_path, model):
    directory = synthetic.save_model(model, tmp_path / "model")
    for d in "ab":
        (tmp_path / f"{d}.txt").write_text(synthetic.text(d, 1024))
    out = tmp_path / "out"
    args = ["experts", directory, "--corpus", str(tmp_path / "a.txt"), "--corpus", str(tmp_path / "b.txt")]
    code, stdout, err = run_cli(capsys, *args, "--window", "64", "--resect", "2", "--draws", "2", "--out", str(out))
    assert code == 0, err
    assert "expert resection" in stdout and "a.txt specialists" in stdout
    results = read_results(out)
    routing, res = results["parts"]["routing"], results["parts"]["resection"]
    assert routing["domains"] == ["a.txt", "b.txt"] and routing["tokens"] == [1024, 1024]
    assert len(routing["load"][0]) == 2 and len(routing["load"][0][0]) == 8
    spec = next(r for r in res["rows"] if r["target"] == "a.txt" and r["kind"] == "specialised")
    assert spec["loss"]["a.txt"] - res["baseline"]["a.txt"] > 1.0
    html = (out / "report.html").read_text()
    assert "Expert resection" in html and "complete" in html
    for name in ("expert_load", "specialisation_0", "expert_coactivation", "resection"):
        assert (out / f"{name}.png").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resect", "2"], "needs at least two --corpus"),
        (["--corpus", "a.txt", "--corpus", "b.txt", "--resect", "0"], "--resect must be at least 1, not 0"),
        (["--corpus", "missing.txt"], "--corpus missing.txt: no such file"),
    ],
)
def test_experts_command_bad_input(capsys, tmp_path, monkeypatch, model, extra, message):
    monkeypatch.chdir(tmp_path)
    directory = synthetic.save_model(model, tmp_path / "model")
    for d in "ab":
        (tmp_path / f"{d}.txt").write_text(synthetic.text(d, 256))
    code, _, err = run_cli(capsys, "experts", directory, "--window", "64", *extra, "--out", str(tmp_path / "o"))
    assert code == 2 and message in err and "Traceback" not in err


def test_experts_command_refuses_a_dense_model(capsys, tmp_path):
    code, _, err = run_cli(capsys, "experts", "--tokens", "256", "--out", str(tmp_path / "o"))
    assert code == 2 and "no mixture-of-experts layers" in err


def test_interrupted_experts_command_resumes(capsys, tmp_path, monkeypatch, model):
    """An interruption during the resection leaves the routing statistics and finished rows in
    results.json; the rerun reads them back (no routing pass, only the missing losses measured)
    and ends with the same table as an uninterrupted run."""
    import importlib

    import lmscope.experts

    resection_module = importlib.import_module(
        "lmscope.experts.resection"
    )  # the package exports a function of that name

    directory = synthetic.save_model(model, tmp_path / "model")
    for d in "ab":
        (tmp_path / f"{d}.txt").write_text(synthetic.text(d, 512))
    args = ["experts", directory, "--corpus", str(tmp_path / "a.txt"), "--corpus", str(tmp_path / "b.txt")]
    args += ["--window", "64", "--resect", "2", "--draws", "2"]
    code, _, err = run_cli(capsys, *args, "--out", str(tmp_path / "full"))
    assert code == 0, err
    full = read_results(tmp_path / "full")["parts"]

    real = resection_module.domain_loss
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # baseline, a's specialists, then the first random draw
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(resection_module, "domain_loss", interrupted)
    code, _, _ = run_cli(capsys, *args, "--out", str(tmp_path / "run"))
    assert code == 130  # interrupted (click: "Aborted!", exit 128 + SIGINT)
    partial = read_results(tmp_path / "run")["parts"]
    assert "routing" in partial and len(partial["resection"]["rows"]) == 1

    calls.clear()
    monkeypatch.setattr(resection_module, "domain_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(lmscope.experts.command, "expert_stats", lambda *a, **k: pytest.fail("routing measured again"))
    code, _, err = run_cli(capsys, *args, "--out", str(tmp_path / "run"))
    assert code == 0 and "read back" in err
    assert len(calls) == 2 + 1 + 2  # a's random draws, b's specialists, b's random draws
    resumed = read_results(tmp_path / "run")["parts"]
    assert resumed["routing"] == full["routing"]
    for got, want in zip(resumed["resection"]["rows"], full["resection"]["rows"], strict=True):
        assert got["experts"] == want["experts"] and got["loss"] == pytest.approx(want["loss"], rel=1e-6)

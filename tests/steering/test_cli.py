"""``lmscope probe`` and ``lmscope steer`` on the planted model saved to disk."""

from __future__ import annotations

import json

import pytest

from lmscope.steering.store import load_control_vector, load_vectors
from tests.helpers import read_results, run_cli
from tests.steering.planted import planted, sentences


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer")
    model, _ = planted()
    model.hf.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    (root / "pairs.jsonl").write_text(
        "".join(json.dumps({"prompt": s, "positive": " good", "negative": " bad"}) + "\n" for s in sentences(12))
    )
    (root / "eval.jsonl").write_text(
        "".join(json.dumps({"prompt": s, "target": " P", "opposite": " N"}) + "\n" for s in sentences(3, seed=4))
    )
    (root / "neutral.txt").write_text("\n".join(sentences(2, seed=9)))
    return root


def test_steer_writes_the_sweep_and_the_vectors(capsys, files, tmp_path):
    code, _, err = run_cli(
        capsys, "steer", str(files / "model"), "--pairs", str(files / "pairs.jsonl"), "--eval", str(files / "eval.jsonl"),
        "--layers", "1", "--coeffs", "0.1,0.2", "--instruction", "good", "--neutral", str(files / "neutral.txt"),
        "--windows", "0", "--samples", "1", "--max-kl", "100", "--max-ppl-rise", "10",
        "--save", str(tmp_path / "v.safetensors"), "--gguf", str(tmp_path / "v.gguf"), "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 0, err
    results = read_results(tmp_path / "out")
    rows = results["parts"]["steer"]["rows"]
    assert [r["setting"] for r in rows] == ["none", "prompting", "L1 x0.1", "L1 x0.2"]
    assert results["parts"]["steer"]["chosen"] == "L1 x0.2", rows  # the larger push, within the generous limits
    assert (tmp_path / "out" / "report.html").exists()
    vectors, meta = load_vectors(tmp_path / "v.safetensors")
    assert list(vectors) == [1] and meta["method"] == "mean_diff"
    assert list(load_control_vector(tmp_path / "v.gguf")) == [1]


def test_steer_with_lineas_adds_its_rows(capsys, files, tmp_path):
    code, _, err = run_cli(
        capsys, "steer", str(files / "model"), "--pairs", str(files / "pairs.jsonl"), "--eval", str(files / "eval.jsonl"),
        "--layers", "1", "--coeffs", "0.1", "--neutral", str(files / "neutral.txt"), "--windows", "0", "--samples", "0",
        "--lineas", "--lineas-steps", "3", "--lineas-strengths", "1", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    rows = read_results(tmp_path)["parts"]["steer"]["rows"]
    assert [(r["setting"], r["method"]) for r in rows] == [
        ("none", "none"),
        ("L1 x0.1", "vector"),
        ("LinEAS x1", "LinEAS"),
    ]


def test_probe_writes_accuracy_per_layer(capsys, files, tmp_path):
    code, _, err = run_cli(
        capsys, "probe", str(files / "model"), "--data", str(files / "pairs.jsonl"), "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    results = read_results(tmp_path)
    assert results["parts"]["probe"]["layers"] == [0, 1] and results["parts"]["probe"]["accuracy"]["mean_diff"] == [1.0, 1.0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "5"], "out of range"),
        (["--coeffs", "1,x"], "--coeffs"),
        (["--eval", "missing.jsonl"], "no such file"),
    ],
)
def test_bad_steer_input_is_a_one_line_error(capsys, files, args, message):
    base = {"--pairs": str(files / "pairs.jsonl"), "--eval": str(files / "eval.jsonl")}
    for key, value in zip(args[::2], args[1::2], strict=True):
        base[key] = value
    argv = [x for kv in base.items() for x in kv]
    code, _, err = run_cli(capsys, "steer", str(files / "model"), *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_interrupted_steer_resumes_from_its_finished_parts(capsys, files, tmp_path, monkeypatch):
    """Interrupted in the sweep, a rerun with the same settings reads the vectors back (they are
    not computed again) and gives the table of an uninterrupted run."""
    import lmscope.steering.commands as commands

    args = ["steer", str(files / "model"), "--pairs", str(files / "pairs.jsonl"), "--eval", str(files / "eval.jsonl"),
            "--layers", "1", "--coeffs", "0.1,0.2", "--neutral", str(files / "neutral.txt"), "--windows", "0",
            "--samples", "0"]  # fmt: skip
    code, _, err = run_cli(capsys, *args, "--out", str(tmp_path / "full"))
    assert code == 0, err
    full = read_results(tmp_path / "full")

    real_sweep = commands.sweep

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "sweep", interrupted)
    code, _, _ = run_cli(capsys, *args, "--out", str(tmp_path / "run"))
    assert code == 130
    partial = read_results(tmp_path / "run")
    assert list(partial["parts"]) == ["vectors"] and partial["status"] == "running"

    monkeypatch.setattr(commands, "sweep", real_sweep)
    monkeypatch.setattr(commands, "steering_vectors", lambda *a, **k: pytest.fail("vectors computed again"))
    code, _, err = run_cli(capsys, *args, "--out", str(tmp_path / "run"))
    assert code == 0 and "vectors read back" in err
    resumed = read_results(tmp_path / "run")
    assert resumed["parts"]["vectors"] == full["parts"]["vectors"]
    assert resumed["parts"]["steer"]["rows"] == full["parts"]["steer"]["rows"]

    code, _, err = run_cli(capsys, *args[:-4], "--windows", "0", "--samples", "1", "--out", str(tmp_path / "run"))
    assert code == 2 and "other settings (samples: 0 -> 1)" in err and err.strip().count("\n") == 0


def test_a_sweep_interrupted_midway_measures_only_the_missing_cells(capsys, files, tmp_path, monkeypatch):
    """Interrupted after two of the sweep's four batches (unsteered, prompting, layer 0's two
    coefficients, layer 1's two), a rerun measures layer 1's cells only and writes the table of an
    uninterrupted run, number for number."""
    from lmscope.steering import steer

    args = ["steer", str(files / "model"), "--pairs", str(files / "pairs.jsonl"), "--eval", str(files / "eval.jsonl"),
            "--layers", "0,1", "--coeffs", "0.1,0.2", "--instruction", "good", "--neutral", str(files / "neutral.txt"),
            "--windows", "0", "--samples", "0"]  # fmt: skip
    real = steer._evaluate
    measured: list[list[str]] = []

    def counting(model, data, steerer, rows, prefix, batched):
        names = ["prompting" if prefix else "none"] if rows == [None] else [s.name for s in rows]
        if len(measured) == limit:
            raise KeyboardInterrupt
        measured.append(names)
        return real(model, data, steerer, rows, prefix, batched)

    monkeypatch.setattr(steer, "_evaluate", counting)
    limit = None
    code, _, err = run_cli(capsys, *args, "--out", str(tmp_path / "full"))
    assert code == 0, err
    assert measured == [["none"], ["prompting"], ["L0 x0.1", "L0 x0.2"], ["L1 x0.1", "L1 x0.2"]]
    full = read_results(tmp_path / "full")

    measured.clear()
    limit = 3
    code, _, _ = run_cli(capsys, *args, "--out", str(tmp_path / "run"))
    assert code == 130
    progress = read_results(tmp_path / "run")["parts"]["steer"]
    assert progress["measured"] == 4 and progress["total"] == 6
    assert list(progress["cells"]) == ["none", "prompting", "L0 x0.1", "L0 x0.2"]

    measured.clear()
    limit = None
    code, _, err = run_cli(capsys, *args, "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert measured == [["L1 x0.1", "L1 x0.2"]]
    resumed = read_results(tmp_path / "run")
    assert resumed["parts"]["steer"] == full["parts"]["steer"]
    assert resumed["status"] == "complete" and (tmp_path / "run" / "report.html").is_file()


def test_steer_without_the_prompting_baseline_writes_its_report(capsys, files, tmp_path):
    """No --instruction (the baseline is optional): a chosen setting is reported without it."""
    code, printed, err = run_cli(
        capsys, "steer", str(files / "model"), "--pairs", str(files / "pairs.jsonl"), "--eval", str(files / "eval.jsonl"),
        "--layers", "1", "--coeffs", "0.1", "--neutral", str(files / "neutral.txt"), "--windows", "0", "--samples", "0",
        "--max-kl", "100", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    assert "Chosen: L1 x0.1" in printed and "prompting" not in printed
    assert (tmp_path / "report.html").is_file() and read_results(tmp_path)["status"] == "complete"

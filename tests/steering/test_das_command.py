"""``lmscope das`` end to end on the planted one-direction model of test_subspace.py (saved with a
word-level tokenizer): the subspace found is the planted direction, results.json, the report,
the plots and the saved basis are written, a rerun reads both parts back, bad input is one line."""

from __future__ import annotations

import json

import pytest
import torch

from lmscope.steering.subspace import load_subspace
from tests.helpers import read_results, run_cli, word_tokenizer
from tests.steering.test_subspace import ANSWER, SITE, VOCAB, _sign, planted, task

WORDS = ["<pad>", "<bos>", "<eos>", *(f"t{i}" for i in range(3, 21)), "P", "N", "x"]
assert len(WORDS) == VOCAB and WORDS[ANSWER[+1]] == "P" and WORDS[ANSWER[-1]] == "N"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The planted model on disk, its direction u, and 64 pairs: the corrupted prompt is a base
    input of the planted task, the clean one its source, the answer the source's final feature."""
    root = tmp_path_factory.mktemp("das")
    model, directions = planted(illusion=False)
    model.hf.save_pretrained(root / "model")
    word_tokenizer(WORDS).save_pretrained(root / "model")
    base, source, labels = task(64, seed=1)
    text = lambda ids: " ".join(WORDS[int(i)] for i in ids)
    rows = [
        {"clean": text(s), "corrupt": text(b), "answer": " " + WORDS[int(y)],
         "wrong_answer": " " + WORDS[ANSWER[int(_sign(b[-1:])[0])]]}
        for b, s, y in zip(base, source, labels, strict=True)
    ]  # fmt: skip
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, directions["u"]


def _args(root, out, *extra):
    return ["das", str(root / "model"), "--data", str(root / "pairs.jsonl"), "--site", SITE, "--steps", "60",
            "--lr", "0.05", "--holdout", "0.25", "--out", str(out), *extra]  # fmt: skip


def test_das_finds_the_planted_direction_and_writes_its_report(capsys, files, tmp_path, monkeypatch):
    root, u = files
    out = tmp_path / "out"
    code, printed, err = run_cli(capsys, *_args(root, out))
    assert code == 0, err
    assert "interchange-intervention accuracy" in printed and "Illusion check" in printed
    results = read_results(out)
    assert results["command"] == "das" and results["status"] == "complete"
    assert results["settings"]["k"] == 1 and results["settings"]["site"] == SITE
    found = results["parts"]["das"]
    assert (found["n_train"], found["n_heldout"], found["basis_shape"]) == (48, 16, [16, 1])
    assert len(found["losses"]) == 60 and found["losses"][-1] < found["losses"][0]
    assert found["train_iia"] >= 0.9 and found["heldout_iia"] >= 0.9
    assert found["answers"]["shortened"] == 0 and found["answers"]["candidates"] == 128
    assert results["parts"]["illusion"]["flagged"] is False
    basis, meta = load_subspace(out / "subspace.safetensors")
    assert basis.shape == (16, 1) and meta["site"] == SITE
    assert float((basis[:, 0] @ u).abs()) > 0.9  # the planted direction, by construction
    assert (out / "report.html").is_file() and (out / "das_training.png").is_file() and (out / "das_iia.png").is_file()

    from lmscope.steering import commands

    monkeypatch.setattr(commands, "das", lambda *a, **k: pytest.fail("DAS trained again"))
    monkeypatch.setattr(commands, "illusion_check", lambda *a, **k: pytest.fail("illusion checked again"))
    code, _, err = run_cli(capsys, *_args(root, out))
    assert code == 0 and "das read back" in err and "illusion read back" in err, err
    again = read_results(out)
    assert again["parts"] == results["parts"] and again["resumed"] == ["das", "illusion"]
    assert torch.equal(load_subspace(out / "subspace.safetensors")[0], basis)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--k", "0"], "--k must be at least 1"),
        (["--holdout", "1"], "--holdout must be at most 0.99"),
        (["--positions", "last"], "--positions"),
        (["--positions", "0,3"], "position 3 is outside the inputs (3 tokens"),
        (["--site", "blocks.7.resid_post"], "blocks.7"),
        (["--k", "17"], "between 1 and"),
    ],
)
def test_bad_das_input_is_a_one_line_error(capsys, files, tmp_path, extra, message):
    root, _ = files
    code, _, err = run_cli(capsys, *_args(root, tmp_path / "out", *extra))
    assert code == 2 and err.startswith("error:") and message in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "out" / "results.json").exists()


def test_das_refuses_lists_of_candidates(capsys, files, tmp_path):
    root, _ = files
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"clean": "t3 t4", "corrupt": "t5 t6", "answer": [" P", " N"], "wrong_answer": " N"}))
    args = _args(root, tmp_path / "out")
    args[args.index("--data") + 1] = str(data)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "pair 0: DAS takes one answer" in err and err.strip().count("\n") == 0, err

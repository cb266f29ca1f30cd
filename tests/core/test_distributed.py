"""Many processes (torch.distributed, gloo on the CPU): every analysis that splits its work over
ranks gives what one process gives. The reference is the same script as one process (under
torchrun too, so both use one thread per process and the same per-item computations)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers import read_results

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMSCOPE_QUIET": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict]:
    out = {}
    for nproc in (1, 2):
        path = tmp_path_factory.mktemp("dist") / f"n{nproc}.pt"
        done = torchrun(nproc, str(WORKER), str(path))
        assert done.returncode == 0, done.stderr[-3000:]
        out[nproc] = torch.load(path, weights_only=False)
    return out


def test_two_ranks_ran(runs):
    assert runs[1]["world_size"] == 1 and runs[2]["world_size"] == 2


def test_statistics_exactly_equal_one_process(runs):
    one, two = runs[1], runs[2]
    assert one["n_tokens"] == two["n_tokens"] == 320
    assert set(one["stats"]) == set(two["stats"])
    for site, fields in one["stats"].items():
        for key, value in fields.items():
            other = two["stats"][site][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), (site, key)
            else:
                assert value == other, (site, key)


def test_gram_matrices_and_perplexity_equal_one_process(runs):
    for t in "kv":
        torch.testing.assert_close(runs[2]["kv"][t], runs[1]["kv"][t], rtol=1e-12, atol=0)
    assert runs[2]["perplexity"] == pytest.approx(runs[1]["perplexity"], rel=1e-12)


@pytest.mark.parametrize("key", ["patching", "attribution", "eap-ig nodes", "edges"])
def test_pair_scores_equal_one_process(runs, key):
    assert runs[1][key].abs().max() > 0
    torch.testing.assert_close(runs[2][key], runs[1][key], rtol=0, atol=1e-5)


def test_faithfulness_and_edit_sweep_equal_one_process(runs):
    for key, value in runs[1]["faithfulness"].items():
        assert runs[2]["faithfulness"][key] == pytest.approx(value, abs=1e-5), key
    assert runs[1]["edit"]["candidates"].sum() > 0
    for key in ("successes", "candidates"):
        assert torch.equal(runs[2]["edit"][key], runs[1]["edit"][key])


def test_a_failure_on_one_rank_stops_every_rank(tmp_path):
    """Item 3 fails on rank 1: both ranks stop at the next exchange (no hang); rank 1 raises its
    own error, rank 0 one naming rank 1 and is the only one to print it."""
    base = tmp_path / "fail"
    done = torchrun(2, str(WORKER), str(base), "fail", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = {r: Path(f"{base}.rank{r}").read_text() for r in (0, 1)}
    assert seen[0] == "RankFailed: rank 1: ValueError: item 3 is broken | report=True"
    assert seen[1] == "LmscopeError: rank 1: ValueError: item 3 is broken | report=False"


def test_bad_input_under_torchrun_is_one_line(tmp_path):
    """An out-of-range site found after loading, on both ranks: one error line, exit code 2 from
    each process (torchrun then reports the failed processes), no hang, no results written."""
    out = tmp_path / "bad"
    args = ["-m", "lmscope", "outliers", "--tokens", "256", "--window", "128", "--site", "blocks.99.resid_post"]
    done = torchrun(2, *args, "--out", str(out), timeout=180)
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert lines == ["error: site 'blocks.99.resid_post': layer 99 out of range (model has 30 layers)"]
    assert "exitcode  : 2" in done.stderr or "exitcode: 2" in done.stderr.replace(" ", "")
    assert not (out / "results.json").exists()


def test_cli_under_torchrun_rank0_writes_the_one_process_numbers(tmp_path):
    """``torchrun -m lmscope outliers``: one results.json, written by rank 0, with the numbers
    of one process; tables printed once."""
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        args = ["-m", "lmscope", "outliers", "--tokens", "1024", "--window", "128", "--out", str(out)]
        done = torchrun(nproc, *args)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("OSP excess kurtosis") == 1
        outs[nproc] = read_results(out)
    assert outs[2]["processes"] == 2 and outs[1]["processes"] == 1
    assert outs[2]["parts"]["outliers"] == outs[1]["parts"]["outliers"]
    assert not list((tmp_path / "n2").glob("*.tmp"))

"""Training under torchrun (gloo on the CPU): the harvest split over two ranks gives the weights
one process trains, bit for bit, and the evaluation split over them the same numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.core.test_distributed import torchrun

WORKER = Path(__file__).with_name("dist_train_worker.py")


def test_two_ranks_train_what_one_trains(tmp_path):
    runs = {}
    for nproc in (1, 2):
        path = tmp_path / f"n{nproc}.pt"
        done = torchrun(nproc, str(WORKER), str(path))
        assert done.returncode == 0, done.stderr[-3000:]
        runs[nproc] = torch.load(path, weights_only=False)
    assert runs[1]["world_size"] == 1 and runs[2]["world_size"] == 2
    assert runs[1]["steps"] == runs[2]["steps"] > 0
    for name, weights in runs[1]["weights"].items():
        assert torch.equal(weights, runs[2]["weights"][name]), name
    for key, value in runs[1]["metrics"].items():
        assert runs[2]["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key

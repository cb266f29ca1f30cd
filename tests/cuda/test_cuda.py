"""The analyses on a GPU give the CPU's numbers (float32, to kernel rounding) and the plain
bfloat16 forward's (bitwise); memory is measured by the CUDA allocator; two GPUs, or two NCCL
processes, give one GPU's numbers. Skipped without CUDA (see conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmscope
from lmscope.circuits.attribution import attribute
from lmscope.circuits.edges import edge_attribution
from lmscope.circuits.pairs import tokenize_pairs
from lmscope.circuits.patching import activation_patching
from lmscope.circuits.tasks import pairs_for
from lmscope.core.memory import PeakMemory
from lmscope.core.corpus import load_corpus
from lmscope.quant.outliers import activation_stats

ROOT = Path(__file__).resolve().parents[2]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.fixture(scope="module")
def gpu() -> lmscope.Model:
    return lmscope.load("smollm2-135m", device="cuda")


@pytest.fixture(scope="module")
def pairs(smollm2):
    return tokenize_pairs(smollm2, pairs_for(smollm2, None, "ioi", 4))


def test_bfloat16_capture_is_the_plain_forward():
    model = lmscope.load("smollm2-135m", device="cuda", dtype="bfloat16")
    ids = model.tokenizer(["The capital of France is"], return_tensors="pt").to("cuda")
    with torch.no_grad():
        plain = model.hf(**ids)
    run = model.run(ids["input_ids"], capture=["blocks.3.resid_post"])
    assert torch.equal(run.logits, plain.logits) and run.cache["blocks.3.resid_post"].dtype == torch.bfloat16


def test_patching_and_gradients_equal_the_cpu(gpu, smollm2, pairs):
    a, b = activation_patching(smollm2, pairs).scores, activation_patching(gpu, pairs).scores
    torch.testing.assert_close(b.cpu(), a, rtol=0, atol=2e-3)
    a, b = (attribute(m, pairs, "eap-ig", steps=5).scores.cpu() for m in (smollm2, gpu))
    torch.testing.assert_close(b, a, rtol=0, atol=2e-3)
    a, b = (edge_attribution(m, pairs[:2], steps=3).scores.cpu() for m in (smollm2, gpu))
    torch.testing.assert_close(b, a, rtol=0, atol=2e-3)


def test_statistics_equal_the_cpu(gpu, smollm2):
    corpus = load_corpus(smollm2, "wikitext2", max_tokens=1024)
    a, b = (activation_stats(m, corpus, window=256) for m in (smollm2, gpu))
    assert a.n_tokens == b.n_tokens
    assert b.osp_kurtosis == pytest.approx(a.osp_kurtosis, rel=1e-3)


def test_peak_memory_is_the_allocators():
    with PeakMemory("cuda") as peak:
        x = torch.ones(25_000_000, device="cuda")  # 100 MB
        del x
    assert 1e8 <= peak.peak < 1.1e8


def test_a_smaller_budget_lowers_gpu_peak_memory(gpu, pairs):
    peaks = []
    for budget in (1, 10**12):
        with PeakMemory(gpu.device) as peak:
            edge_attribution(gpu, pairs[:1], steps=16, max_memory=budget)
        peaks.append(peak.peak)
    assert peaks[0] < 0.6 * peaks[1]


@two_gpus
def test_model_over_two_gpus_equals_one(gpu, pairs):
    split = lmscope.load("smollm2-135m", device_map="auto", max_memory={0: "150MB", 1: "10GB"})
    assert {str(d) for d in split.hf.hf_device_map.values()} >= {"0", "1"}
    a, b = (edge_attribution(m, pairs[:2], steps=3).scores.cpu() for m in (gpu, split))
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


@two_gpus
def test_two_nccl_processes_equal_one(tmp_path):
    env = {**os.environ, "LMSCOPE_QUIET": "1"}
    outs = []
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        args = [
            "-m",
            "lmscope",
            "outliers",
            "--device",
            "cuda",
            "--tokens",
            "2048",
            "--window",
            "256",
            "--out",
            str(out),
        ]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
        done = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outs.append((out / "results.json").read_text())
    import json

    a, b = (json.loads(text)["parts"]["outliers"] for text in outs)
    assert a == b

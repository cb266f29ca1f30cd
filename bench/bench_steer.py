"""Steering sweep: settings as batch rows (``sweep``) against the naive loop (one run per setting
and text, ``batched=False``), side by side in one run on the same inputs; checks that the two
give the same table and prints the speed-up (target >= 5x).

Default: SmolLM2-135M, the sentiment pairs and evaluation prompts of ``examples/steering``, 5
layers x 4 coefficients = 20 settings, the bundled neutral prompts and 2 WikiText-2 windows of 64
tokens, float32, on CUDA when available.

    python bench/bench_steer.py [--model smollm2-135m] [--items 8] [--layers 6,9,12,15,18] [--coeffs 1,2,4,8]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import lmscope
from lmscope.core.corpus import load_corpus
from lmscope.steering.directions import load_examples
from lmscope.steering.steer import Setting, SweepData, load_eval, neutral_prompts, steering_vectors, sweep

DATA = Path(__file__).resolve().parents[1] / "examples" / "steering"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--layers", default="6,9,12,15,18")
    ap.add_argument("--coeffs", default="1,2,4,8")
    ap.add_argument("--windows", type=int, default=2)
    args = ap.parse_args()
    m = lmscope.load(args.model, device="cuda" if torch.cuda.is_available() else "cpu")
    layers = [int(x) for x in args.layers.split(",")]
    vectors = steering_vectors(m, load_examples(DATA / "sentiment_pairs.jsonl"), layers)
    settings = [Setting((layer,), float(c)) for layer in layers for c in args.coeffs.split(",")]
    windows = load_corpus(m, "wikitext2", max_tokens=64 * args.windows).windows(64)
    data = SweepData(
        load_eval(DATA / "sentiment_eval.jsonl")[: args.items], neutral_prompts()[:4], [w.tolist() for w in windows]
    )
    kw = {"instruction": "The following text is very positive.\n", "samples": 0}
    times, results = {}, {}
    for name, batched in (("batched", True), ("naive", False)):
        start = time.perf_counter()
        results[name] = sweep(m, vectors, settings, data, batched=batched, **kw)
        times[name] = time.perf_counter() - start
    worst = max(
        abs(a[k] - b[k]) / max(abs(b[k]), 1e-6)
        for a, b in zip(results["batched"].rows, results["naive"].rows, strict=True)
        for k in ("behaviour", "kl", "perplexity")
    )
    print(
        f"{m.name} on {m.device}: {len(settings)} settings, {len(data.items)} items, {len(data.neutral)} neutral, {len(data.windows)} windows"
    )
    print(
        f"batched {times['batched']:.2f} s, naive loop {times['naive']:.2f} s: speed-up {times['naive'] / times['batched']:.1f}x"
    )
    print(
        f"largest relative difference between the two tables: {worst:.2e}"
        + (" (same numbers)" if worst < 1e-3 else " (DIFFERENT)")
    )
    assert math.isfinite(worst)


if __name__ == "__main__":
    main()

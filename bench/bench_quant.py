"""Side-by-side throughput of the quantisation diagnostics against the plain forward.

On SmolLM2-135M (float32, CPU) and the first ``--tokens`` tokens of the bundled WikiText-2
test split, cut into windows of 512 tokens in batches of 4, measures tokens per second of:

  plain        ``m.hf(input_ids=batch, use_cache=False)`` over every batch, under no_grad
  stats        ``activation_stats`` (moments, max, histogram, top-k and OSP kurtosis of the
               32 residual hidden states, streamed)
  ppl fp       ``perplexity`` at full precision
  ppl K4V2     ``perplexity`` with the KV cache fake-quantised to 4-bit keys, 2-bit values
               (per token, groups of 64)

The four run round-robin (order rotated every round) after one warm-up round, and the
median of ``--repeats`` rounds is reported with the ratios to plain. Targets (issue 4):
stats >= 0.9x plain, quantised-KV perplexity >= 0.8x plain.

Run from the project root:  python bench/bench_quant.py [--tokens N] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("LMSCOPE_QUIET", "1")

import torch

import lmscope
from lmscope.quant.configs import QuantConfig, parse_kv
from lmscope.core.corpus import load_corpus
from lmscope.quant.evaluation import perplexity
from lmscope.quant.outliers import activation_stats

WINDOW, BATCH = 512, 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    m = lmscope.load()
    corpus = load_corpus(m, max_tokens=args.tokens)
    n = corpus.windows(WINDOW).numel()
    k4v2 = QuantConfig(parse_kv("k4v2"))

    def plain() -> None:
        with torch.no_grad():
            for batch in corpus.batches(WINDOW, BATCH):
                m.hf(input_ids=batch, use_cache=False)

    methods = {
        "plain": plain,
        "stats": lambda: activation_stats(m, corpus, window=WINDOW, batch_size=BATCH),
        "ppl fp": lambda: perplexity(m, corpus, window=WINDOW, batch_size=BATCH),
        "ppl K4V2": lambda: perplexity(m, corpus, window=WINDOW, batch_size=BATCH, config=k4v2),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for round_ in range(args.repeats + 1):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            start = time.perf_counter()
            methods[name]()
            if round_ > 0:  # round 0 warms up
                times[name].append(time.perf_counter() - start)

    print(f"SmolLM2-135M, {n} tokens (windows of {WINDOW}, batches of {BATCH}), median of {args.repeats} rounds")
    base = statistics.median(times["plain"])
    for name in names:
        t = statistics.median(times[name])
        print(f"  {name:9s} {t:7.2f} s  {n / t:8.0f} tokens/s  ratio to plain {base / t:.3f}")
    stats_ratio = base / statistics.median(times["stats"])
    quant_ratio = base / statistics.median(times["ppl K4V2"])
    print(f"stats / plain throughput = {stats_ratio:.3f} (target >= 0.9)")
    print(f"K4V2 perplexity / plain throughput = {quant_ratio:.3f} (target >= 0.8)")
    return 0 if stats_ratio >= 0.9 and quant_ratio >= 0.8 else 1


if __name__ == "__main__":
    raise SystemExit(main())

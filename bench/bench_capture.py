"""Side-by-side cost of capturing activations: plain Hugging Face vs lmscope vs nnsight.

On SmolLM2-135M (float32, CPU) with a batch of 8 windows of 128 wikitext-2 test tokens,
times one forward pass three ways:

  plain    ``m.hf(input_ids=..., attention_mask=..., use_cache=False)`` under no_grad
  lmscope  ``m.run(ids, capture=...)`` capturing every ``blocks.{L}.resid_post`` and
           ``blocks.{L}.attn.z`` (60 sites)
  nnsight  a ``TransformersModel`` wrapping the same HF module, saving each decoder
           layer's output and each ``o_proj`` input (the same 60 tensors)

Before timing it checks that nnsight's tensors equal lmscope's and that lmscope's
logits equal the plain forward's bitwise (exit code 1 if not). Then it runs 2 warm-up
rounds and ``--repeats`` timed rounds, the methods round-robin (rotating the order each
round) so drift in machine load hits all three alike, and prints the median seconds
and the ratio to plain.

Run from the project root:  python bench/bench_capture.py [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("LMSCOPE_QUIET", "1")

import torch
from torch import Tensor

import lmscope

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/wikitext-2/test.txt"
BATCH, SEQ, WARMUP = 8, 128, 2


def windows(m: lmscope.Model) -> Tensor:
    """BATCH windows of SEQ tokens, spread evenly over the wikitext-2 test set."""
    text = DATA.read_text(encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sequence longer than the model's maximum"
        tokens = torch.tensor(m.tokenizer(text)["input_ids"])
    stride = (len(tokens) - SEQ) // BATCH
    return torch.stack([tokens[i * stride : i * stride + SEQ] for i in range(BATCH)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    args = parser.parse_args()

    m = lmscope.load()
    ids = windows(m)
    mask = torch.ones_like(ids)
    n = m.n_layers
    sites = [f"blocks.{L}.resid_post" for L in range(n)] + [f"blocks.{L}.attn.z" for L in range(n)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nnsight import TransformersModel  # LanguageModel is a deprecated alias in nnsight 0.8

    lm = TransformersModel(m.hf, tokenizer=m.tokenizer, task="text-generation")

    def plain() -> Tensor:
        with torch.no_grad():
            return m.hf(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def with_lmscope() -> lmscope.RunResult:
        return m.run(ids, capture=sites)

    def with_nnsight() -> tuple[list[Tensor], list[Tensor]]:
        resid: list[Tensor] = []
        z: list[Tensor] = []
        # Module accesses must follow execution order: o_proj (inside the layer) first.
        with torch.no_grad(), lm.trace({"input_ids": ids, "attention_mask": mask}, use_cache=False):
            for L in range(n):
                z.append(lm.model.layers[L].self_attn.o_proj.input.save())
                resid.append(lm.model.layers[L].output.save())
        return resid, z

    # -- correctness, once --------------------------------------------------------
    ref = plain()
    run = with_lmscope()
    resid, z = with_nnsight()
    checks = {
        "lmscope logits == plain logits (torch.equal)": torch.equal(run.logits, ref),
        "nnsight resid_post == lmscope (allclose, 30 layers)": all(
            torch.allclose(resid[L], run.cache[f"blocks.{L}.resid_post"]) for L in range(n)
        ),
        "nnsight attn.z == lmscope (allclose, 30 layers)": all(
            torch.allclose(z[L], run.cache[f"blocks.{L}.attn.z"].reshape(BATCH, SEQ, -1)) for L in range(n)
        ),
    }
    for name, ok in checks.items():
        print(f"check {'ok  ' if ok else 'FAIL'} {name}")
    if not all(checks.values()):
        return 1
    del ref, run, resid, z

    # -- timing ---------------------------------------------------------------------
    methods: dict[str, Callable[[], object]] = {"plain": plain, "lmscope": with_lmscope, "nnsight": with_nnsight}
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    load_before = os.getloadavg()[0]
    for i in range(WARMUP + args.repeats):
        for name in names[i % 3 :] + names[: i % 3]:
            start = time.perf_counter()
            methods[name]()
            elapsed = time.perf_counter() - start
            if i >= WARMUP:
                times[name].append(elapsed)

    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"\nSmolLM2-135M, batch {BATCH} x {SEQ} tokens, {len(sites)} sites, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} (after {WARMUP} warm-up)"
    )
    print(
        f"1-min load average: {load_before:.2f} before timing, {os.getloadavg()[0]:.2f} after "
        "(this run adds ~2; more means other processes compete for the 2 cores)"
    )
    print(f"{'method':<10}{'median s':>10}{'min s':>10}{'x plain':>10}")
    for name in names:
        print(f"{name:<10}{median[name]:>10.4f}{min(times[name]):>10.4f}{median[name] / median['plain']:>10.3f}")
    print(f"\nratio lmscope/plain = {median['lmscope'] / median['plain']:.3f} (target <= 1.05)")
    print(f"ratio nnsight/plain = {median['nnsight'] / median['plain']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

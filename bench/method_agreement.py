"""How well do attribution patching and EAP-IG agree with exact activation patching?

On SmolLM2-135M and the three built-in tasks (IOI, induction, capitals), computes every
head's score (all positions, denoising, logit difference) by exact patching, attribution
patching and EAP-IG, and prints the Spearman rank correlation of each approximation with
exact patching over the 270 heads, plus whether each method's top head matches.

Run from the project root:  python bench/method_agreement.py [--pairs N] [--steps S]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("LMSCOPE_QUIET", "1")

import lmscope
from lmscope.circuits import tasks
from lmscope.circuits.attribution import attribute
from lmscope.circuits.patching import activation_patching


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho: Pearson correlation of the ranks (no ties expected in float scores)."""
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def top_head(scores: torch.Tensor) -> tuple[int, int]:
    flat = int(scores.abs().flatten().argmax())
    return divmod(flat, scores.shape[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs per task")
    parser.add_argument("--steps", type=int, default=100, help="EAP-IG steps")
    args = parser.parse_args()
    model = lmscope.load()
    print(
        f"SmolLM2-135M, head scores over {model.n_layers * model.n_heads} heads, {args.pairs} pairs per task, "
        f"EAP-IG {args.steps} steps"
    )
    print(f"{'task':<10} {'method':<12} {'spearman':>9} {'top head':>9} {'exact top':>10} {'seconds':>8}")
    for name in ("ioi", "induction", "capitals"):
        pairs = tasks.tokenize_pairs(model, tasks.GENERATORS[name](model, n=args.pairs))
        t = time.perf_counter()
        exact = activation_patching(model, pairs, "head").scores[:, 0]
        exact_top = top_head(exact)
        print(
            f"{name:<10} {'exact':<12} {1.0:>9.3f} {exact_top!s:>9} {exact_top!s:>10} {time.perf_counter() - t:>8.1f}"
        )
        for method in ("attribution", "eap-ig"):
            t = time.perf_counter()
            approx = attribute(model, pairs, method, "head", steps=args.steps).scores[:, 0]
            print(
                f"{name:<10} {method:<12} {spearman(approx, exact):>9.3f} {top_head(approx)!s:>9} "
                f"{exact_top!s:>10} {time.perf_counter() - t:>8.1f}"
            )


if __name__ == "__main__":
    main()

"""Side-by-side cost of exact activation patching of attention heads: lmscope vs TransformerLens.

On SmolLM2-135M (float32, CPU) with one 13-token IOI pair

  clean    "When Mary and John went to the store, John gave milk to"   answer " Mary"
  corrupt  "When Mary and John went to the store, Mary gave milk to"   wrong  " John"

both tools patch each head's clean ``attn.z`` (the attention output before ``o_proj``,
TransformerLens ``hook_z``) into the corrupted run ("denoising") and score the final-token
logit difference LD = logit[" Mary"] - logit[" John"], normalised as
(LD(patched) - LD(corrupt)) / (LD(clean) - LD(corrupt)):

  all-position  every (layer, head), all positions at once      30 x 9       = 270 patches
  per-position  every (layer, position, head)                    30 x 13 x 9  = 3510 patches

lmscope: ``activation_patching(m, [pair], component="head", per_position=...)``.
TransformerLens 4.x: a ``TransformerBridge`` booted from the same local model directory
(raw HF weights, no compatibility-mode weight processing) and
``transformer_lens.patching.get_act_patch_attn_head_out_all_pos`` / ``..._by_pos`` with a
metric normalised by TransformerLens's own clean and corrupted runs, under ``no_grad``.

It first checks that the bridge's clean logits match lmscope's (TransformerLens forces eager
attention, lmscope keeps SDPA, so they differ by float rounding), then times lmscope
(median of ``--repeats`` after 1 warm-up) and TransformerLens (faster of 2 runs all-position,
1 run per-position: about 25 s and several minutes), and compares the scores. Exit code 1
if any score differs by more than 1e-4. Other processes on this 2-core machine disturb
timings; the 1-minute load average is printed before and after.

Run from the project root:  python bench/bench_patching.py [--repeats N] [--skip-per-position]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import TypeVar

os.environ.setdefault("LMSCOPE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's per-patch and HF's loading bars

import torch
from torch import Tensor

import lmscope
from lmscope.circuits import tasks
from lmscope.circuits.patching import activation_patching
from lmscope.circuits.scores import PatchResult

CLEAN = "When Mary and John went to the store, John gave milk to"
CORRUPT = "When Mary and John went to the store, Mary gave milk to"
ANSWER, WRONG = " Mary", " John"
N_TOKENS, TOL = 13, 1e-4

T = TypeVar("T")


def timed(fn: Callable[[], T], runs: int, stat: Callable[[list[float]], float]) -> tuple[float, T]:
    """``stat`` of the wall-clock seconds of ``runs`` calls, and the last call's result."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return stat(times), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed lmscope runs (default 3)")
    parser.add_argument("--skip-per-position", action="store_true", help="all-position patching only")
    args = parser.parse_args()

    from transformer_lens import patching as tl_patching
    from transformer_lens.model_bridge import TransformerBridge

    m = lmscope.load()
    (tp,) = tasks.tokenize_pairs(m, [tasks.PromptPair(CLEAN, CORRUPT, (ANSWER,), (WRONG,))])
    assert len(tp.clean) == len(tp.corrupt) == N_TOKENS, (len(tp.clean), len(tp.corrupt))
    clean_tokens, corrupt_tokens = tp.clean[None], tp.corrupt[None]  # [1, 13], shared by both tools
    answer, wrong = int(tp.answer[0]), int(tp.wrong[0])

    bridge = TransformerBridge.boot_transformers(m.source, device="cpu", dtype=torch.float32)
    bridge.eval()

    def logit_diff(logits: Tensor) -> Tensor:
        return logits[0, -1, answer] - logits[0, -1, wrong]

    # -- correctness of the two forwards, once --------------------------------------
    with torch.no_grad():
        tl_clean_logits, tl_clean_cache = bridge.run_with_cache(clean_tokens)
        tl_corrupt_logits = bridge(corrupt_tokens)
    logits_diff = (tl_clean_logits - m.run(clean_tokens).logits).abs().max().item()
    print(f"clean logits, TransformerLens bridge vs lmscope: max |diff| {logits_diff:.1e} (tolerance {TOL:g})")
    tl_clean, tl_corrupt = logit_diff(tl_clean_logits).item(), logit_diff(tl_corrupt_logits).item()

    def metric(logits: Tensor) -> Tensor:
        return (logit_diff(logits) - tl_corrupt) / (tl_clean - tl_corrupt)

    def tl_all_pos() -> Tensor:
        with torch.no_grad():
            return tl_patching.get_act_patch_attn_head_out_all_pos(bridge, corrupt_tokens, tl_clean_cache, metric)

    def tl_by_pos() -> Tensor:
        with torch.no_grad():
            return tl_patching.get_act_patch_attn_head_out_by_pos(bridge, corrupt_tokens, tl_clean_cache, metric)

    def ls(per_position: bool) -> Callable[[], PatchResult]:
        return lambda: activation_patching(m, [tp], component="head", per_position=per_position)

    # -- timing -----------------------------------------------------------------------
    load_before = os.getloadavg()[0]
    ls(False)()  # warm-up
    ls_all_s, ls_all = timed(ls(False), args.repeats, statistics.median)
    tl_all_s, tl_all = timed(tl_all_pos, 2, min)
    rows = [("all-position", ls_all_s, tl_all_s, (ls_all.scores[:, 0] - tl_all).abs().max().item(), 25)]
    if not args.skip_per_position:
        ls_pos_s, ls_pos = timed(ls(True), args.repeats, statistics.median)
        tl_pos_s, tl_pos = timed(tl_by_pos, 1, min)
        rows.append(("per-position", ls_pos_s, tl_pos_s, (ls_pos.scores - tl_pos).abs().max().item(), 100))
    load_after = os.getloadavg()[0]

    # -- report -----------------------------------------------------------------------
    print(
        f"\nSmolLM2-135M, 1 IOI pair of {N_TOKENS} tokens, {m.n_layers} layers x {m.n_heads} heads, "
        f"{torch.get_num_threads()} threads; lmscope median of {args.repeats} (after 1 warm-up), "
        "TransformerLens faster of 2 (all-position) / 1 run (per-position)"
    )
    print(
        f"logit difference clean / corrupt: lmscope {ls_all.clean:.4f} / {ls_all.corrupt:.4f}, "
        f"TransformerLens {tl_clean:.4f} / {tl_corrupt:.4f}"
    )
    print(
        f"1-min load average: {load_before:.2f} before timing, {load_after:.2f} after "
        "(this run adds ~1-2; more means other processes compete for the 2 cores)"
    )
    print(f"\n{'heads':<14}{'patches':>8}{'lmscope s':>11}{'TL s':>10}{'speed-up':>10}{'max |diff|':>12}")
    for name, ls_s, tl_s, diff, _ in rows:
        patches = m.n_layers * m.n_heads * (N_TOKENS if name == "per-position" else 1)
        print(f"{name:<14}{patches:>8}{ls_s:>11.3f}{tl_s:>10.1f}{tl_s / ls_s:>10.1f}{diff:>12.1e}")
    print()
    for name, ls_s, tl_s, diff, target in rows:
        digits = 1 if name == "all-position" else 0  # TL ~25 s vs several minutes
        print(
            f"{name} heads: lmscope {ls_s:.2f} s, TransformerLens {tl_s:.{digits}f} s, "
            f"speed-up {tl_s / ls_s:.{digits}f} (target >= {target}), max |diff| {diff:.1e}"
        )

    ok = logits_diff <= TOL and all(diff <= TOL for *_, diff, _ in rows)
    print(f"\n{'ok: logits and scores agree' if ok else 'FAIL: a difference exceeds'} within {TOL:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

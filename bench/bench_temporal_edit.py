"""Temporal knowledge editing through head values (Park et al., ACL 2025, notebook 7): fast sweep vs naive loop.

On SmolLM2-135M (float32, CPU) with the paper's experiments (``lmscope/data/temporalhead_edits.jsonl``:
5 source/target pairs x coefficients 1, 3, 6), every (layer, head) is edited: ``coeff`` x the mean
over the source prompt of the head's value vector (its KV head, ``blocks.L.attn.v``) is added to
the target's value at the last token of the year phrase, during the prompt pass. A head is a
candidate when the first generated token changes, and succeeds when the trigger word appears in
the text after 50 generated tokens.

- naive: the notebook's loop with lmscope's public API: per experiment, one capture of the
  source's values, then per (layer, head) one full forward of the target with a plain
  ``lmscope.apply`` intervention on ``blocks.L.attn.v`` at the position (first token: argmax, or
  with ``--sample`` ``model.generate`` of 1 token after ``torch.manual_seed(seed)``), then for
  every candidate head ``model.generate`` of 50 tokens with that intervention;
- fast: ``lmscope.temporal.edit.temporal_edit``: edits screened as batch rows from the cached
  target prefix (experiments sharing a target share it), one edit per layer and KV head, each
  starting at its layer; then the candidates generate as rows of one batch.

The candidate and success sets of every experiment must be IDENTICAL (exit code 1 if not).
Timings are single runs (the naive loop takes minutes); other processes on this 2-core machine
disturb them, so the 1-minute load average is printed before and after.

``--experiments N`` takes the first N experiments pair by pair (pair 1 at coefficients 1, 3, 6,
then pair 2, ...; default 3, i.e. the first pair); ``--experiments 15`` runs all of them.

Run from the project root:  python bench/bench_temporal_edit.py [--experiments N] [--sample] [--seed S]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("LMSCOPE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import Tensor

import lmscope
from lmscope.temporal.edit import EditExperiment, default_experiments, phrase_position, temporal_edit, token_ids

Heads = set[tuple[int, int]]


def pair_major(experiments: list[EditExperiment]) -> list[EditExperiment]:
    """The experiments ordered by (source, target) pair first, coefficient second (file order within)."""
    order: dict[tuple, int] = {}
    for e in experiments:
        order.setdefault((e.source, e.target), len(order))
    return sorted(experiments, key=lambda e: order[e.source, e.target])


def naive(m: lmscope.Model, e: EditExperiment, sample: bool, seed: int, new_tokens: int) -> tuple[Heads, Heads]:
    """The notebook's loop: one forward per (layer, head) for the candidates, one generation each."""
    tok = m.tokenizer
    ids = torch.tensor([token_ids(m, e.target)])
    position = phrase_position(m, e.target, e.phrase)
    if position < 0:
        return set(), set()
    sites = [f"blocks.{layer}.attn.v" for layer in range(m.n_layers)]
    source = m.run(torch.tensor([token_ids(m, e.source)]), capture=sites, logits=False).cache
    group = m.n_heads // m.n_kv_heads
    sampling = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0} if sample else {}

    def edit(layer: int, head: int) -> lmscope.Intervention:
        mean = source[f"blocks.{layer}.attn.v"][0, :, head // group].mean(0)  # [d_head]
        return lmscope.apply(
            f"blocks.{layer}.attn.v", lambda v, d=e.coeff * mean: v + d, positions=[position], head=head // group
        )

    def first(interventions: list) -> str:
        if sample:
            torch.manual_seed(seed)
            token = m.generate(ids, interventions, max_new_tokens=1, **sampling).ids[0, -1]
        else:
            token = m.run(ids, interventions=interventions).logits[0, -1].argmax()
        return tok.decode([int(token)], clean_up_tokenization_spaces=False).strip()

    baseline = first([])
    candidates = {
        (layer, head)
        for layer in range(m.n_layers)
        for head in range(m.n_heads)
        if first([edit(layer, head)]) != baseline
    }
    successes = set()
    for layer, head in sorted(candidates):
        if sample:
            torch.manual_seed(seed)
        out: Tensor = m.generate(ids, [edit(layer, head)], max_new_tokens=new_tokens, **sampling).ids[0]
        if e.trigger in tok.decode(out.tolist(), clean_up_tokenization_spaces=False):
            successes.add((layer, head))
    return candidates, successes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=3, help="first N experiments, pair by pair (default 3)")
    parser.add_argument("--sample", action="store_true", help="sample (temperature 1) instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=42, help="seed reset before each generation (default 42)")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="success window (default 50)")
    args = parser.parse_args()

    m = lmscope.load()
    experiments = pair_major(default_experiments())[: args.experiments]
    torch.set_grad_enabled(False)

    mode = f"sampling (temperature 1, seed {args.seed})" if args.sample else "greedy"
    print(
        f"SmolLM2-135M, {len(experiments)} experiments x {m.n_layers} layers x {m.n_heads} heads "
        f"({m.n_kv_heads} KV heads), {mode}, {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads",
        flush=True,
    )
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    fast = temporal_edit(m, experiments, sample=args.sample, seed=args.seed, max_new_tokens=args.max_new_tokens)
    fast_s = time.perf_counter() - start
    print(f"fast sweep: {fast_s:.1f} s; naive loop, experiment by experiment:\n", flush=True)
    print(f"{'#':>3} {'coeff':>5}  {'target':<52}{'candidates':>11}{'successes':>10}{'naive s':>9}  same sets")
    ok, naive_s = True, 0.0
    for i, (e, outcome) in enumerate(zip(experiments, fast.outcomes)):
        start = time.perf_counter()
        cands, succ = naive(m, e, args.sample, args.seed, args.max_new_tokens)
        seconds = time.perf_counter() - start
        naive_s += seconds
        same = set(outcome.candidates) == cands and set(outcome.successes) == succ
        ok &= same
        row = f"{i:>3} {e.coeff:>5g}  {e.target:<52}{len(cands):>11}{len(succ):>10}{seconds:>9.1f}  {'yes' if same else 'NO'}"
        print(row, flush=True)
        if not same:
            print(f"      fast candidates {sorted(outcome.candidates)} successes {sorted(outcome.successes)}")
            print(f"      naive candidates {sorted(cands)} successes {sorted(succ)}")
    load_after = os.getloadavg()[0]
    print(f"\n1-min load average: {load_before:.2f} before, {load_after:.2f} after (the 2 cores are shared)")
    print(f"heads that succeeded: {fast.text()}")
    print(f"naive loop {naive_s:.1f} s, fast sweep {fast_s:.1f} s: speed-up {naive_s / fast_s:.1f}x (target >= 10)")
    print("ok: candidate and success sets identical" if ok else "FAIL: the candidate or success sets differ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

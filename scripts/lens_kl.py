"""Tuned lens vs logit lens on a real model: train a tuned lens (Belrose et al. 2023) on the
WikiText-2 test split, then report per layer the mean KL(p_final || p_lens) on held-out
WikiText-2 test tokens (the first --eval-tokens, not trained on) for both lenses, and whether the tuned lens is below the logit lens at
every middle layer (issue 13's ground truth on SmolLM2).

    python scripts/lens_kl.py [--model smollm2-135m] [--steps 60] [--train-tokens 16384] [--eval-tokens 2048]
"""

from __future__ import annotations

import argparse

import torch

import lmscope
from lmscope.core.corpus import load_corpus
from lmscope.readout import TunedLens, kl_to_final, resid_sites, train_tuned_lens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    args = ap.parse_args()
    m = lmscope.load(args.model)
    ids = load_corpus(m, "wikitext2", max_tokens=args.train_tokens + args.eval_tokens).tokens
    held, train = ids[: args.eval_tokens], ids[args.eval_tokens :]  # disjoint: evaluate on the first tokens
    tuned = train_tuned_lens(m, train, steps=args.steps, lr=args.lr)
    logit = TunedLens.identity(m)
    sites = resid_sites(m)
    kl = {"logit": torch.zeros(len(sites)), "tuned": torch.zeros(len(sites))}
    windows = held.unfold(0, 128, 128)
    with torch.no_grad():
        for ids in windows.split(4):
            run = m.run(ids, capture=sites)
            for name, lens in (("logit", logit), ("tuned", tuned)):
                for i, site in enumerate(sites):
                    logits = m.unembed(lens.translators(i, run.cache[site]).to(m.hf.dtype)).float()
                    kl[name][i] += kl_to_final(logits, run.logits).mean() * len(ids) / len(windows)
    labels = ["embed", *map(str, range(m.n_layers))]
    print(f"{m.name}: tuned lens {args.steps} steps on {len(train)} tokens; KL on {windows.numel()} held-out tokens")
    print("| stream | logit lens KL | tuned lens KL |\n|---|---|---|")
    for i, label in enumerate(labels):
        print(f"| {label} | {kl['logit'][i]:.3f} | {kl['tuned'][i]:.3f} |")
    middle = range(1 + m.n_layers // 4, 1 + 3 * m.n_layers // 4)
    below = all(kl["tuned"][i] < kl["logit"][i] for i in middle)
    print(f"tuned below logit at every middle layer ({middle.start - 1}..{middle.stop - 2}): {below}")


if __name__ == "__main__":
    main()

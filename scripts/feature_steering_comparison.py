"""Steering one concept (positive sentiment) on SmolLM2 with three directions at matched KL:
an SNMF feature of ``blocks.L.mlp.post`` (Shafran et al. 2025), the difference of means of
contrastive pairs at ``blocks.L.resid_post`` (contrastive activation addition), and a feature of a
TopK sparse autoencoder at ``blocks.L.resid_post``, all through ``lmscope steer``'s evaluated sweep
(behaviour on evaluation prompts, KL on neutral prompts, WikiText-2 perplexity, prompting baseline),
each method's coefficient calibrated by bisection so its mean neutral KL is ``--kl``.

1. one pass over WikiText-2 windows and the concept's example sentences captures ``mlp.post`` and
   ``resid_post`` of layer L;
2. SNMF of the ``mlp.post`` activations (:func:`lmscope.features.snmf.fit_snmf`), written as
   ``snmf.safetensors``;
3. a quick TopK SAE on the ``resid_post`` activations (Adam on the reconstruction error, unit-norm
   decoder rows, b_dec from the mean; a stand-in until ``lmscope features train`` lands), written
   in SAELens's format;
4. the SNMF and SAE features most selective for the concept: the largest effect size (mean
   difference over pooled standard deviation) between the positive and negative examples' last
   tokens, of the SNMF coefficients ``a @ F_j / ||F_j||^2`` and of the SAE's encodings;
5. ``lmscope steer --layers L --vectors snmf.safetensors#j --vectors sae#k --match-kl KL``,
   run through :func:`lmscope.steering.commands.run_steer`; the table is printed and written to
   ``comparison.md``, and the SAE's dashboard to ``sae_dashboard/dashboard.html``.

    nice python scripts/feature_steering_comparison.py [--out out/feature_steering] [--kl 0.1]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import lmscope
from lmscope.core.corpus import load_corpus
from lmscope.features import Dictionary, save_dictionary
from lmscope.features.show import ShowSettings, run_show
from lmscope.features.snmf import fit_snmf, save_snmf, top_tokens
from lmscope.features.vocab import token_texts
from lmscope.reports.command import RunWriter
from lmscope.steering.commands import SteerSettings, run_steer

NOUNS = ["movie", "meal", "concert", "hotel", "book", "trip", "game", "party", "service", "show", "class", "visit"]
POSITIVE = ["wonderful", "great", "amazing", "delightful", "excellent", "lovely", "fantastic", "brilliant"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "disappointing", "miserable", "boring", "dreadful"]
EVAL = [
    ("My honest opinion of the restaurant is that it was", " great", " terrible"),
    ("After the long weekend, I would describe the whole experience as", " wonderful", " awful"),
    ("When my friends asked about the film, I told them it was", " amazing", " boring"),
    ("Looking back on the vacation, everything about it felt", " perfect", " miserable"),
    ("The new album came out yesterday, and honestly it sounds", " fantastic", " awful"),
    ("I tried the new coffee shop this morning and the coffee was", " excellent", " disappointing"),
    ("Our neighbours threw a party last night; it was", " lovely", " dreadful"),
    ("The teacher read my essay and said it was", " brilliant", " terrible"),
]
INSTRUCTION = "Write with a very positive, happy and enthusiastic tone. "


def write_data(folder: Path) -> tuple[Path, Path, list[str], list[str]]:
    """Contrastive pairs (the same sentence ending in a positive or a negative word) and
    evaluation items; returns their paths and the positive and negative texts."""
    pos, neg = [], []
    for i, noun in enumerate(NOUNS):
        for j in range(2):
            k = (i + j * 5) % len(POSITIVE)
            pos.append(f"I have to say the {noun} was {POSITIVE[k]}")
            neg.append(f"I have to say the {noun} was {NEGATIVE[k]}")
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"positive": p, "negative": n}) + "\n" for p, n in zip(pos, neg, strict=True)))
    items = folder / "eval.jsonl"
    items.write_text("".join(json.dumps({"prompt": p, "target": t, "opposite": o}) + "\n" for p, t, o in EVAL))
    return pairs, items, pos, neg


def harvest(model, layer: int, texts: list[str], tokens: int, window: int = 128) -> dict[str, torch.Tensor]:
    """``mlp.post`` and ``resid_post`` of ``layer`` over ``tokens`` WikiText-2 tokens (each window's first
    token left out), and the last-token activations of ``texts``."""
    sites = [f"blocks.{layer}.mlp.post", f"blocks.{layer}.resid_post"]
    windows = load_corpus(model, "wikitext2", max_tokens=tokens + tokens // (window - 1) + window).windows(window)
    corpus = {s: [] for s in sites}
    with torch.no_grad():
        for batch in windows.split(8):
            cache = model.run(batch, sites, logits=False, stop_after=layer).cache
            for s in sites:
                corpus[s].append(cache[s][:, 1:].flatten(0, 1).float())
        last = {s: [] for s in sites}
        for text in texts:
            cache = model.run(text, sites, logits=False, stop_after=layer).cache
            for s in sites:
                last[s].append(cache[s][0, -1].float())
    out = {f"corpus:{s}": torch.cat(v)[:tokens] for s, v in corpus.items()}
    out |= {f"last:{s}": torch.stack(v) for s, v in last.items()}
    out["ids"] = windows[:, 1:].flatten()[:tokens]
    return out


def train_topk(x: torch.Tensor, d_sae: int, k: int, steps: int, site: str, seed: int = 0) -> Dictionary:
    """A TopK sparse autoencoder fitted to ``x`` [n, d] (a minimal stand-in for ``lmscope features
    train``): inputs scaled to mean norm sqrt(d) (SAELens's normalisation, folded back into the
    weights at the end), b_dec initialised to their mean, W_enc = W_dec^T with unit decoder rows at
    the start, Adam on the fraction of variance unexplained, decoder rows renormalised after each
    step, the learning rate decayed linearly to 0."""
    torch.manual_seed(seed)
    c = float(x.norm(dim=1).mean()) / math.sqrt(x.shape[1])
    x = x / c
    d = Dictionary(x.shape[1], d_sae, "topk", k=k, site=site).init_(seed)
    with torch.no_grad():
        d.W_dec.div_(d.W_dec.norm(dim=1, keepdim=True))
        d.W_enc.copy_(d.W_dec.T)
        d.b_dec.copy_(x.mean(0))
    opt = torch.optim.Adam(d.parameters(), lr=4e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    variance = float(((x - x.mean(0)) ** 2).sum(1).mean())
    for step in range(steps):
        batch = x[torch.randint(len(x), (1024,))]
        loss = ((d(batch) - batch) ** 2).sum(1).mean() / variance
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(d.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d.W_dec.div_(d.W_dec.norm(dim=1, keepdim=True))
        if step % 100 == 0 or step == steps - 1:
            print(f"  SAE step {step}: FVU {loss.item():.3f}")
    with torch.no_grad():  # fold the input scale back: the dictionary reads and writes x itself
        d.W_enc.div_(c)
        d.W_dec.mul_(c)
        d.b_dec.mul_(c)
    return d.requires_grad_(False)


def selective(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> tuple[int, float]:
    """The column with the largest effect size (mean difference over pooled standard deviation)."""
    pooled = ((scores_pos.var(0) + scores_neg.var(0)) / 2).sqrt().clamp_min(1e-6)
    effect = (scores_pos.mean(0) - scores_neg.mean(0)) / pooled
    j = int(effect.argmax())
    return j, float(effect[j])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/feature_steering")
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--kl", type=float, default=0.1)
    ap.add_argument("--tokens", type=int, default=16384, help="WikiText-2 tokens harvested (the SAE's data)")
    ap.add_argument("--snmf-tokens", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=48)
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--sae-steps", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (more than the free cores slows it down)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out, layer, t0 = Path(args.out), args.layer, time.time()
    out.mkdir(parents=True, exist_ok=True)
    model = lmscope.load("smollm2-135m")
    pairs, items, pos, neg = write_data(out)
    mlp, resid = f"blocks.{layer}.mlp.post", f"blocks.{layer}.resid_post"

    print(f"[{time.time() - t0:.0f}s] harvesting {args.tokens} tokens of {mlp} and {resid}")
    acts = harvest(model, layer, pos + neg, args.tokens)
    n = len(pos)

    print(f"[{time.time() - t0:.0f}s] SNMF rank {args.rank} of {args.snmf_tokens} tokens (+ the {2 * n} examples)")
    A = torch.cat([acts[f"corpus:{mlp}"][: args.snmf_tokens], acts[f"last:{mlp}"]]).T
    fit = fit_snmf(A, args.rank, sparsity=0.01, max_iter=300, patience=25)
    print(f"  relative error {fit.error:.4f} at iteration {fit.best} ({fit.stopped})")
    ids = torch.cat([acts["ids"][: args.snmf_tokens], torch.full((2 * n,), -1)])
    save_snmf(out / "snmf.safetensors", fit.F, fit.G, ids, layer=layer, model=model.name)
    coeff = acts[f"last:{mlp}"] @ fit.F / (fit.F**2).sum(0).clamp_min(1e-12)
    j, j_effect = selective(coeff[:n], coeff[n:])
    texts = token_texts(model, acts["ids"][: args.snmf_tokens]) + ["<example>"] * (2 * n)
    snmf_tops = ", ".join(f"{t!r} ({c})" for t, _, c in top_tokens(fit.G[:, j : j + 1], texts, n=8)[0])

    print(f"[{time.time() - t0:.0f}s] TopK SAE d_sae {args.d_sae}, k {args.k}, {args.sae_steps} steps")
    sae = train_topk(acts[f"corpus:{resid}"], args.d_sae, args.k, args.sae_steps, resid)
    save_dictionary(sae, out / "sae", model=model)
    with torch.no_grad():
        x = acts[f"corpus:{resid}"]
        fvu = float(((sae(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        k, k_effect = selective(sae.encode(acts[f"last:{resid}"][:n]), sae.encode(acts[f"last:{resid}"][n:]))
    print(f"  SAE FVU {fvu:.3f}; concept features: SNMF {j} (effect size {j_effect:.2f}), SAE {k} (effect size {k_effect:.2f})")

    print(f"[{time.time() - t0:.0f}s] steer at matched KL {args.kl}")
    settings = SteerSettings(pairs=pairs, eval=items, layers=str(layer), instruction=INSTRUCTION, samples=2,
                             vectors=(f"{out / 'snmf.safetensors'}#{j}", f"{out / 'sae'}#{k}"), match_kl=args.kl,
                             max_kl=10 * args.kl, max_ppl_rise=10.0)  # fmt: skip
    writer = RunWriter(out / "steer", "steer", settings, model=model, overwrite=True)
    result = run_steer(model, settings, writer)
    writer.finish()
    calibration = writer.results["calibration"].rows()

    show = ShowSettings(dict=out / "sae", features=",".join(map(str, dict.fromkeys([k, *range(40)]))), tokens=8192)
    writer_show = RunWriter(out / "sae_dashboard", "features show", show, model=model, overwrite=True)
    run_show(model, show, writer_show)
    writer_show.finish()

    names = {"none": "unsteered", "prompting": "prompting", "vector": f"difference of means ({resid})",
             f"snmf{j}": f"SNMF feature {j} ({mlp})", f"sae{k}": f"SAE feature {k} ({resid})"}  # fmt: skip
    coeffs = {r["method"]: r["coeff"] for r in calibration}
    head = (f"SmolLM2-135M, positive sentiment, layer {layer}, matched KL {args.kl} (neutral prompts); "
            f"SNMF relative error {fit.error:.3f}; SAE FVU {fvu:.3f}; effect sizes SNMF {j_effect:.2f}, SAE {k_effect:.2f}")
    lines = [head, "",
             "| method | coeff | behaviour (log p target - log p opposite) | p(target) | KL | perplexity |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in result.rows:
        name = names.get(row["setting"]) or names.get(row["method"], row["method"])
        c = coeffs.get(row["method"])
        lines.append(f"| {name} | {'' if c is None else f'{c:.4g}'} | {row['behaviour']:+.3f} | "
                     f"{row['p_target']:.3f} | {row['kl']:.4f} | {row['perplexity']:.2f} |")  # fmt: skip
    sae_tops = ", ".join(dict.fromkeys(repr(x.tokens[x.peak]) for x in writer_show.results["dashboard"].cards[0].contexts))
    lines += ["", f"SNMF feature {j}'s top tokens through G: {snmf_tops}",
              f"SAE feature {k}'s top contexts' peak tokens: {sae_tops}", "", f"chosen: {result.chosen}",
              f"({time.time() - t0:.0f} s)"]  # fmt: skip
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for sample in result.samples:
        print(json.dumps(sample, ensure_ascii=False))
    if not math.isfinite(result.rows[0]["behaviour"]):
        raise SystemExit("the sweep produced no numbers")


if __name__ == "__main__":
    main()

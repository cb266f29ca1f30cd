"""Router capture overhead: a forward of a mixture-of-experts model with every layer's router
logits and routing weights captured (``blocks.{L}.moe.router`` and ``blocks.{L}.moe.weights``)
against the same forward with no hooks, measured side by side in one run (interleaved, median
of ``--repeats``), printed as a ratio.

Model: a randomly initialised Mixtral-style config (``--size tiny``: 4 layers, d_model 256,
8 experts, top-2; ``--size large``: 16 layers, d_model 1024, 8 experts), batch ``--batch`` x
``--pos`` tokens, float32, on CUDA when available.

    python bench/bench_router.py [--size tiny|large] [--batch 8] [--pos 256] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers as T

import lmscope

SIZES = {
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8},
    "large": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16, "num_attention_heads": 16},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pos", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = T.MixtralConfig(
        vocab_size=8192, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, **SIZES[args.size]
    )
    hf = T.AutoModelForCausalLM.from_config(config).to(device).eval()
    m = lmscope.Model(hf, None, name=f"mixtral-{args.size}")
    ids = torch.randint(0, config.vocab_size, (args.batch, args.pos), device=device)
    sites = [f"blocks.{i}.moe.{k}" for i in m.layers_with("experts") for k in ("router", "weights")]

    def plain() -> None:
        with torch.no_grad():
            hf(input_ids=ids, use_cache=False)

    def captured() -> None:  # the same call with the routing sites captured
        with torch.no_grad(), m.hooks(capture=sites):
            hf(input_ids=ids, use_cache=False)

    def run() -> None:  # Model.run: also builds the attention mask and position ids
        m.run(ids, capture=sites)

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in (plain, captured, run):  # warm-up
        fn()
    times = {plain: [], captured: [], run: []}
    for _ in range(args.repeats):
        for fn, record in times.items():
            record.append(timed(fn))
    a, b, c = (statistics.median(times[fn]) for fn in (plain, captured, run))
    print(f"device {device}; {m.name}: {m.n_layers} MoE layers, batch {args.batch} x {args.pos} tokens")
    print(f"plain forward {a * 1e3:.1f} ms; with router logits + routing weights captured {b * 1e3:.1f} ms")
    print(f"capture overhead ratio {b / a:.3f} ({(b / a - 1) * 100:+.1f}%)")
    print(f"Model.run with the same capture {c * 1e3:.1f} ms: ratio {c / a:.3f} (mask and position ids included)")


if __name__ == "__main__":
    main()

"""Scaling of two circuit analyses with sequence length and number of prompt pairs.

Prints a Markdown table (ready for the README) of wall time and peak memory for

  exact    exact activation patching of every attention head (``attn.z``), all positions at
           once, denoising, logit difference:
           ``lmscope.circuits.patching.activation_patching(model, pairs, "head")``, what
           ``locate(model, pairs, "exact", "head")`` runs;
  eap-ig   EAP-IG scores of every edge of the graph (input, heads, MLPs, logits):
           ``lmscope.circuits.edges.edge_attribution(model, pairs, "logit_diff", steps=S)``;

over sequence lengths (default 32, 128, 512, 1024 tokens) and numbers of prompt pairs
(default 1, 4, 16). Every cell runs in a fresh child process (this script with ``--cell``,
its result one JSON line on stdout) that loads the model, builds the pairs and runs one
short warm-up forward before measuring, so cells share no allocator high-water mark. Peak
memory is ``lmscope.core.memory.PeakMemory``: on the CPU the resident set size sampled every
2 ms, on CUDA ``max_memory_allocated``, in both cases above what was in use when the
analysis began (the model's weights are not counted).

Pairs have an exact token length: pair i takes WikiText-2 (bundled test set) window i of
``length + 1`` tokens; clean = its first ``length`` tokens, answer = its last token;
corrupt = clean with the token at ``--corrupt-at`` (a fraction of the length, default 0.5)
replaced by the token at that position in window ``n_pairs + i``; wrong answer = that
window's last token. Exact patching recomputes only the positions from the first
difference on, so ``--corrupt-at`` changes its cost (0.0 is the worst case); EAP-IG's cost
does not depend on it.

Models:
  smollm2-135m      ``lmscope.load("smollm2-135m")`` (30 layers, 9 heads, 3 KV heads; default)
  llama-1b-random   a randomly initialised (seed 0) Llama of about 1.07 B parameters: hidden
                    2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocabulary 49152 (SmolLM2's
                    tokenizer, used only to cut the WikiText-2 windows), tied embeddings, built in
                    --dtype directly on the device. Meant for a GPU: on this 2-core CPU a single
                    cell takes many minutes (raise --timeout).

On the CPU the default grid runs the smallest pair count at every length but skips the
cells with more pairs whose pairs x length exceeds --max-pair-tokens (default 512 on the CPU:
it runs 32 tokens x 1, 4, 16 pairs, 128 x 1, 4, 512 x 1 and 1024 x 1, and prints "skipped"
for the rest; no limit on CUDA, where the whole grid runs). At any length, the larger pair
counts of an analysis are skipped after a cell of it timed out. On an idle 2-core CPU the
default run (SmolLM2, float32, 14 cells) should take about 20 minutes (estimated from single
cells: 1024 tokens x 1 pair is about 4.5 min of exact patching and 4 min of EAP-IG; twice that
when other work shares the two cores); each cell also spends about 10 s loading the model.

Run from the project root:
  CPU default grid:   .venv/bin/python bench/bench_scaling.py --markdown out/scaling_cpu.md
  GPU full grid:      .venv/bin/python bench/bench_scaling.py --device cuda --dtype bfloat16 \\
                          --model smollm2-135m,llama-1b-random --json out/scaling_gpu.json \\
                          --markdown out/scaling_gpu.md
  quick check:        .venv/bin/python bench/bench_scaling.py --lengths 32,64 --pairs 1,2 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("LMSCOPE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODELS = ("smollm2-135m", "llama-1b-random")
ANALYSES = ("exact", "eap-ig")
CPU_MAX_PAIR_TOKENS = 512
RESULT_PREFIX = "BENCH_SCALING_RESULT "
# The random ~1 B-parameter Llama (Llama 3.2 1B's shape, with SmolLM2's vocabulary).
LLAMA_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "vocab_size": 49152,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
}


# -- child: one cell -------------------------------------------------------------------------


def smollm2_tokenizer():
    """SmolLM2's tokenizer alone (from the cached GGUF conversion), for the random model."""
    from transformers import AutoTokenizer

    from lmscope.core.loading import convert_gguf, resolve

    kind, where = resolve("smollm2-135m")
    if kind == "gguf":
        where = convert_gguf(where)
    tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, device: str, dtype: str):
    import torch

    import lmscope
    from lmscope.core.loading import resolve_device

    if name == "smollm2-135m":
        return lmscope.load(name, device=device, dtype=dtype)
    if name == "llama-1b-random":
        from transformers import AutoModelForCausalLM, LlamaConfig

        dev = resolve_device(device)
        tokenizer = smollm2_tokenizer()
        config = LlamaConfig(
            **LLAMA_1B,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        with dev:
            hf = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        hf.eval()
        return lmscope.Model(hf, tokenizer, source="random init (seed 0)", name=name)
    raise SystemExit(f"unknown model '{name}' (choose from {', '.join(MODELS)})")


def make_pairs(model, length: int, n: int, corrupt_at: float) -> list:
    """``n`` token pairs of exactly ``length`` tokens from WikiText-2 windows (see the module doc)."""
    import torch

    from lmscope.circuits.pairs import TokenPair
    from lmscope.core.corpus import load_corpus

    corpus = load_corpus(model, "wikitext2", max_tokens=2 * n * (length + 1) + 64)
    windows = corpus.windows(length + 1)
    if len(windows) < 2 * n:
        raise SystemExit(f"WikiText-2 has {len(windows)} windows of {length + 1} tokens; {2 * n} needed")
    pos = min(max(int(corrupt_at * length), 0), length - 1)
    pairs = []
    for i in range(n):
        own, other = windows[i], windows[n + i]
        clean = own[:length].clone()
        corrupt = clean.clone()
        corrupt[pos] = other[pos] if other[pos] != clean[pos] else (clean[pos] + 1) % model.d_vocab
        answer, wrong = int(own[length]), int(other[length])
        if wrong == answer:
            wrong = (answer + 1) % model.d_vocab
        mask = torch.ones(length, dtype=torch.long)
        pairs.append(TokenPair(clean, corrupt, torch.tensor([answer]), torch.tensor([wrong]), mask, mask.clone()))
    return pairs


def device_name(dev) -> str:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model or 'CPU'} ({os.cpu_count()} cores)"


def run_cell(spec: dict) -> dict:
    import torch

    from lmscope.circuits.edges import edge_attribution
    from lmscope.circuits.patching import activation_patching
    from lmscope.core.memory import PeakMemory

    model = load_model(spec["model"], spec["device"], spec["dtype"])
    dev = model.device
    pairs = make_pairs(model, spec["length"], spec["pairs"], spec["corrupt_at"])
    with torch.no_grad():  # warm-up: one short forward (kernels, thread pools, cuBLAS handles)
        model.hf(input_ids=pairs[0].clean[None, :16].to(dev), use_cache=False)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    sync()
    with PeakMemory(dev) as peak:
        start = time.perf_counter()
        if spec["analysis"] == "exact":
            result = activation_patching(model, pairs, "head", False, "denoising", "logit_diff")
            check = float(result.scores.abs().max())
        else:
            result = edge_attribution(model, pairs, metric="logit_diff", steps=spec["steps"])
            check = float(result.scores.abs().max())
        sync()
        seconds = time.perf_counter() - start
    return {
        **spec,
        "status": "ok",
        "device_name": device_name(dev),
        "params": model.n_params,
        "layers": model.n_layers,
        "heads": model.n_heads,
        "kv_heads": model.n_kv_heads,
        "seconds": seconds,
        "seconds_per_pair": seconds / spec["pairs"],
        "peak_bytes": int(peak.peak),
        "peak_mib": peak.peak / 2**20,
        "max_abs_score": check,
        "baseline_clean": result.clean,
        "baseline_corrupt": result.corrupt,
    }


def child(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        row = run_cell(spec)
    except Exception as e:  # noqa: BLE001 -- reported as the cell's status, the run goes on
        oom = "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
        row = {**spec, "status": "out of memory" if oom else "error", "error": f"{type(e).__name__}: {e}"[:500]}
    print(RESULT_PREFIX + json.dumps(row), flush=True)
    return 0


# -- parent: the grid --------------------------------------------------------------------------


def ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def names(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [x.strip() for x in text.split(",") if x.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (got '{text}')")
        return values

    return parse


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--cell", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "status": "timeout"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    status = "out of memory" if proc.returncode in (-9, 137) else "error"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**spec, "status": status, "error": f"exit code {proc.returncode}: " + " | ".join(tail)}


ANALYSIS_LABEL = {"exact": "exact patching, all heads", "eap-ig": "EAP-IG edges ({steps} steps)"}


def markdown(rows: list[dict]) -> str:
    head = "| analysis | model | device | seq len | pairs | seconds | peak memory (MiB) | seconds / pair |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
    names = {r["device"]: r["device_name"] for r in rows if "device_name" in r}
    for r in rows:
        label = ANALYSIS_LABEL[r["analysis"]].format(steps=r["steps"])
        model = f"{r['model']} {r['dtype']}"
        device = names.get(r["device"], r["device"])
        if r["status"] == "ok":
            cells = [f"{r['seconds']:.2f}", f"{r['peak_mib']:.0f}", f"{r['seconds_per_pair']:.2f}"]
        else:
            cells = [r["status"], "", ""]
        lines.append(f"| {label} | {model} | {device} | {r['length']} | {r['pairs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(rows: list[dict], args) -> str:
    """Lines above the table: models (parameters), corruption position, machine."""
    out = []
    seen = set()
    for r in rows:
        if r["status"] == "ok" and r["model"] not in seen:
            seen.add(r["model"])
            out.append(
                f"- {r['model']}: {r['params'] / 1e6:,.1f} M parameters, {r['layers']} layers, "
                f"{r['heads']} heads ({r['kv_heads']} KV heads)"
            )
    out.append(
        f"- pairs: WikiText-2 windows, one token replaced at {args.corrupt_at:g} x length; metric logit_diff; "
        f"peak memory above the loaded model; each cell a fresh process"
    )
    out.append(
        f"- host: {platform.node() or 'unknown'}, Python {platform.python_version()}, {os.cpu_count()} CPU cores"
    )
    return "\n".join(out)


def write(args, rows: list[dict], final: bool = False) -> None:
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.markdown and (final or rows):
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(header(rows, args) + "\n\n" + markdown(rows) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=(
            "llama-1b-random is meant for a GPU: on a CPU it is slow (minutes per cell even at\n"
            "short lengths, far more at 512+ tokens; raise --timeout).\n"
            "CPU default grid:  python bench/bench_scaling.py --markdown out/scaling_cpu.md\n"
            "GPU full grid:     python bench/bench_scaling.py --device cuda --dtype bfloat16 \\\n"
            "                       --model smollm2-135m,llama-1b-random --markdown out/scaling_gpu.md"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument(
        "--model",
        type=names(MODELS),
        default=["smollm2-135m"],
        help="comma-separated: smollm2-135m (default), llama-1b-random (random ~1B Llama; meant for a GPU, "
        "slow on a CPU)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lengths", type=ints, default=[32, 128, 512, 1024], help="tokens (default 32,128,512,1024)")
    parser.add_argument("--pairs", type=ints, default=[1, 4, 16], help="numbers of prompt pairs (default 1,4,16)")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG interpolation steps (default 5)")
    parser.add_argument(
        "--analyses", type=names(ANALYSES), default=list(ANALYSES), help="comma-separated: exact,eap-ig (default both)"
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds per cell, model loading included (default 900)"
    )
    parser.add_argument(
        "--max-pair-tokens",
        type=int,
        default=None,
        help=f"skip cells with more than the fewest pairs whose pairs x length exceeds this (default "
        f"{CPU_MAX_PAIR_TOKENS} on the CPU, no limit on CUDA; 0: no limit, the full grid)",
    )
    parser.add_argument(
        "--corrupt-at",
        type=float,
        default=0.5,
        help="where the corrupt prompt differs, as a fraction of the length (default 0.5; exact patching "
        "recomputes from there on, 0 is its worst case)",
    )
    parser.add_argument("--json", help="also write the rows (with status, parameters, baselines) as JSON here")
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args()

    if args.cell is not None:
        return child(args.cell)

    device = resolve_device(args.device)
    cap = args.max_pair_tokens
    if cap is None:
        cap = CPU_MAX_PAIR_TOKENS if device == "cpu" else 0
    print(
        f"bench_scaling: device {device}, dtype {args.dtype}, models {','.join(args.model)}, "
        f"lengths {args.lengths}, pairs {args.pairs}, analyses {','.join(args.analyses)}, "
        f"EAP-IG steps {args.steps}, timeout {args.timeout:g} s/cell" + (f", max pairs x length {cap}" if cap else ""),
        file=sys.stderr,
    )
    rows: list[dict] = []
    begin = time.perf_counter()
    for model in args.model:
        for analysis in args.analyses:
            for length in sorted(args.lengths):
                timed_out = False
                for n in sorted(args.pairs):
                    spec = {
                        "analysis": analysis,
                        "model": model,
                        "device": device,
                        "dtype": args.dtype,
                        "length": length,
                        "pairs": n,
                        "steps": args.steps,
                        "corrupt_at": args.corrupt_at,
                    }
                    if cap and n > min(args.pairs) and n * length > cap:
                        row = {**spec, "status": "skipped", "reason": f"pairs x length > {cap}"}
                    elif timed_out:
                        row = {**spec, "status": "skipped", "reason": "fewer pairs timed out"}
                    else:
                        t0 = time.perf_counter()
                        row = run_child(spec, args.timeout)
                        row["cell_wall_seconds"] = time.perf_counter() - t0
                        timed_out = row["status"] == "timeout"
                    rows.append(row)
                    what = (
                        f"{row['seconds']:.2f} s, {row['peak_mib']:.0f} MiB"
                        if row["status"] == "ok"
                        else row["status"]
                        + (
                            f" ({row.get('reason') or row.get('error')})"
                            if row.get("reason") or row.get("error")
                            else ""
                        )
                    )
                    wall = f" [cell {row['cell_wall_seconds']:.0f} s]" if "cell_wall_seconds" in row else ""
                    print(f"  {analysis:6s} {model} {length:5d} tokens x {n:3d} pairs: {what}{wall}", file=sys.stderr)
                    write(args, rows)
    print(f"total {time.perf_counter() - begin:.0f} s", file=sys.stderr)
    write(args, rows, final=True)
    print(header(rows, args))
    print()
    print(markdown(rows))
    return 0 if all(r["status"] in ("ok", "skipped", "timeout") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

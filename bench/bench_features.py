"""Training throughput of a TopK sparse autoencoder: lmscope against SAELens and sparsify, side by
side on the same cached activations.

1. Harvest once: SmolLM2-135M's ``blocks.12.resid_post`` over ``--tokens`` tokens of WikiText-2's
   validation split (lmscope's harvest: windows of 128, the first position and massive-activation
   tokens left out), saved as one safetensors file (``--cache``, reused when present).
2. Each side trains the same TopK SAE (``--k`` 32, ``--width`` 8x = 4608 latents, float32,
   batches of ``--batch`` tokens, Adam at 3e-4, ``--steps`` timed steps after 3 warm-up steps) in
   a process of its own, so that its peak memory is its own:

   - ``lmscope``: :func:`lmscope.features.training.train` with the SAELens recipe (decoder-norm
     rescaled top-k, AuxK, gradient clipping; the fused encoder and sparse decoder), inputs not
     normalised;
   - ``saelens``: sae-lens 6.x ``TopKTrainingSAE`` stepped by its ``SAETrainer.step`` (its whole
     training step: forward, dead-latent bookkeeping, backward, clipping, Adam, schedulers),
     ``rescale_acts_by_decoder_norm`` as its training default;
   - ``sparsify``: eai-sparsify 1.3 ``SparseCoder`` stepped as its ``Trainer`` steps it
     (unit-norm decoder, FVU, AuxK, parallel-gradient removal, Adam; its eager ``embedding_bag``
     decoder where Triton is missing).

   The reference packages are not lmscope dependencies (sae-lens pins TransformerLens < 4): they
   live in a scratch environment (``--reference-python``, default ``/tmp/refenv/bin/python``,
   made with ``pip install sae-lens==6.54.12 eai-sparsify==1.3.3``), which runs this same file
   with ``--side saelens`` / ``--side sparsify`` on the cached file. Without it, only lmscope runs.
3. Every side runs ``--rounds`` times, alternating; the best round counts (the machine is shared).
   Reported: tokens per second over the timed steps, and peak memory (CUDA: the peak allocated
   during training; CPU: the peak resident set above the resident set before training), with the
   ratios lmscope / reference. Target (issue 23): at least SAELens's throughput, aiming for 2x.

Run from the project root:  python bench/bench_features.py [--threads 1] [--device cpu] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SITE = "blocks.12.resid_post"
REFERENCE_PYTHON = "/tmp/refenv/bin/python"


def harvest(path: Path, tokens: int) -> None:
    """Cache ``tokens`` tokens of SmolLM2's blocks.12.resid_post to ``path`` (lmscope's harvest)."""
    from safetensors.torch import save_file

    import lmscope
    from lmscope.features.commands import TrainCommand, activations

    model = lmscope.load("smollm2-135m")
    source = activations(model, TrainCommand(site=(SITE,), tokens=tokens, seq_len=128, harvest_batch=16))
    x = torch.cat([source.block(j)[SITE] for j in range(len(source.sizes()))])[:tokens]
    save_file({"x": x.float().contiguous()}, str(path))
    print(f"cached {tuple(x.shape)} activations of {SITE} to {path}", file=sys.stderr)


def _rss() -> int:
    """The current resident set in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Meter:
    """Peak memory of the training that follows (see the module docstring)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.base = _rss()

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def side_lmscope(x: torch.Tensor, args) -> list[float]:
    from lmscope.features.harvest import TensorSource
    from lmscope.features.training import TrainSettings, train

    os.environ["LMSCOPE_QUIET"] = "1"
    settings = TrainSettings(site=("x",), arch="topk", k=args.k, width=f"{args.width}x", batch_size=args.batch,
                             tokens=(args.steps + 3) * args.batch, lr=3e-4, normalize=False, log_every=10**9,
                             dead_tokens=10**12)  # fmt: skip
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int) -> None:
        _sync(args.device)
        now = time.perf_counter()
        if step > 3:
            times.append(now - last[0])
        last[0] = now

    train(TensorSource({"x": x}, block_tokens=x.shape[0]), settings, device=args.device, on_step=on_step)
    return times


def side_saelens(x: torch.Tensor, args) -> list[float]:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d_in = x.shape[1]
    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=args.width * d_in, k=args.k, device=args.device, dtype="float32")
    sae = TopKTrainingSAE(cfg)
    steps = args.steps + 3
    trainer_cfg = SAETrainerConfig(total_training_samples=steps * args.batch, train_batch_size_samples=args.batch,
                                   lr=3e-4, lr_end=3e-4, device=args.device, dead_feature_window=10**9)  # fmt: skip
    trainer = SAETrainer(trainer_cfg, sae, data_provider=iter(()))
    sae.to(args.device)
    times = []
    for step, batch in enumerate(_batches(x, args.batch, steps, args.device)):
        start = time.perf_counter()
        trainer.step(batch)
        trainer.n_training_steps += 1
        _sync(args.device)
        if step >= 3:
            times.append(time.perf_counter() - start)
    return times


def side_sparsify(x: torch.Tensor, args) -> list[float]:
    from sparsify import SparseCoder, SparseCoderConfig

    d_in = x.shape[1]
    torch.manual_seed(0)
    sae = SparseCoder(d_in, SparseCoderConfig(k=args.k, num_latents=args.width * d_in), args.device, torch.float32)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-4)
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=args.device)
    steps = args.steps + 3
    times = []
    for step, batch in enumerate(_batches(x, args.batch, steps, args.device)):
        start = time.perf_counter()
        if step == 0:
            sae.b_dec.data = batch.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(batch, dead_mask=since_fired > 10**12)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            since_fired += batch.shape[0]
            since_fired[out.latent_indices.flatten()] = 0
        _sync(args.device)
        if step >= 3:
            times.append(time.perf_counter() - start)
    return times


def _batches(x: torch.Tensor, batch: int, steps: int, device: str):
    g = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(x.shape[0], generator=g) for _ in range(steps * batch // x.shape[0] + 1)])
    for s in range(steps):
        yield x[order[s * batch : (s + 1) * batch]].to(device)


SIDES = {"lmscope": side_lmscope, "saelens": side_saelens, "sparsify": side_sparsify}


def run_side(args) -> None:
    """One side's timed training (a process of its own): prints a JSON line."""
    from safetensors.torch import load_file

    if args.threads:
        torch.set_num_threads(args.threads)
    x = load_file(args.cache)["x"]
    meter = Meter(args.device)
    times = SIDES[args.side](x, args)
    seconds = sorted(times)[len(times) // 2]
    print(json.dumps({"side": args.side, "tokens_per_s": args.batch / seconds, "ms_per_step": 1000 * seconds,
                      "peak_mb": meter.peak() / 2**20, "threads": torch.get_num_threads()}))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="activation tokens harvested and cached")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lmscope-bench-features.safetensors"))
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--width", type=int, default=8, help="latents per input dimension")
    parser.add_argument("--batch", type=int, default=1024, help="tokens per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per side (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference-python", default=REFERENCE_PYTHON)
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)  # a worker process
    args = parser.parse_args()
    if args.side:
        run_side(args)
        return 0
    if not Path(args.cache).is_file():
        harvest(Path(args.cache), args.tokens)
    sides = ["lmscope"]
    if Path(args.reference_python).is_file():
        sides += ["saelens", "sparsify"]
    else:
        print(f"no reference environment at {args.reference_python}: lmscope alone", file=sys.stderr)
    forwarded = [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if v is not None and k not in ("side", "rounds")
    ]
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for side in sides:
            python = sys.executable if side == "lmscope" else args.reference_python
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
                ),
            }
            done = subprocess.run([python, __file__, f"--side={side}", *forwarded], capture_output=True, text=True, env=env, check=False)  # fmt: skip
            if done.returncode:
                print(f"{side} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            if side not in best or row["tokens_per_s"] > best[side]["tokens_per_s"]:
                best[side] = row
    print(f"TopK SAE on {SITE} of SmolLM2-135M: d_in 576, {args.width * 576} latents, k {args.k}, batches of "
          f"{args.batch} tokens, float32, {args.device}, {best.get('lmscope', {}).get('threads')} threads; "
          f"median of {args.steps} steps, best of {args.rounds} rounds")  # fmt: skip
    for side, row in best.items():
        print(
            f"  {side:9s} {row['tokens_per_s']:10.0f} tokens/s  {row['ms_per_step']:8.1f} ms/step  peak {row['peak_mb']:8.1f} MB"
        )
    if "lmscope" in best:
        for side in ("saelens", "sparsify"):
            if side in best:
                speed = best["lmscope"]["tokens_per_s"] / best[side]["tokens_per_s"]
                memory = best["lmscope"]["peak_mb"] / max(best[side]["peak_mb"], 1e-9)
                print(f"lmscope / {side}: throughput {speed:.2f}x, peak memory {memory:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side EAP-IG edge scores: lmscope vs the reference EAP-IG code (Hanna et al. 2024).

On SmolLM2-135M (float32) and ``--pairs`` IOI prompt pairs (:func:`lmscope.circuits.tasks.ioi`,
tokenised once with ``tokenize_pairs(..., "strict")``; both tools get exactly these token ids,
no BOS), for each ``--steps`` value it runs

  lmscope    ``edge_attribution(model, pairs, "logit_diff", steps=S, schedule="upstream")``
  reference  ``eap.attribute.attribute(tl, graph, dataloader, metric, method="EAP-IG-inputs",
             ig_steps=S)`` from github.com/hannamw/EAP-IG on a TransformerLens
             ``HookedTransformer`` holding the same weights, all pairs in one batch

and prints, per implementation, the wall time and peak memory of one call, the ratios
(reference time / lmscope time, lmscope peak / reference peak) and the agreement of the
scores over every edge (Pearson correlation and max |diff|, edges matched by name:
``input``/``a{L}.h{H}``/``m{L}`` -> ``a{L}.h{H}<q|k|v>``/``m{L}``/``logits`` in both).

Each measured call runs in a fresh child process (this script with ``--worker``): load the
model, build the inputs (and the TransformerLens model), one warm-up call (the same call on
the first pair alone: first-call costs paid, without doubling the run time), then the timed
call inside :class:`lmscope.core.memory.PeakMemory` (CPU: resident set size sampled every
2 ms, above the level at the start of the call, after ``gc`` and ``malloc_trim``; CUDA:
``max_memory_allocated`` above the allocation at the start). Both children use the same
``torch.set_num_threads``.

Conventions aligned (details in the comments of ``reference_worker``):

- the reference's metric is the logit difference (answer - wrong) at the last real token,
  negated (``loss=True``, as in its notebooks: its activation difference is corrupt - clean,
  lmscope's clean - corrupt) and summed over the batch (so its ``scores /= total_items``
  gives the mean over pairs, as lmscope averages over pairs);
- the reference's scores are then divided by M(clean) - M(corrupt) (the mean logit
  differences over the pairs, measured on the TransformerLens model), which is how lmscope
  normalises; lmscope's scores are compared as returned;
- both integrate over k = 0..S-1 (``schedule="upstream"`` is the reference's schedule);
- the reference is used as its notebooks use it: TransformerLens weights left trainable, so
  each backward also computes (and keeps) weight gradients, which lmscope does not
  (``--ref-freeze-weights`` freezes them for a like-for-like run); the gradients are dropped
  after the warm-up so the timed call allocates them as a first call does;
- the reference tokenises strings with a BOS and right padding (``eap.utils.tokenize_plus``);
  here its ``tokenize_plus`` is replaced by one that right-pads the given token ids (no BOS,
  the metric read at ``input_lengths - 1``, as the reference does), and its hard-coded
  ``device='cuda'`` score buffer is put on ``--device``.

Requirements. TransformerLens 4.x (the ``bench`` extra) no longer has ``HookedTransformer``,
which the reference imports, so the reference child puts an older TransformerLens and the
reference source first on ``sys.path`` (the lmscope child never imports them)::

    pip install --no-deps --target /tmp/tl3_site transformer-lens==3.9.0 better-abc
    git clone https://github.com/hannamw/EAP-IG /tmp/eapig_src     # or: git archive | tar -x

(``--tl-path`` / ``--eap-src`` or ``EAPIG_TL_PATH`` / ``EAPIG_SRC`` point elsewhere;
TransformerLens 3.9.0 needs transformers >= 5.9, which lmscope already has.)

Run from the project root:  python bench/bench_eap_ig.py [--pairs 8] [--steps 2 5] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("LMSCOPE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

MODEL = "smollm2-135m"
LOGITS_TOL = 1e-4


# -- shared by both children ---------------------------------------------------------------


def load_inputs(args):
    """The lmscope model on ``--device`` and the token pairs both tools score."""
    import lmscope
    from lmscope.circuits.pairs import tokenize_pairs
    from lmscope.circuits.tasks import pairs_for

    model = lmscope.load(MODEL, device=args.device)
    pairs = tokenize_pairs(model, pairs_for(model, None, "ioi", args.pairs), "strict")
    return model, pairs


def release_memory(device: torch.device) -> None:
    """Free what earlier calls left behind, so the measured call starts from a clean level."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    else:
        try:  # glibc keeps freed small blocks in its heap; give them back so RSS reflects use
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def measured(warm_up, fn, device: torch.device):
    """One warm-up call (``warm_up``: the same call on the first pair only, to keep the run
    short), then one timed call of ``fn`` under PeakMemory: (result, seconds, peak bytes)."""
    from lmscope.core.memory import PeakMemory

    warm_up()
    release_memory(device)
    with PeakMemory(device) as pm:
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return out, seconds, pm.peak


# -- the lmscope child ---------------------------------------------------------------------


def lmscope_worker(args) -> dict:
    from lmscope.circuits.edges import edge_attribution

    model, pairs = load_inputs(args)
    device = torch.device(args.device)

    def call(some):
        return lambda: edge_attribution(model, some, "logit_diff", steps=args.steps, schedule="upstream")

    result, seconds, peak = measured(call(pairs[:1]), call(pairs), device)
    edges = {(u, v): s for u, v, s in result.edges()}
    return {
        "seconds": seconds,
        "peak": peak,
        "edges": edges,
        "clean": result.clean,
        "corrupt": result.corrupt,
    }


# -- the reference child -------------------------------------------------------------------


class _TorchOnDevice:
    """``torch`` for ``eap.attribute``, whose score buffers are ``torch.zeros(..., device='cuda')``:
    the same module with that device replaced by ``--device``."""

    def __init__(self, device: torch.device):
        self._device = device

    def zeros(self, *shape, device=None, **kw):
        if device is not None and str(device).startswith("cuda"):
            device = self._device
        return torch.zeros(*shape, device=device, **kw)

    def __getattr__(self, name):
        return getattr(torch, name)


def build_hooked_transformer(model, device: torch.device):
    """A TransformerLens HookedTransformer with lmscope's weights: TransformerLens's own config
    (read from the converted model directory) and Llama weight converter, no weight processing
    (fold_ln, centering off), then the reference's settings: attention results per head, split
    q/k/v inputs, hook_mlp_in, and grouped-query attention ungrouped."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    if "llama" in Path(model.source).name.lower() or "gemma" in Path(model.source).name.lower():
        raise SystemExit(f"TransformerLens would read {model.source} by name, not from its config.json")
    cfg = loading.get_pretrained_model_config(
        model.source, fold_ln=False, device=str(device), dtype=torch.float32, default_prepend_bos=False
    )
    tl = HookedTransformer(cfg, tokenizer=model.tokenizer, default_padding_side="right")
    tl.load_and_process_state_dict(
        convert_llama_weights(model.hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    tl.to(device)
    tl.eval()
    tl.cfg.ungroup_grouped_query_attention = True
    tl.set_use_attn_result(True)
    tl.set_use_split_qkv_input(True)
    tl.set_use_hook_mlp_in(True)
    return tl


def right_pad(ids: list[list[int]], pad: int, device: torch.device):
    """The reference's ``tokenize_plus`` for token ids: right-padded tokens, attention mask,
    input lengths and the padded length."""
    n = max(len(x) for x in ids)
    tokens = torch.full((len(ids), n), pad, dtype=torch.long)
    mask = torch.zeros(len(ids), n, dtype=torch.long)
    for i, x in enumerate(ids):
        tokens[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return tokens.to(device), mask.to(device), mask.sum(1).to(device), n


def reference_worker(args) -> dict:
    sys.path[:0] = [str(Path(args.tl_path).resolve()), str(Path(args.eap_src).resolve() / "src")]
    warnings.filterwarnings("ignore")
    import eap.attribute
    import transformer_lens
    from eap.attribute import attribute
    from eap.graph import Graph
    from torch.utils.data import DataLoader

    if not str(transformer_lens.__file__).startswith(str(Path(args.tl_path).resolve())):
        raise SystemExit(f"expected TransformerLens from {args.tl_path}, got {transformer_lens.__file__}")

    model, pairs = load_inputs(args)
    device = torch.device(args.device)
    tl = build_hooked_transformer(model, device)
    if args.ref_freeze_weights:  # not what the reference's notebooks do: they leave weights trainable
        tl.requires_grad_(False)
    pad = model.pad_id or 0

    # The reference tokenises strings (BOS prepended, right padding); give it our token ids.
    eap.attribute.tokenize_plus = lambda _model, ids, max_length=None: right_pad(ids, pad, device)
    eap.attribute.torch = _TorchOnDevice(device)

    items = [(p.clean.tolist(), p.corrupt.tolist(), [int(p.answer[0]), int(p.wrong[0])]) for p in pairs]

    def collate(xs):  # the reference notebooks' collate_EAP
        clean, corrupted, labels = zip(*xs)
        return list(clean), list(corrupted), torch.tensor(labels)

    batch = args.ref_batch or len(items)
    dataloader = DataLoader(items, batch_size=batch, collate_fn=collate)

    def logit_diff(logits, clean_logits, input_length, labels):
        # the reference notebooks' logit_diff with loss=True, summed rather than averaged
        # over the batch (attribute() divides the scores by the number of items itself)
        logits = logits[torch.arange(logits.size(0), device=logits.device), input_length - 1]
        good_bad = torch.gather(logits, -1, labels.to(logits.device))
        return -(good_bad[:, 0] - good_bad[:, 1]).sum()

    # -- same forward: TL's batched, right-padded logits vs lmscope's, pair by pair -----------
    diffs, scale, clean_ld, corrupt_ld = [], [], [], []
    with torch.no_grad():
        for which, store in (("clean", clean_ld), ("corrupt", corrupt_ld)):
            ids = [it[0] if which == "clean" else it[1] for it in items]
            tokens, mask, lengths, _ = right_pad(ids, pad, device)
            tl_logits = tl(tokens, attention_mask=mask)
            for i, p in enumerate(pairs):
                n = int(lengths[i])
                ours = model.run(p.inputs(which, device)).logits[0]
                diffs.append((tl_logits[i, :n] - ours).abs().max().item())
                scale.append(ours.abs().max().item())
                last = tl_logits[i, n - 1]
                store.append(float(last[p.answer[0]] - last[p.wrong[0]]))
    clean_mean, corrupt_mean = sum(clean_ld) / len(clean_ld), sum(corrupt_ld) / len(corrupt_ld)

    graph = Graph.from_model(tl)

    def call(loader):
        def run():
            attribute(tl, graph, loader, logit_diff, method="EAP-IG-inputs", ig_steps=args.steps, quiet=True)
            # the reference never clears parameter gradients; drop them so each call starts alike
            tl.zero_grad(set_to_none=True)
            return graph.scores.clone()

        return run

    warm_loader = DataLoader(items[:1], batch_size=1, collate_fn=collate)
    scores, seconds, peak = measured(call(warm_loader), call(dataloader), device)
    scores = scores / (clean_mean - corrupt_mean)  # lmscope's normalisation
    edges = {}
    for edge in graph.edges.values():
        child = edge.child.name if edge.qkv is None else f"{edge.child.name}<{edge.qkv}>"
        edges[(edge.parent.name, child)] = float(scores[edge.matrix_index])
    return {
        "seconds": seconds,
        "peak": peak,
        "edges": edges,
        "clean": clean_mean,
        "corrupt": corrupt_mean,
        "logits_max_diff": max(diffs),
        "logits_max_abs": max(scale),
        "batch": batch,
    }


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    out = lmscope_worker(args) if args.worker == "lmscope" else reference_worker(args)
    out["threads"] = torch.get_num_threads()
    torch.save(out, args.out)


# -- the parent ----------------------------------------------------------------------------


def run_child(method: str, steps: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.pt"
        cmd = [sys.executable, __file__, "--worker", method, "--out", str(out), "--steps", str(steps)]
        cmd += ["--pairs", str(args.pairs), "--device", args.device, "--threads", str(args.threads)]
        cmd += ["--tl-path", args.tl_path, "--eap-src", args.eap_src, "--ref-batch", str(args.ref_batch)]
        cmd += ["--ref-freeze-weights"] if args.ref_freeze_weights else []
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"{method} worker (steps={steps}) failed with exit code {proc.returncode}")
        return torch.load(out, weights_only=False)


def agreement(ours: dict, ref: dict) -> dict:
    common = sorted(set(ours) & set(ref))
    a = torch.tensor([ours[k] for k in common], dtype=torch.float64)
    b = torch.tensor([ref[k] for k in common], dtype=torch.float64)
    ac, bc = a - a.mean(), b - b.mean()
    pearson = float((ac * bc).sum() / (ac.norm() * bc.norm())) if len(common) > 1 else math.nan
    return {
        "edges": len(common),
        "only_lmscope": len(set(ours) - set(ref)),
        "only_reference": len(set(ref) - set(ours)),
        "pearson": pearson,
        "max_abs_diff": float((a - b).abs().max()),
        "max_abs_score": float(torch.maximum(a.abs().max(), b.abs().max())),
    }


def mib(n: int) -> float:
    return n / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="IOI prompt pairs (default 8)")
    parser.add_argument(
        "--steps", type=int, nargs="+", action="append", help="EAP-IG steps, a list and/or repeated (default 2 5)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    parser.add_argument("--ref-batch", type=int, default=0, help="reference batch size (default 0: all pairs)")
    parser.add_argument(
        "--ref-freeze-weights",
        action="store_true",
        help="reference: requires_grad_(False) on the TransformerLens weights (default: left trainable, as in "
        "its notebooks, so each backward also computes weight gradients; lmscope freezes them)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to PATH")
    parser.add_argument("--tl-path", default=os.environ.get("EAPIG_TL_PATH", "/tmp/tl3_site"))
    parser.add_argument("--eap-src", default=os.environ.get("EAPIG_SRC", "/tmp/eapig_src"))
    parser.add_argument("--worker", choices=["lmscope", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps_list = [s for group in (args.steps or [[2, 5]]) for s in group]

    if args.worker:
        args.steps = steps_list[0]
        worker(args)
        return 0

    for path, what in (
        (Path(args.tl_path) / "transformer_lens", "--tl-path"),
        (Path(args.eap_src) / "src/eap", "--eap-src"),
    ):
        if not path.is_dir():
            raise SystemExit(f"{path} not found ({what}); see the set-up in this script's docstring")

    results = []
    load_before = os.getloadavg()[0]
    for steps in steps_list:
        ref = run_child("reference", steps, args)
        ours = run_child("lmscope", steps, args)
        agree = agreement(ours["edges"], ref["edges"])
        results.append(
            {
                "steps": steps,
                "lmscope": {"seconds": ours["seconds"], "peak_bytes": ours["peak"]},
                "reference": {"seconds": ref["seconds"], "peak_bytes": ref["peak"], "batch": ref["batch"]},
                "time_ratio_reference_over_lmscope": ref["seconds"] / ours["seconds"],
                "peak_ratio_lmscope_over_reference": ours["peak"] / ref["peak"] if ref["peak"] else math.nan,
                "agreement": agree,
                "logits_max_abs_diff": ref["logits_max_diff"],
                "logits_max_abs": ref["logits_max_abs"],
                "baselines": {
                    "lmscope": {"clean": ours["clean"], "corrupt": ours["corrupt"]},
                    "reference": {"clean": ref["clean"], "corrupt": ref["corrupt"]},
                },
                "threads": {"lmscope": ours["threads"], "reference": ref["threads"]},
            }
        )

    load_after = os.getloadavg()[0]
    device = torch.device(args.device)
    memory = "peak RSS above start (sampled every 2 ms)" if device.type == "cpu" else "max_memory_allocated above start"
    print(
        f"SmolLM2-135M float32 on {args.device}, {args.pairs} IOI pairs, EAP-IG edges (upstream schedule, "
        f"k = 0..steps-1), {args.threads} torch threads; one call per method after 1 warm-up "
        f"(first pair), each in its own process; memory: {memory}"
    )
    print(
        f"1-min load average: {load_before:.2f} before, {load_after:.2f} after (this run adds ~1; more means "
        f"other processes compete for the {os.cpu_count()} cores)"
    )
    r0 = results[0]
    print(
        f"logits, TransformerLens HookedTransformer (batched, right-padded) vs lmscope: max |diff| "
        f"{r0['logits_max_abs_diff']:.1e} ({'within' if r0['logits_max_abs_diff'] <= LOGITS_TOL else 'above'} "
        f"{LOGITS_TOL:g}; max |logit| {r0['logits_max_abs']:.1f})\n"
        f"logit difference clean / corrupt: lmscope {r0['baselines']['lmscope']['clean']:.4f} / "
        f"{r0['baselines']['lmscope']['corrupt']:.4f}, reference {r0['baselines']['reference']['clean']:.4f} / "
        f"{r0['baselines']['reference']['corrupt']:.4f}"
    )
    weights = "frozen (--ref-freeze-weights)" if args.ref_freeze_weights else "trainable, as in its notebooks"
    print(
        f"reference: hannamw/EAP-IG attribute(method='EAP-IG-inputs'), batch {r0['reference']['batch']}, "
        f"TransformerLens weights {weights}; scores divided by M(clean) - M(corrupt) as lmscope's"
    )
    print(
        f"\n{'steps':>5} {'method':<10}{'seconds':>9}{'peak MiB':>10}   {'ref s / lmscope s':>17}"
        f"{'lmscope peak / ref peak':>25}"
    )
    for r in results:
        ls, rf = r["lmscope"], r["reference"]
        print(f"{r['steps']:>5} {'reference':<10}{rf['seconds']:>9.2f}{mib(rf['peak_bytes']):>10.1f}")
        print(
            f"{'':>5} {'lmscope':<10}{ls['seconds']:>9.2f}{mib(ls['peak_bytes']):>10.1f}   "
            f"{r['time_ratio_reference_over_lmscope']:>17.2f}{r['peak_ratio_lmscope_over_reference']:>25.3f}"
        )
    print(f"\n{'steps':>5}{'edges':>8}{'unmatched':>11}{'pearson':>12}{'max |diff|':>12}{'max |score|':>13}")
    for r in results:
        a = r["agreement"]
        unmatched = f"{a['only_lmscope']}/{a['only_reference']}"
        print(
            f"{r['steps']:>5}{a['edges']:>8}{unmatched:>11}{a['pearson']:>12.8f}{a['max_abs_diff']:>12.2e}"
            f"{a['max_abs_score']:>13.4f}"
        )
    print("(unmatched: edges only in lmscope / only in the reference)")

    if args.json:
        config = {"model": MODEL, "device": args.device, "pairs": args.pairs, "threads": args.threads}
        config["reference_weights_frozen"] = args.ref_freeze_weights
        config["load_average"] = {"before": load_before, "after": load_after}
        Path(args.json).write_text(json.dumps({"config": config, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

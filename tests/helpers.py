"""Helpers shared by several test modules: small prompt pairs, a model with a planted head,
the CLI runner, and hand-written references for simulated KV quantisation."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import lmscope
from lmscope.circuits.metrics import get_metric
from lmscope.circuits.pairs import TokenPair
from lmscope.circuits.patching import COMPONENTS, activation_patching
from lmscope.cli import main
from lmscope.quant.configs import KVQuant
from tests.tiny import tiny_model

# -- prompt pairs and models ------------------------------------------------------------------


def token_pair(model, pos: int = 9, differ: tuple[int, ...] = (4,), seed: int = 0) -> TokenPair:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, model.d_vocab, (pos,), generator=g)
    corrupt = clean.clone()
    for p in differ:
        corrupt[p] = (clean[p] + 7) % (model.d_vocab - 3) + 3
    answer, wrong = torch.randint(3, model.d_vocab, (2,), generator=g)
    ones = torch.ones(pos, dtype=torch.long)
    return TokenPair(clean, corrupt, answer[None], wrong[None], ones, ones.clone())


def planted_model() -> tuple[lmscope.Model, tuple[int, int]]:
    """Tiny Llama where only head (1, 2) writes to the residual stream (every other head's
    output-projection columns and every MLP are zeroed): it alone carries information between
    positions, so it alone can carry the answer."""
    model = tiny_model("llama", seed=3)
    layer_head = (1, 2)
    d = model.d_head
    with torch.no_grad():
        for layer in range(model.n_layers):
            o = model.layer_module(layer, model.family.o_proj).weight
            keep = o[:, layer_head[1] * d : (layer_head[1] + 1) * d].clone()
            o.zero_()
            if layer == layer_head[0]:
                o[:, layer_head[1] * d : (layer_head[1] + 1) * d] = keep
            model.layer_module(layer, model.family.mlp_down).weight.zero_()
    return model, layer_head


def word_tokenizer(words):
    """A word-level tokenizer over ``words`` (id = index; ``"<pad>"`` doubles as unknown) that
    splits on whitespace and adds no special tokens."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<pad>"
    )


# -- the command line -------------------------------------------------------------------------


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one thread: training in a test is then deterministic, and faster than
    two threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def read_results(folder) -> dict:
    """``folder/results.json`` parsed strictly: NaN and infinities are refused, as JavaScript's
    ``JSON.parse`` refuses them (every command's results.json is read through this)."""

    def refuse(constant: str):
        raise ValueError(f"{folder}/results.json is not strict JSON: it holds {constant}")

    return json.loads((Path(folder) / "results.json").read_text(), parse_constant=refuse)


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as info:
        main(list(argv))
        raise SystemExit(0)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


# -- simulated KV quantisation by hand ---------------------------------------------------------


def asym_last(x, bits):
    """Hand-written asymmetric min/max quantisation over the last axis."""
    levels = 2**bits - 1
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo) / levels
    q = torch.clamp(torch.round((x - lo) / scale), 0, levels)
    return q * scale + lo


def per_token_quant(bits, group):
    """Site tensor [batch, pos, n_kv, d_head]: each token's channels (all heads in a row) in groups."""

    def fn(x):
        flat = x.flatten(2)
        g = group or flat.shape[-1]
        return asym_last(flat.unflatten(-1, (-1, g)), bits).flatten(2).unflatten(-1, x.shape[2:])

    return fn


def per_channel_quant(bits, group):
    """Site tensor [batch, pos, n_kv, d_head]: each channel over consecutive tokens in groups."""

    def fn(x):
        parts = []
        for start in range(0, x.shape[1], group):
            chunk = x[:, start : start + group]
            lo, hi = chunk.amin(1, keepdim=True), chunk.amax(1, keepdim=True)
            scale = (hi - lo) / (2**bits - 1)
            parts.append(torch.clamp(torch.round((chunk - lo) / scale), 0, 2**bits - 1) * scale + lo)
        return torch.cat(parts, 1) if parts else x

    return fn


def kv_reference_interventions(model, kv: KVQuant, positions=None):
    ivs = []
    for layer in range(model.n_layers):
        for t, bits, axis in zip("kv", kv.bits(layer), (kv.k_axis, kv.v_axis)):
            if bits is None:
                continue
            fn = per_token_quant(bits, kv.group_size) if axis == "token" else per_channel_quant(bits, kv.group_size)
            ivs.append(lmscope.apply(f"blocks.{layer}.attn.{t}", fn, positions=positions))
    return ivs


def logits_under(model, ids, **hooks):
    with torch.no_grad(), model.hooks(**hooks):
        return model.hf(input_ids=ids, use_cache=False).logits


# -- exact patching by the naive loop -------------------------------------------------------------


def naive_score(model, pair, component, layer, head, position, direction, metric_name):
    """One full forward with lmscope.patch, normalised like activation_patching (``head`` is the
    expert for ``component="expert"``)."""
    metric = get_metric(metric_name)
    site = f"blocks.{layer}.{COMPONENTS[component]}"
    if component == "expert":
        site, head = f"{site}.{head}", None
    clean_run = model.run(pair.clean[None], capture=[site])
    corrupt_run = model.run(pair.corrupt[None], capture=[site])
    clean_lp = clean_run.logits[0, -1].log_softmax(-1)
    m = lambda logits: float(metric(logits[:, -1], pair, clean_lp)[0])
    base, source = (pair.corrupt, clean_run) if direction == "denoising" else (pair.clean, corrupt_run)
    iv = lmscope.patch(site, source.cache, head=head, positions=None if position is None else [position])
    patched = m(model.run(base[None], interventions=[iv]).logits)
    clean_m, corrupt_m = m(clean_run.logits), m(corrupt_run.logits)
    return (patched - corrupt_m) / (clean_m - corrupt_m)


def check_against_naive(
    model, pair, component, per_position, direction="denoising", metric="logit_diff", cells=None, tol=1e-4
):
    """Every cell (or ``cells``) of exact patching within ``tol`` of :func:`naive_score`."""
    result = activation_patching(model, [pair], component, per_position, direction, metric)
    n_layers, n_pos, n_heads = result.scores.shape
    all_cells = [(L, p, h) for L in range(n_layers) for p in range(n_pos) for h in range(n_heads)]
    for L, p, h in cells or all_cells:
        ref = naive_score(
            model,
            pair,
            component,
            L,
            h if component in ("head", "expert") else None,
            p if per_position else None,
            direction,
            metric,
        )
        assert abs(float(result.scores[L, p, h]) - ref) <= tol, (L, p, h, float(result.scores[L, p, h]), ref)
    return result

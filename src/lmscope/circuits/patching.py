"""Exact activation patching (causal tracing / interchange interventions), fast.

Activation patching runs the model on one prompt (the *base*) while replacing one
component's activation by its value from another prompt (the *source*), and measures how a
metric moves (Vig et al. 2020; Meng et al. 2022, "Locating and Editing Factual Associations
in GPT"; Wang et al. 2022, "Interpretability in the Wild"; see also Heimersheim & Nanda 2024,
"How to use and interpret activation patching"). *Denoising* patches clean activations into
the corrupted run; *noising* patches corrupted activations into the clean run. Scores are
normalised so that the corrupted run scores 0 and the clean run 1::

    score = (M(patched) - M(corrupt)) / (M(clean) - M(corrupt))

Components: every head (``attn.z`` of one head), attention output (``attn.out``), MLP output
(``mlp.out``) and residual stream (``resid_pre``) of every layer; patched at all positions at
once, or one position at a time. The result equals TransformerLens's
``get_act_patch_attn_head_out_all_pos`` / ``..._by_pos`` (and the naive loop of one full
forward per patch), but is computed without rerunning what a patch cannot change:

- a patch at layer L changes nothing before layer L: each variant starts from the base run's
  residual stream entering layer L;
- a patch at position p changes nothing before p (attention is causal), and positions where the
  two prompts agree up to and including p have equal activations, so patching them is a no-op:
  only positions from the first differing token on are recomputed, reusing the base run's
  keys and values of the earlier positions;
- all variants that start at the same position run as one batch, which grows layer by layer
  as variants join at their patch layer; only the final position is unembedded, and for
  ``logit_diff`` only the answer rows of the unembedding.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import Cache

from lmscope.circuits.metrics import Metric, get_metric, restricted
from lmscope.circuits.pairs import PromptPair, TokenPair, tokenize_pairs
from lmscope.circuits.scores import PatchResult
from lmscope.core.errors import LmscopeError
from lmscope.core.model import position_ids
from lmscope.core.progress import progress_bar

COMPONENTS = {"head": "attn.z", "attn": "attn.out", "mlp": "mlp.out", "resid": "resid_pre"}


def as_token_pairs(model, pairs: Sequence[PromptPair] | Sequence[TokenPair], align: str = "strict") -> list[TokenPair]:
    if not pairs:
        raise LmscopeError("no prompt pairs")
    if isinstance(pairs[0], TokenPair):
        return list(pairs)
    return tokenize_pairs(model, list(pairs), align=align)


@dataclass
class _Chunk:
    """The base run's state for recomputing positions ``start..T-1``: per layer, the
    residual entering it at those positions, the arguments the model called it with, and
    the keys/values of positions before ``start``; and the final residual at the last position."""

    hidden: list[Tensor]
    calls: list[tuple[tuple, dict]]
    prefix: list[tuple[Tensor, Tensor] | None]
    final: Tensor


class _PrefixKV:
    """Stands in for a KV cache in a layer call: prepends the base run's keys/values of the
    earlier positions (broadcast over the batch of variants) to the new ones."""

    def __init__(self, prefix: list[tuple[Tensor, Tensor] | None], batch: int):
        self.prefix = prefix
        self.batch = batch

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        past = self.prefix[layer_idx]
        if past is None:
            return key, value
        k, v = (t.expand(self.batch, *t.shape[1:]) for t in past)
        return torch.cat([k, key], dim=-2), torch.cat([v, value], dim=-2)


def _prefix_cache(model, ids: Tensor, mask: Tensor, start: int) -> DynamicCache:
    """A KV cache of the prompt's positions before ``start`` (empty if ``start`` is 0)."""
    cache = DynamicCache(config=model.hf.config)
    if start > 0:
        with model.hooks(stop_after=model.n_layers - 1):
            model.hf(
                input_ids=ids[:, :start],
                attention_mask=mask[:, :start],
                position_ids=position_ids(mask)[:, :start],
                past_key_values=cache,
                use_cache=True,
            )
    return cache


def _continue(
    model, ids: Tensor, mask: Tensor, start: int, cache: DynamicCache, capture: list[str], keep: bool = False
):
    """Run positions ``start..T-1`` after ``cache`` (a copy of it unless ``keep``, which lets the
    run fill it); capture ``capture`` (at those positions) and the final residual stream.
    Returns (session cache, final residual)."""
    last = f"blocks.{model.n_layers - 1}.resid_post"
    with model.hooks([*capture, last], stop_after=model.n_layers - 1) as session:
        model.hf(
            input_ids=ids[:, start:],
            attention_mask=mask,
            position_ids=position_ids(mask)[:, start:],
            past_key_values=cache if keep else copy.deepcopy(cache),
            use_cache=True,
        )
    return session.cache, session.cache[last]


def _cropped(cache: DynamicCache, start: int) -> DynamicCache | None:
    """A copy of ``cache`` holding its first ``start`` positions; None for sliding-window caches,
    which keep too little of the past to crop."""
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        return None
    cropped = copy.deepcopy(cache)
    cropped.crop(start - cache.get_seq_length())  # a negative count removes that many
    return cropped


def _chunk(model, ids: Tensor, mask: Tensor, start: int, cache: DynamicCache) -> _Chunk:
    """Run the base prompt from ``start`` on after ``cache`` (its positions before ``start``),
    recording each layer's input and call arguments."""
    n = model.n_layers
    prefix = [(layer.keys, layer.values) if start > 0 else None for layer in cache.layers[:n]]
    prefix += [None] * (n - len(prefix))
    calls: list = [None] * n

    def recorder(layer):
        def hook(mod, args, kwargs):
            calls[layer] = (args, kwargs)

        return hook

    handles = [model.layer_module(i, "").register_forward_pre_hook(recorder(i), with_kwargs=True) for i in range(n)]
    try:
        _, final = _continue(model, ids, mask, start, cache, [])
    finally:
        for h in handles:
            h.remove()
    hidden = [args[0] if args else kwargs["hidden_states"] for args, kwargs in calls]
    return _Chunk(hidden, calls, prefix, final[:, -1])


@dataclass
class _Variant:
    """One patch: the component at ``layer`` (and ``head``); the positions are the run's."""

    layer: int
    head: int | None


def _patch_rows(x: Tensor, start_row: int, variants: list[_Variant], src: Tensor, pos: Tensor) -> Tensor:
    """Replace, in rows ``start_row:`` of ``x`` [batch, chunk_pos, ...], the positions ``pos``
    (bool [chunk_pos]) of each variant's head (or all features) by ``src`` [1, chunk_pos, ...]."""
    new = x[start_row:]
    where = pos.view(1, -1, *([1] * (x.ndim - 2)))
    if variants[0].head is not None:
        heads = torch.tensor([v.head for v in variants], device=x.device)
        one_hot = torch.nn.functional.one_hot(heads, x.shape[2]).bool()  # [rows, n_heads]
        where = where & one_hot[:, None, :, None]
    new = torch.where(where, src.to(x.dtype), new)
    return torch.cat([x[:start_row], new]) if start_row else new


def _run_variants(
    model, chunk: _Chunk, kind: str, by_layer: dict[int, list[_Variant]], sources: dict[int, Tensor], pos: Tensor
) -> Tensor:
    """Run every variant of one chunk as a batch that grows as variants join at their layer.
    Returns the final residual at the last position, [n_variants, d_model], in variant order
    (sorted by layer)."""
    fam = model.family
    shape = (model.n_heads, model.d_head)
    hidden: Tensor | None = None
    for layer in range(min(by_layer), model.n_layers):
        new = by_layer.get(layer, [])
        start_row = 0 if hidden is None else hidden.shape[0]
        if new:
            h = chunk.hidden[layer].expand(len(new), -1, -1)
            hidden = h if hidden is None else torch.cat([hidden, h])
            if kind == "resid_pre":
                hidden = _patch_rows(hidden, start_row, new, sources[layer], pos)
        handles = []
        if new and kind == "attn.z":

            def z_hook(mod, args, _new=new, _row=start_row, _src=sources[layer]):
                z = args[0].unflatten(-1, shape)
                return (_patch_rows(z, _row, _new, _src, pos).flatten(-2), *args[1:])

            handles.append(model.layer_module(layer, fam.o_proj).register_forward_pre_hook(z_hook))
        elif new and kind in ("attn.out", "mlp.out"):
            path = fam.o_proj if kind == "attn.out" else fam.mlp

            def out_hook(mod, args, out, _new=new, _row=start_row, _src=sources[layer]):
                main = out[0] if isinstance(out, tuple) else out
                patched = _patch_rows(main, _row, _new, _src, pos)
                return (patched, *out[1:]) if isinstance(out, tuple) else patched

            handles.append(model.layer_module(layer, path).register_forward_hook(out_hook))
        args, kwargs = chunk.calls[layer]
        kv = _PrefixKV(chunk.prefix, hidden.shape[0])
        rest = [kv if isinstance(a, Cache) else a for a in args[1:]]
        kwargs = {k: kv if isinstance(v, Cache) else v for k, v in kwargs.items()}
        if layer == model.n_layers - 1 and kind != "mlp.out":
            handles += _final_position_only(model.layer_module(layer, fam.mlp))
        try:
            out = model.layer_module(layer, "")(hidden, *rest, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden[:, -1]


def _final_position_only(mlp) -> list:
    """Hooks running ``mlp`` on the final position alone: at the last layer nothing reads the
    other positions' outputs (they get zeros)."""
    length = []

    def pre(mod, args):
        length.append(args[0].shape[1])
        return (args[0][:, -1:], *args[1:])

    def post(mod, args, out):
        full = out.new_zeros(out.shape[0], length.pop(), *out.shape[2:])
        full[:, -1:] = out
        return full

    return [mlp.register_forward_pre_hook(pre), mlp.register_forward_hook(post)]


def _first_difference(a: Tensor, b: Tensor, ma: Tensor, mb: Tensor) -> int:
    differ = ((a != b) | (ma != mb)).nonzero()
    return int(differ[0]) if len(differ) else len(a)


def activation_patching(
    model,
    pairs: Sequence[PromptPair] | Sequence[TokenPair],
    component: str = "head",
    per_position: bool = False,
    direction: str = "denoising",
    metric: str | Metric = "logit_diff",
    align: str = "strict",
    max_batch: int = 128,
) -> PatchResult:
    """Exact activation patching of every ``component`` (``head``, ``attn``, ``mlp``,
    ``resid``) of every layer, over all positions at once or per position.

    Returns :class:`PatchResult` with scores ``[n_layers, n_positions or 1, n_heads or 1]``,
    averaged over pairs before normalising. ``max_batch`` bounds the variants run at once.
    """
    if component not in COMPONENTS:
        raise LmscopeError(f"unknown component '{component}' (choose from {', '.join(COMPONENTS)})")
    if direction not in ("denoising", "noising"):
        raise LmscopeError(f"direction must be 'denoising' or 'noising', not '{direction}'")
    kind = COMPONENTS[component]
    metric = get_metric(metric)
    token_pairs = as_token_pairs(model, pairs, align)
    lengths = {len(p.clean) for p in token_pairs}
    if per_position and len(lengths) > 1:
        raise LmscopeError(f"per-position patching needs pairs of one length; got lengths {sorted(lengths)}")
    n_layers, n_heads = model.n_layers, (model.n_heads if component == "head" else 1)
    n_pos = max(lengths) if per_position else 1
    totals = torch.zeros(n_layers, n_pos, n_heads, dtype=torch.float64)
    clean_total = corrupt_total = 0.0
    work = sum(n_layers * (len(p.clean) if per_position else 1) for p in token_pairs)
    with torch.no_grad(), progress_bar(f"patching {component}s ({direction})", total=work) as advance:
        for pair in token_pairs:
            values, clean_m, corrupt_m = _patch_pair(
                model, pair, kind, per_position, direction, metric, n_heads, max_batch, advance
            )
            totals += values
            clean_total += clean_m
            corrupt_total += corrupt_m
    n = len(token_pairs)
    clean, corrupt = clean_total / n, corrupt_total / n
    if clean == corrupt:
        raise LmscopeError(f"the metric is the same on clean and corrupted prompts ({clean:.4g}): nothing to patch")
    scores = ((totals / n - corrupt) / (clean - corrupt)).float()
    tokens = []
    if model.tokenizer is not None and per_position:
        tokens = [model.tokenizer.decode(t) for t in token_pairs[0].clean]
    return PatchResult(scores, component, per_position, direction, metric.name, clean, corrupt, tokens=tokens)


def _final_metric(model, metric: Metric, pair: TokenPair, resid_last: Tensor, clean_logprobs: Tensor) -> Tensor:
    if metric.answers_only:
        tokens, local = restricted(pair)
        return metric(model.unembed(resid_last, tokens), local, None)
    return metric(model.unembed(resid_last), pair, clean_logprobs)


def _patch_pair(model, pair, kind, per_position, direction, metric, n_heads, max_batch, advance):
    """Metric values [n_layers, n_pos, n_heads] of every variant for one pair, and baselines.

    Positions before the first token where the prompts differ are shared: one prefix run fills
    their keys and values, then the source and base runs continue from it."""
    clean = (pair.clean[None].to(model.device), pair.clean_mask[None].to(model.device))
    corrupt = (pair.corrupt[None].to(model.device), pair.corrupt_mask[None].to(model.device))
    base, source = (corrupt, clean) if direction == "denoising" else (clean, corrupt)
    sites = [f"blocks.{layer}.{kind}" for layer in range(model.n_layers)]
    T = base[0].shape[1]
    first = min(_first_difference(base[0][0], source[0][0], base[1][0], source[1][0]), T - 1)
    full = DynamicCache(config=model.hf.config)
    src, src_final = _continue(model, *source, 0, full, sites, keep=True)
    prefix = _cropped(full, first) or _prefix_cache(model, *base, first)
    chunk = _chunk(model, *base, first, prefix)
    src_logits = model.unembed(src_final[:, -1])
    base_logits = model.unembed(chunk.final)
    clean_logits, corrupt_logits = (src_logits, base_logits) if direction == "denoising" else (base_logits, src_logits)
    clean_logprobs = clean_logits[0].log_softmax(-1)
    clean_m = float(metric(clean_logits, pair, clean_logprobs)[0])
    corrupt_m = float(metric(corrupt_logits, pair, clean_logprobs)[0])
    base_m = corrupt_m if direction == "denoising" else clean_m

    n_pos = T if per_position else 1
    values = torch.full((model.n_layers, n_pos, n_heads), base_m, dtype=torch.float64)
    starts = range(first, T) if per_position else [first]
    if per_position:
        advance(model.n_layers * first)
    variants = [
        _Variant(layer, head if kind == "attn.z" else None)
        for layer in range(model.n_layers)
        for head in range(n_heads)
    ]
    for start in starts:
        if start != first:
            # the source differs from the base before ``start`` here: fill the base's own prefix
            chunk = _chunk(model, *base, start, _prefix_cache(model, *base, start))
        pos = torch.zeros(T - start, dtype=torch.bool, device=model.device)
        pos[0 if per_position else slice(None)] = True
        sources = {layer: src[name][:, start:] for layer, name in enumerate(sites)}
        for group_start in range(0, len(variants), max_batch):
            group = variants[group_start : group_start + max_batch]
            by_layer: dict[int, list[_Variant]] = {}
            for v in group:
                by_layer.setdefault(v.layer, []).append(v)
            resid = _run_variants(model, chunk, kind, by_layer, sources, pos)
            m = _final_metric(model, metric, pair, resid, clean_logprobs).double()
            for v, value in zip(group, m):
                values[v.layer, start if per_position else 0, v.head or 0] = value
        advance(model.n_layers)
    if not per_position:
        advance(model.n_layers)
    return values, clean_m, corrupt_m

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

from lmscope.circuits.metrics import Metric, get_metric
from lmscope.circuits.pairs import Baselines, BoundMetric, PromptPair, TokenPair, as_token_pairs, bind
from lmscope.circuits.scores import PatchResult
from lmscope.core import distributed, moe
from lmscope.core.errors import LmscopeError
from lmscope.core.hooks import Hook, hooked
from lmscope.core.model import Model, position_ids
from lmscope.core.progress import progress_bar

COMPONENTS = {"head": "attn.z", "attn": "attn.out", "mlp": "mlp.out", "resid": "resid_pre", "expert": "moe.expert"}


def layer_sites(model: Model, kind: str) -> dict[int, list[str]]:
    """Per layer, the sites of component ``kind``: one (``attn.z`` holds the heads), or for
    ``moe.expert`` every routed expert's output site of each mixture-of-experts layer (dense
    layers have none)."""
    if kind != "moe.expert":
        return {layer: [f"blocks.{layer}.{kind}"] for layer in range(model.n_layers)}
    counts = moe.expert_counts(model)
    return {layer: [f"blocks.{layer}.moe.expert.{e}" for e in range(n)] for layer, n in counts.items()}


@dataclass
class Chunk:
    """The base run's state for recomputing positions ``start..T-1``: per layer, the
    residual entering it at those positions, the arguments the model called it with (``args``,
    ``kwargs``; the residual among them is replaced when variants rerun the layer), and the
    keys/values of positions before ``start``; and the final residual at the last position."""

    hidden: list[Tensor]
    calls: list[tuple[tuple, dict]]
    prefix: list[tuple[Tensor, Tensor] | None]
    final: Tensor


class PrefixKV:
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


def prefix_cache(model: Model, ids: Tensor, mask: Tensor, start: int) -> DynamicCache:
    """A KV cache of the prompt's positions before ``start`` (empty if ``start`` is 0)."""
    cache = DynamicCache(config=model.hf.config)
    if start > 0:
        with model.hooks(stop_after=model.n_layers - 1):
            model.hf(
                input_ids=ids[:, :start],
                attention_mask=mask[:, :start],
                position_ids=position_ids(mask)[:, :start],
                use_cache=True,
                **model.with_cache(cache),
            )
    return cache


def _continue(
    model: Model, ids: Tensor, mask: Tensor, start: int, cache: DynamicCache, capture: list[str], keep: bool = False
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
            use_cache=True,
            **model.with_cache(cache if keep else copy.deepcopy(cache)),
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


def require_kv_layers(model: Model) -> None:
    """A clear error for a hybrid model (``Family.mixer``): layers are rerun after a prefix of keys
    and values (:class:`PrefixKV`), which its linear-attention layers' recurrent state is not."""
    mixed = model.layers_with("mixer") if model.family.mixer else []
    if mixed:
        raise LmscopeError(
            f"{model.hf.config.model_type}: layers {mixed} ({model.family.mixer}) carry a recurrent state, "
            "not keys and values, so layers cannot be rerun from a cached prefix (not supported yet)"
        )


def layer_chunk(model: Model, ids: Tensor, mask: Tensor, start: int, cache: DynamicCache) -> Chunk:
    """Run the base prompt from ``start`` on after ``cache`` (its positions before ``start``),
    recording each layer's input and call arguments."""
    require_kv_layers(model)
    n = model.n_layers
    prefix = [(layer.keys, layer.values) if start > 0 else None for layer in cache.layers[:n]]
    prefix += [None] * (n - len(prefix))
    calls: list = [None] * n
    hidden: list = [None] * n

    def record(layer: int) -> list[Hook]:
        def call(args, kwargs) -> None:
            calls[layer] = (args, kwargs)

        def resid(x: Tensor) -> None:
            hidden[layer] = x

        return [Hook("block.call", layer, call), Hook("resid_pre", layer, resid)]

    with hooked(model, [hook for layer in range(n) for hook in record(layer)]):
        _, final = _continue(model, ids, mask, start, cache, [])
    return Chunk(hidden, calls, prefix, final[:, -1])


@dataclass
class _Variant:
    """One patch: the component at ``layer`` (and ``head``, or expert for ``moe.expert``); the
    positions are the run's."""

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


def _expert_patch(start_row: int, variants: list[_Variant], sources: list[Tensor], pos: Tensor):
    """The edit for :func:`lmscope.core.moe.expert_hooks`: in rows ``start_row:``, expert e's
    output at positions ``pos`` becomes ``sources[e]`` [1, chunk_pos, d_model] in the variants
    that patch e."""

    def edit(e: int, x: Tensor) -> Tensor:
        rows = torch.tensor([v.head == e for v in variants], device=x.device)
        where = rows[:, None, None] & pos[None, :, None]
        new = torch.where(where, sources[e].to(x.dtype), x[start_row:])
        return torch.cat([x[:start_row], new]) if start_row else new

    return edit


def _run_variants(
    model: Model,
    chunk: Chunk,
    kind: str,
    by_layer: dict[int, list[_Variant]],
    sources: dict[int, list[Tensor]],
    pos: Tensor,
) -> Tensor:
    """Run every variant of one chunk as a batch that grows as variants join at their layer.
    Returns the final residual at the last position, [n_variants, d_model], in variant order
    (sorted by layer).

    Each layer is called with the base run's arguments; a ``resid_pre`` hook hands it the batch
    of variants instead of the base run's residual."""
    hidden: Tensor | None = None
    for layer in range(min(by_layer), model.n_layers):
        new = by_layer.get(layer, [])
        start_row = 0 if hidden is None else hidden.shape[0]
        if new:
            h = chunk.hidden[layer].expand(len(new), -1, -1)
            hidden = h if hidden is None else torch.cat([hidden, h])
            if kind == "resid_pre":
                hidden = _patch_rows(hidden, start_row, new, sources[layer][0], pos)
        hooks = [Hook("resid_pre", layer, lambda x, _h=hidden: _h)]
        if new and kind in ("attn.z", "attn.out", "mlp.out"):
            # attn.z arrives split into heads, [batch, chunk_pos, n_heads, d_head]
            patch = lambda x, _new=new, _row=start_row, _src=sources[layer][0]: _patch_rows(x, _row, _new, _src, pos)
            hooks.append(Hook(kind, layer, patch))
        if new and kind == "moe.expert":
            experts = sorted({v.head for v in new})
            hooks += moe.expert_hooks(model, layer, experts, _expert_patch(start_row, new, sources[layer], pos))
        if layer == model.n_layers - 1 and kind not in ("mlp.out", "moe.expert"):
            hooks += final_position_only(layer)
        args, kwargs = chunk.calls[layer]
        kv = PrefixKV(chunk.prefix, hidden.shape[0])
        args = tuple(kv if isinstance(a, Cache) else a for a in args)
        kwargs = {k: kv if isinstance(v, Cache) else v for k, v in kwargs.items()}
        with hooked(model, hooks):
            out = model.layer_module(layer, "")(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden[:, -1]


def final_position_only(layer: int) -> list[Hook]:
    """Hooks running the MLP of ``layer`` on the final position alone: at the last layer nothing
    reads the other positions' outputs (they get zeros)."""
    length = []

    def pre(x: Tensor) -> Tensor:
        length.append(x.shape[1])
        return x[:, -1:]

    def post(out: Tensor) -> Tensor:
        full = out.new_zeros(out.shape[0], length.pop(), *out.shape[2:])
        full[:, -1:] = out
        return full

    return [Hook("mlp.in", layer, pre), Hook("mlp.out", layer, post)]


def _first_difference(a: Tensor, b: Tensor, ma: Tensor, mb: Tensor) -> int:
    differ = ((a != b) | (ma != mb)).nonzero()
    return int(differ[0]) if len(differ) else len(a)


def activation_patching(
    model: Model,
    pairs: Sequence[PromptPair] | Sequence[TokenPair],
    component: str = "head",
    per_position: bool = False,
    direction: str = "denoising",
    metric: str | Metric = "logit_diff",
    max_batch: int = 128,
) -> PatchResult:
    """Exact activation patching (Vig et al. 2020; Meng et al. 2022; Wang et al. 2022) of every
    ``component`` (``head``, ``attn``, ``mlp``, ``resid``, or ``expert``: each routed expert's
    output, ``blocks.{L}.moe.expert.{E}``, weighted by the base run's own routing) of every layer,
    over all positions at once or per position, in ``direction`` (``denoising``: clean into
    corrupted; ``noising``: corrupted into clean).

    ``pairs``: token pairs, or prompt pairs of equal length (tokenise pairs of different lengths
    with :func:`~lmscope.circuits.pairs.tokenize_pairs` and ``align="final"`` first).
    Returns :class:`PatchResult` with scores ``[n_layers, n_positions or 1, n_heads, n_experts or 1]``
    (dense layers of a mixture-of-experts model patch nothing: they keep the base run's score): the
    metric of each patched run, averaged over pairs, then normalised by the pairs' mean clean and
    corrupted baselines (:class:`~lmscope.circuits.pairs.Baselines`). ``max_batch`` bounds the
    variants run at once.
    """
    if component not in COMPONENTS:
        raise LmscopeError(f"unknown component '{component}' (choose from {', '.join(COMPONENTS)})")
    if direction not in ("denoising", "noising"):
        raise LmscopeError(f"direction must be 'denoising' or 'noising', not '{direction}'")
    require_kv_layers(model)
    kind = COMPONENTS[component]
    metric = get_metric(metric)
    token_pairs = as_token_pairs(model, pairs)
    lengths = {len(p.clean) for p in token_pairs}
    if per_position and len(lengths) > 1:
        raise LmscopeError(f"per-position patching needs pairs of one length; got lengths {sorted(lengths)}")
    sites = layer_sites(model, kind)
    n_layers = model.n_layers
    n_heads = 1  # the last axis: heads, experts, or one for a layer component
    if kind == "attn.z":
        n_heads = model.n_heads
    elif kind == "moe.expert":
        n_heads = max(map(len, sites.values()))
    n_pos = max(lengths) if per_position else 1
    totals = torch.zeros(n_layers, n_pos, n_heads, dtype=torch.float64)
    per_pair = []
    work = sum(n_layers * (len(p.clean) if per_position else 1) for p in token_pairs)
    with torch.no_grad(), progress_bar(f"patching {component}s ({direction})", total=work) as advance:

        def run_pair(pair: TokenPair) -> tuple[Tensor, tuple[float, float]]:
            share = lambda n: advance(n * distributed.world_size())
            return _patch_pair(model, pair, kind, sites, per_position, direction, metric, n_heads, max_batch, share)

        # Under torchrun, pairs go round-robin to the ranks and add up in order on each.
        for values, clean_corrupt in distributed.ordered_map(token_pairs, run_pair):
            totals += values
            per_pair.append(clean_corrupt)
    baselines = Baselines.mean(per_pair)
    scores = baselines.normalise(totals / len(token_pairs)).float()
    tokens = []
    if model.tokenizer is not None and per_position:
        tokens = [model.tokenizer.decode(t) for t in token_pairs[0].clean]
    return PatchResult(
        scores, component, per_position, direction, metric.name, baselines.clean, baselines.corrupt, tokens=tokens
    )


def _patch_pair(
    model: Model,
    pair: TokenPair,
    kind: str,
    sites: dict[int, list[str]],
    per_position: bool,
    direction: str,
    metric: Metric,
    n_heads: int,
    max_batch: int,
    advance,
) -> tuple[Tensor, tuple[float, float]]:
    """Metric values [n_layers, n_pos, n_heads] of every variant for one pair, and the pair's
    (clean, corrupted) metric values.

    Positions before the first token where the prompts differ are shared: one prefix run fills
    their keys and values, then the source and base runs continue from it."""
    clean = (pair.clean[None].to(model.device), pair.clean_mask[None].to(model.device))
    corrupt = (pair.corrupt[None].to(model.device), pair.corrupt_mask[None].to(model.device))
    base, source = (corrupt, clean) if direction == "denoising" else (clean, corrupt)
    T = base[0].shape[1]
    first = min(_first_difference(base[0][0], source[0][0], base[1][0], source[1][0]), T - 1)
    full = DynamicCache(config=model.hf.config)
    src, src_final = _continue(model, *source, 0, full, [s for names in sites.values() for s in names], keep=True)
    prefix = _cropped(full, first) or prefix_cache(model, *base, first)
    chunk = layer_chunk(model, *base, first, prefix)
    src_logits = model.unembed(src_final[:, -1])
    base_logits = model.unembed(chunk.final)
    clean_logits, corrupt_logits = (src_logits, base_logits) if direction == "denoising" else (base_logits, src_logits)
    bound: BoundMetric = bind(metric, pair, clean_logits)
    clean_m, corrupt_m = float(bound(clean_logits)[0]), float(bound(corrupt_logits)[0])
    base_m = corrupt_m if direction == "denoising" else clean_m

    n_pos = T if per_position else 1
    values = torch.full((model.n_layers, n_pos, n_heads), base_m, dtype=torch.float64)
    starts = range(first, T) if per_position else [first]
    if per_position:
        advance(model.n_layers * first)
    variants = [
        _Variant(layer, head if kind in ("attn.z", "moe.expert") else None)
        for layer, names in sites.items()
        for head in range(len(names) if kind == "moe.expert" else n_heads)
    ]
    for start in starts:
        if start != first:
            # the source differs from the base before ``start`` here: fill the base's own prefix
            chunk = layer_chunk(model, *base, start, prefix_cache(model, *base, start))
        pos = torch.zeros(T - start, dtype=torch.bool, device=model.device)
        pos[0 if per_position else slice(None)] = True
        sources = {layer: [src[name][:, start:] for name in names] for layer, names in sites.items()}
        for group_start in range(0, len(variants), max_batch):
            group = variants[group_start : group_start + max_batch]
            by_layer: dict[int, list[_Variant]] = {}
            for v in group:
                by_layer.setdefault(v.layer, []).append(v)
            resid = _run_variants(model, chunk, kind, by_layer, sources, pos)
            m = bound.of_residual(model, resid).double()
            for v, value in zip(group, m):
                values[v.layer, start if per_position else 0, v.head or 0] = value
        advance(model.n_layers)
    if not per_position:
        advance(model.n_layers)
    return values, (clean_m, corrupt_m)

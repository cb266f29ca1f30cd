"""Gradient-based approximations of activation patching, at node level.

- **Attribution patching** (Nanda 2023, "Attribution Patching: Activation Patching At
  Industrial Scale"; Syed et al. 2023): a first-order Taylor estimate of every patch at once,
  ``M(patched) - M(corrupt) ~= (a_clean - a_corrupt) . dM/da |corrupt``, from one forward and
  one backward pass on the corrupted prompt.
- **EAP-IG at node level** (Hanna et al. 2024, "Have Faith in Faithfulness"; integrated
  gradients, Sundararajan et al. 2017): the gradient is averaged over inputs whose embeddings
  are interpolated from corrupted to clean, ``e_k = e_corrupt + (k / steps)(e_clean -
  e_corrupt)`` for ``k = 0 .. steps-1`` (the EAP-IG code's schedule, ``schedule="upstream"``),
  or for ``k = 1 .. steps`` (``schedule="paper"``: the EAP-IG code vendored by "Temporal Heads",
  Park et al. 2025, whose ``get_scores_eap_ig`` loops ``range(1, steps + 1)``; it used 100
  steps).

Scores follow the pair protocol (:mod:`lmscope.circuits.pairs`) and have the shapes of
:mod:`lmscope.circuits.patching` (the corrupted run is 0, the clean run 1), so they can be
compared cell by cell with exact patching.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from lmscope.circuits.metrics import Metric, get_metric
from lmscope.circuits.pairs import Baselines, BoundMetric, PromptPair, TokenPair, as_token_pairs, bind
from lmscope.circuits.patching import COMPONENTS, layer_sites
from lmscope.circuits.scores import PatchResult
from lmscope.core import distributed, memory
from lmscope.core.errors import LmscopeError
from lmscope.core.interventions import Intervention, apply
from lmscope.core.model import Model
from lmscope.core.progress import progress_bar

GRADIENT_METHODS = ("attribution", "eap-ig")
SCHEDULES = ("upstream", "paper")


def interpolations(
    model: Model,
    pair: TokenPair,
    steps: int,
    batch: int = 16,
    embeds: tuple[Tensor, Tensor] | None = None,
    schedule: str = "upstream",
) -> Iterator[tuple[dict[str, Tensor], Intervention]]:
    """Inputs whose embeddings go from corrupted to clean, ``e_corrupt + (k / steps)(e_clean -
    e_corrupt)`` (integrated gradients' straight path, Sundararajan et al. 2017), in batches:
    yields ``(inputs, intervention)`` for :meth:`Model.run`. ``schedule``: ``"upstream"``, k = 0
    .. steps-1 (the EAP-IG code of Hanna et al. 2024: the corrupted input, never the clean one),
    or ``"paper"``, k = 1 .. steps (the EAP-IG code vendored by "Temporal Heads", Park et al.
    2025, ``eap/attribute.py`` ``get_scores_eap_ig``: the clean input, never the corrupted one).
    ``embeds``: the (clean, corrupted) ``embed`` captures, if already run."""
    if schedule not in SCHEDULES:
        raise LmscopeError(f"unknown schedule '{schedule}' (choose from {', '.join(SCHEDULES)})")
    offset = 1 if schedule == "paper" else 0
    if embeds is None:
        embeds = tuple(
            model.run(pair.inputs(which), capture=["embed"]).cache["embed"] for which in ("clean", "corrupt")
        )
    clean_emb, corrupt_emb = embeds
    delta = clean_emb - corrupt_emb
    for first in range(0, steps, batch):
        ks = torch.arange(first, min(first + batch, steps), dtype=delta.dtype, device=delta.device) + offset
        alphas = ks / steps
        n = len(alphas)
        inputs = {
            "input_ids": pair.corrupt[None].expand(n, -1),
            "attention_mask": pair.corrupt_mask[None].expand(n, -1),
        }
        # A leaf that requires grad: the gradient flows from here even with frozen weights.
        yield inputs, apply("embed", lambda x, a=alphas: (corrupt_emb + a[:, None, None] * delta).requires_grad_())


def step_bytes(model: Model, length: int, *, edges: bool = False) -> int:
    """Estimated memory of one interpolation step of a ``length``-token pair in a forward and
    backward pass: per token and layer, the activations a backward keeps (residual stream,
    norms, q/k/v, attention output: ~16 d_model; MLP: ~4 d_mlp; the attention weights, 2 n_heads
    x length, where attention is not fused: on the CPU or with eager attention), in the model's
    dtype; edges add the retained q/k/v gradients and inputs per layer and one layer's per-head
    input gradients, [3 n_heads, length, d_model] three times, in float32."""
    d, heads, layers = model.d_model, model.n_heads, model.n_layers
    d_mlp = model.d_mlp or 4 * d  # mixture-of-experts only: the chosen experts' width, about 4 d
    size = torch.finfo(model.hf.dtype).bits // 8
    fused = model.device.type == "cuda" and getattr(model.hf.config, "_attn_implementation", "sdpa") != "eager"
    per_token = 16 * d + 4 * d_mlp + (0 if fused else 2 * heads * length)
    per_step = layers * length * per_token * size
    if edges:
        per_step += layers * length * 5 * d * size + 9 * heads * length * d * 4
    return per_step


def gradient_rows(model: Model, length: int, steps: int, budget: int, *, edges: bool = False, fixed: int = 0) -> int:
    """How many interpolation steps of a ``length``-token pair run per forward and backward
    within ``budget`` bytes, ``fixed`` bytes being held already (:func:`step_bytes` each; at
    least 1, at most ``steps``)."""
    return int(max(1, min(steps, (budget - fixed) // step_bytes(model, length, edges=edges))))


def integrated_gradients(
    model: Model,
    metric: BoundMetric,
    sites: list[str],
    steps: int,
    embeds: tuple[Tensor, Tensor] | None = None,
    schedule: str = "upstream",
    rows: int = 16,
) -> dict[str, Tensor]:
    """Integrated gradients (Sundararajan et al. 2017) of a pair's bound metric at ``sites``: the
    mean over ``steps`` interpolated inputs (:func:`interpolations`, with its ``schedule``) of
    dM/d(site), each ``[pos, ...]``, ``rows`` steps per forward and backward.

    ``steps=1`` is the plain gradient at the corrupted input (attribution patching), or at the
    clean input with ``schedule="paper"``."""
    grads: dict[str, Tensor] = {}
    for inputs, interpolate in interpolations(model, metric.pair, steps, rows, embeds, schedule):
        with model.frozen():  # activation gradients only
            run = model.run(inputs, capture=sites, interventions=[interpolate], grad=True, logits="last")
            metric(run.logits[:, -1]).sum().backward()
        for site in sites:
            g = run.cache[site].grad.sum(0)
            grads[site] = g if site not in grads else grads[site] + g
    return {site: g / steps for site, g in grads.items()}


def attribute(
    model: Model,
    pairs: Sequence[PromptPair] | Sequence[TokenPair],
    method: str = "attribution",
    component: str = "head",
    per_position: bool = False,
    metric: str | Metric = "logit_diff",
    steps: int = 100,
    schedule: str = "upstream",
    max_memory: int | str | dict | None = None,
) -> PatchResult:
    """Node scores by attribution patching (Nanda 2023) or EAP-IG (Hanna et al. 2024), denoising
    direction: per pair, ``(a_clean - a_corrupt) . dM/da`` with the gradient at the corrupted
    input (``attribution``) or averaged over ``steps`` interpolations (``eap-ig``).

    ``pairs``: token pairs, or prompt pairs of equal length (tokenise pairs of different lengths
    with :func:`~lmscope.circuits.pairs.tokenize_pairs` and ``align="final"`` first).
    Returns :class:`~lmscope.circuits.scores.PatchResult` with scores ``[n_layers, n_positions or 1,
    n_heads or 1]``: per head the product is summed over ``d_head`` (and over positions when
    not ``per_position``), per layer component over ``d_model``; ``component="expert"`` scores
    each routed expert's output (``blocks.{L}.moe.expert.{E}``, the last axis is the expert; 0 in
    dense layers); averaged over pairs and divided
    by the mean M(clean) - M(corrupt) (:meth:`~lmscope.circuits.pairs.Baselines.normalise`).
    ``schedule``: the interpolation steps of ``eap-ig`` (:func:`interpolations`: ``"upstream"``
    or ``"paper"``); ``attribution`` always takes the gradient at the corrupted input.
    ``max_memory``: the working-memory budget (bytes, a size such as ``"4GB"``, or accelerate's
    per-device dict; default: half the free memory of the model's device,
    :func:`lmscope.core.memory.budget`), which sets the steps per backward
    (:func:`gradient_rows`).
    """
    if method not in GRADIENT_METHODS:
        raise LmscopeError(f"unknown method '{method}' (choose from {', '.join(GRADIENT_METHODS)})")
    if component not in COMPONENTS:
        raise LmscopeError(f"unknown component '{component}' (choose from {', '.join(COMPONENTS)})")
    if steps < 1:
        raise LmscopeError("steps must be at least 1")
    if schedule not in SCHEDULES:
        raise LmscopeError(f"unknown schedule '{schedule}' (choose from {', '.join(SCHEDULES)})")
    metric = get_metric(metric)
    token_pairs = as_token_pairs(model, pairs)
    lengths = {len(p.clean) for p in token_pairs}
    if per_position and len(lengths) > 1:
        raise LmscopeError(f"per-position scores need pairs of one length; got lengths {sorted(lengths)}")
    kind = COMPONENTS[component]
    by_layer = layer_sites(model, kind)
    groups = [by_layer.get(layer, []) for layer in range(model.n_layers)]
    sites = [site for group in groups for site in group]
    n_steps, schedule = (1, "upstream") if method == "attribution" else (steps, schedule)
    budget = memory.budget(model.device, max_memory)

    def run_pair(pair: TokenPair) -> tuple[Tensor, tuple[float, float]]:
        """One pair's node scores [n_layers, n_pos or 1, n_heads or 1] and (M(clean), M(corrupt))."""
        with torch.no_grad():
            clean = model.run(pair.inputs("clean"), capture=[*sites, "embed"], logits="last")
            corrupt = model.run(pair.inputs("corrupt"), capture=[*sites, "embed"], logits="last")
        bound = bind(metric, pair, clean.logits[0, -1])
        baselines = (float(bound(clean.logits[:, -1])[0]), float(bound(corrupt.logits[:, -1])[0]))
        embeds = (clean.cache["embed"], corrupt.cache["embed"])
        rows = gradient_rows(model, len(pair.clean), n_steps, budget)
        grads = integrated_gradients(model, bound, sites, n_steps, embeds, schedule, rows)
        node = {
            s: _node_scores((clean.cache[s][0] - corrupt.cache[s][0]) * grads[s], kind, per_position) for s in sites
        }
        width = max(len(group) for group in groups) if kind == "moe.expert" else 1
        scores = [
            torch.cat([node[s] for s in group], -1)
            if group
            else torch.zeros(len(pair.clean) if per_position else 1, width)
            for group in groups
        ]
        return torch.stack([s.cpu() for s in scores]), baselines

    totals = None
    per_pair = []
    with progress_bar(f"{method} ({component})", total=len(token_pairs)) as advance:
        # Under torchrun, pairs go round-robin to the ranks and add up in order on each.
        for scores, baselines in distributed.ordered_map(token_pairs, run_pair):
            totals = scores if totals is None else totals + scores
            per_pair.append(baselines)
            advance(1)
    baselines = Baselines.mean(per_pair)
    scores = baselines.normalise(totals / len(token_pairs), difference=True).float()
    tokens = [model.tokenizer.decode(t) for t in token_pairs[0].clean] if model.tokenizer and per_position else []
    return PatchResult(
        scores,
        component,
        per_position,
        "denoising",
        metric.name,
        baselines.clean,
        baselines.corrupt,
        method=method,
        tokens=tokens,
    )


def _node_scores(product: Tensor, kind: str, per_position: bool) -> Tensor:
    """[pos, ...] elementwise products -> [n_pos or 1, n_heads or 1]."""
    if kind == "attn.z":
        scores = product.sum(-1)  # [pos, heads]
    else:
        scores = product.sum(-1, keepdim=True)  # [pos, 1]
    return scores if per_position else scores.sum(0, keepdim=True)

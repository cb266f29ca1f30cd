"""Edge attribution: EAP (Syed et al. 2023, "Attribution Patching Outperforms Automated Circuit
Discovery") and EAP-IG (Hanna et al. 2024, "Have Faith in Faithfulness") scores of every edge of
the computational graph between the input, attention heads, MLPs and the logits.

Nodes write to the residual stream (``input``: the embeddings entering layer 0; ``a{L}.h{H}``:
head H's output ``z_H W_O[H]``; ``m{L}``: the MLP output) and read from it (each head's q, k
and v inputs separately, each MLP's input, the logits). The score of an edge u -> v is

    (out_u(clean) - out_u(corrupt)) . dM/d in_v

summed over positions, where ``dM/d in_v`` is the gradient with respect to v's own copy of the
residual stream (as with TransformerLens's split q/k/v inputs in the EAP-IG code): the
gradient at v's projection output, through v's rows of the projection weight and the
norm's Jacobian. EAP-IG averages that gradient over inputs interpolated from corrupted to
clean (:func:`lmscope.circuits.attribution.interpolations`). With grouped-query attention
each query head reads its own copy of the shared key/value heads (keys and values are
expanded per query head while the gradients are taken), so k/v edges are per query head.

Pairs follow the protocol of :mod:`lmscope.circuits.pairs`: the metric is bound once per pair,
scores are averaged over pairs and divided by M(clean) - M(corrupt) of the averaged baselines.

By the chain rule, the scores of all edges leaving a node sum to that node's attribution
score (:func:`lmscope.circuits.attribution.attribute`), which the tests check, and against a
plain-autograd reference.

In Gemma 2/3 and OLMo 2 a post-norm scales the attention output before it joins the
residual stream; a head's contribution is its share ``z_h W_O[h]`` times that norm's scale,
computed from the whole attention output and held fixed (the contributions sum to what the
layer adds), and an MLP's is the post-feedforward norm's output. Where one norm covers all key
heads (OLMo 2 with grouped-query attention), each query head's keys come from its own input
copy through the whole key projection and that norm. The model's anatomy (per-head weights,
contributions, keys and values per query head) is :mod:`lmscope.core.anatomy`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmscope.circuits.attribution import gradient_rows, interpolations, step_bytes
from lmscope.circuits.metrics import Metric, get_metric
from lmscope.circuits.nodes import INPUT, LOGITS, head_node, mlp_node, parse_node
from lmscope.circuits.pairs import Baselines, BoundMetric, PromptPair, TokenPair, as_token_pairs, bind
from lmscope.core import distributed, memory
from lmscope.core.anatomy import (
    QKV,
    head_contributions,
    head_params,
    joint_k_norm,
    kv_head_of,
    mlp_contributions,
    per_query_heads,
    qkv_points,
    split_qkv,
)
from lmscope.core.hooks import Hook, hooked
from lmscope.core.model import Model
from lmscope.core.progress import progress_bar
from lmscope.core.weights import parameter


@dataclass
class EdgeScores:
    """Scores ``[n_upstream, n_downstream]`` (normalised by M(clean) - M(corrupt), as node
    scores are) and ``valid`` [same] marking real edges (upstream computed before downstream);
    ``clean`` and ``corrupt``: the metric's baselines, averaged over pairs."""

    upstream: list[str]
    downstream: list[str]
    scores: Tensor
    valid: Tensor
    metric: str
    clean: float
    corrupt: float

    def edges(self) -> list[tuple[str, str, float]]:
        """Every real edge as ``(from, to, score)``; ``to`` is ``a{L}.h{H}<q|k|v>``, ``m{L}`` or ``logits``."""
        index = self.valid.nonzero().tolist()
        return [(self.upstream[u], self.downstream[v], float(self.scores[u, v])) for u, v in index]

    def to_json(self) -> dict:
        """``{"metric": {"name", "clean", "corrupt"}, "edges": [{"from", "to", "score"}, ...]}``."""
        return {
            "metric": {"name": self.metric, "clean": self.clean, "corrupt": self.corrupt},
            "edges": [{"from": u, "to": v, "score": s} for u, v, s in self.edges()],
        }


def graph_nodes(model: Model) -> tuple[list[str], list[str], Tensor]:
    """Upstream and downstream node names and the validity mask [n_upstream, n_downstream] of
    edges between them (an edge is valid when its upstream node writes before its downstream
    node reads; with a parallel residual, a layer's MLP does not read its attention)."""
    L, H = model.n_layers, model.n_heads
    parallel = model.parallel_residual
    up = [INPUT] + [n for layer in range(L) for n in [head_node(layer, h) for h in range(H)] + [mlp_node(layer)]]
    down = [
        n for layer in range(L) for n in [head_node(layer, h, t) for t in QKV for h in range(H)] + [mlp_node(layer)]
    ]
    down.append(LOGITS)

    def writes(name: str) -> float:  # the layer position at which a node writes (input: -1)
        node = parse_node(name)
        if node.kind == INPUT:
            return -1.0
        return node.layer + (0.0 if node.kind == "head" else 0.5)

    def reads(name: str) -> float:
        node = parse_node(name)
        if node.kind == LOGITS:
            return float(L)
        return node.layer + (0.0 if node.kind == "head" or parallel else 0.5)

    w = torch.tensor([writes(n) for n in up])
    r = torch.tensor([reads(n) for n in down])
    return up, down, w[:, None] < r[None, :]


def _norm_vjp(norm, x: Tensor, cotangents: Tensor) -> Tensor:
    """J_norm(x)^T applied to each of ``cotangents`` [n, *x.shape] (identity without a norm):
    one forward of the norm, then a batched backward (a plain forward, so modules whose weights
    accelerate loads on the fly work too)."""
    if norm is None:
        return cotangents
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grads,) = torch.autograd.grad(norm(x), x, cotangents, is_grads_batched=True)
    return grads


def _chunking(model: Model, length: int, steps: int, budget: int, fixed: int, n_down: int) -> tuple[int, bool]:
    """Steps per backward and whether to hold the step-summed input gradients of every downstream
    node ([V, T, d], float32) until the last chunk, contracting them with the upstream outputs
    once (faster), rather than after each chunk (the least memory)."""
    rows = gradient_rows(model, length, steps, budget, edges=True, fixed=fixed)
    if rows >= steps:
        return rows, False  # one chunk: nothing to hold
    held = n_down * length * model.d_model * 4
    if budget - fixed - held >= step_bytes(model, length, edges=True):
        return gradient_rows(model, length, steps, budget, edges=True, fixed=fixed + held), True
    return rows, False


def _edge_scores(
    model: Model,
    pair: TokenPair,
    bound: BoundMetric,
    steps: int,
    embeds,
    upstream: Tensor,
    schedule: str = "upstream",
    rows: int = 16,
    hold: bool = False,
) -> Tensor:
    """Unnormalised edge scores of one pair, [U, V] float64: ``upstream`` [U, T, d] (each upstream
    node's clean - corrupted output) dotted with the mean over interpolation steps (``schedule``:
    see :func:`interpolations`) of dM/d in_v for every downstream input v. ``rows`` interpolation
    steps run per forward and backward; each layer's input gradients, [3H, rows, T, d] at most,
    are summed over steps and contracted with ``upstream`` at once, so the gradients of all
    downstream inputs ([V, T, d]) are never held together (as the EAP-IG code's backward hooks),
    unless ``hold``: then their step sums are kept over the chunks and contracted once."""
    fam, L = model.family, model.n_layers
    total = None
    last = f"blocks.{L - 1}.resid_post"
    sites = [last] + [f"blocks.{layer}.mlp.in" for layer in range(L)]

    flat_upstream = upstream.flatten(1)  # [U, T * d]

    def contract(grads: Tensor) -> Tensor:  # [v, T, d] -> [U, v] float64 (one matmul)
        return (flat_upstream @ grads.to(upstream).flatten(1).T).double().cpu()

    def keep(grads: Tensor) -> Tensor:  # a layer's input gradients, summed over the chunk's steps
        return grads.to(upstream) if hold else contract(grads)

    for inputs, interpolate in interpolations(model, pair, steps, rows, embeds, schedule):
        saved: list[dict] = [{"out": {}} for _ in range(L)]
        with per_query_heads(model, expand=True), hooked(model, _grad_hooks(model, saved)), model.frozen():
            run = model.run(inputs, capture=sites, interventions=[interpolate], grad=True, logits="last")
            bound(run.logits[:, -1]).sum().backward()
        columns = []
        for layer in range(L):
            s = saved[layer]
            g = split_qkv(model, layer, {name: out.grad for name, out in s["out"].items()})
            attn_norm = model.layer_module(layer, fam.attn_norm) if fam.attn_norm else None
            mlp_norm = model.layer_module(layer, fam.mlp_norm) if fam.mlp_norm else None
            with torch.no_grad():
                parts = [torch.einsum("sthd,hde->hste", g[t], head_params(model, layer, t)[0]) for t in QKV]
            k_norm = joint_k_norm(model, layer)
            if k_norm is not None:  # back through the joint key norm, then the whole k projection
                parts[1] = _through_joint_norm(model, layer, k_norm, s["k_in"], g["k"])
            per_head = torch.cat(parts)  # [3H, S, T, d] in the normalised space
            del parts, g
            heads = _norm_vjp(attn_norm, s["attn_in"], per_head).detach().sum(1)  # [3H, T, d]
            del per_head
            mlp = _norm_vjp(mlp_norm, s["mlp_in"], run.cache[f"blocks.{layer}.mlp.in"].grad[None]).detach().sum(1)
            columns += [keep(heads), keep(mlp)]
            saved[layer] = None  # free this layer's activations before the next
        columns.append(keep(run.cache[last].grad.detach().sum(0)[None]))
        del run, saved
        # held: step sums of the input gradients [V, T, d]; else this chunk's scores [U, V]
        chunk = torch.cat(columns, 0 if hold else 1)
        total = chunk if total is None else total + chunk
    return (contract(total) if hold else total) / steps


def _through_joint_norm(model: Model, layer: int, norm, k_in: Tensor, g_k: Tensor) -> Tensor:
    """Input gradient of each query head's keys, [H, S, T, d], from the gradients at the joint
    key norm's (expanded) output g_k [S, T, H, D] and that norm's input k_in [S, T, K * D]."""
    H, K, D = model.n_heads, model.n_kv_heads_of(layer), model.d_head_of(layer)
    cot = g_k.new_zeros(H, *k_in.shape).unflatten(-1, (K, D))  # [H, S, T, K, D]
    cot[torch.arange(H), :, :, kv_head_of(model, layer)] = g_k.permute(2, 0, 1, 3)
    through = _norm_vjp(norm, k_in, cot.flatten(-2))  # [H, S, T, K * D]
    proj = model.layer_module(layer, model.family.k_proj)
    return torch.einsum("hstk,kd->hstd", through, parameter(proj))


def _grad_hooks(model: Model, saved: list[dict]) -> list[Hook]:
    """Hooks that keep, during one forward, each layer's q/k/v projection outputs (with their
    gradients retained; the joint key norm's output for k where there is one), that norm's
    input, and the residual streams attention and the MLP read (before their norms)."""

    def keep_grad(store: dict, name: str) -> Callable:
        def fn(x: Tensor) -> None:
            x.retain_grad()
            store[name] = x

        return fn

    def keep_input(store: dict, key: str) -> Callable:
        def fn(x: Tensor) -> None:
            store[key] = x.detach()

        return fn

    hooks = []
    for layer in range(model.n_layers):
        s = saved[layer]
        hooks += [Hook(point, layer, keep_grad(s["out"], name)) for name, point in qkv_points(model, layer).items()]
        if joint_k_norm(model, layer) is not None:
            hooks.append(Hook("attn.k_norm.in", layer, keep_input(s, "k_in")))
        hooks.append(Hook("attn.resid_in", layer, keep_input(s, "attn_in")))
        hooks.append(Hook("mlp.resid_in", layer, keep_input(s, "mlp_in")))
    return hooks


def edge_attribution(
    model: Model,
    pairs: Sequence[PromptPair] | Sequence[TokenPair],
    metric: str | Metric = "logit_diff",
    steps: int = 100,
    schedule: str = "upstream",
    max_memory: int | str | dict | None = None,
) -> EdgeScores:
    """EAP-IG edge scores (Hanna et al. 2024; ``steps=1``: plain EAP, Syed et al. 2023, with
    gradients at the corrupted input), averaged over pairs and normalised by M(clean) -
    M(corrupt). ``pairs``: token pairs, or prompt pairs of equal token length (align pairs of
    different lengths with :func:`lmscope.circuits.pairs.tokenize_pairs` first). ``schedule``:
    ``"upstream"`` integrates over k = 0..steps-1 as the EAP-IG code, ``"paper"`` over
    k = 1..steps as the Temporal Heads code's vendored copy (:func:`interpolations`).
    ``max_memory``: the working-memory budget (a size, accelerate's per-device dict, or None:
    half the free memory of the model's device), which sets the steps per backward
    (:func:`~lmscope.circuits.attribution.gradient_rows`)."""
    budget = memory.budget(model.device, max_memory)
    metric = get_metric(metric)
    token_pairs = as_token_pairs(model, pairs)
    up, down, valid = graph_nodes(model)
    L = model.n_layers
    sites = ["embed", "blocks.0.resid_pre"] + [f"blocks.{layer}.attn.z" for layer in range(L)]

    def run_pair(pair: TokenPair) -> tuple[Tensor, tuple[float, float]]:
        """One pair's unnormalised edge scores [U, V] (float64) and (M(clean), M(corrupt))."""
        with torch.no_grad():
            with mlp_contributions(model) as clean_mlp:
                clean = model.run(pair.inputs("clean", model.device), capture=sites, logits="last")
            with mlp_contributions(model) as corrupt_mlp:
                corrupt = model.run(pair.inputs("corrupt", model.device), capture=sites, logits="last")
            outs = [clean.cache["blocks.0.resid_pre"] - corrupt.cache["blocks.0.resid_pre"]]
            for layer in range(L):
                z = f"blocks.{layer}.attn.z"
                heads = head_contributions(model, layer, clean.cache[z]) - head_contributions(
                    model, layer, corrupt.cache[z]
                )
                outs += [heads[:, 0], (clean_mlp[layer] - corrupt_mlp[layer])]
            upstream = torch.cat(outs)  # [U, T, d]
        bound = bind(metric, pair, clean.logits[0, -1])
        baselines = (float(bound(clean.logits[:, -1])[0]), float(bound(corrupt.logits[:, -1])[0]))
        embeds = (clean.cache["embed"], corrupt.cache["embed"])
        del clean, corrupt, clean_mlp, corrupt_mlp, outs
        rows, hold = _chunking(model, len(pair.clean), steps, budget, fixed=upstream.numel() * 4, n_down=len(down))
        return _edge_scores(model, pair, bound, steps, embeds, upstream.float(), schedule, rows, hold), baselines

    total = torch.zeros(len(up), len(down), dtype=torch.float64)
    per_pair = []
    with progress_bar("EAP-IG edges", total=len(token_pairs)) as advance:
        # Under torchrun, pairs go round-robin to the ranks and add up in order on each.
        for scores, baselines in distributed.ordered_map(token_pairs, run_pair):
            total += scores
            per_pair.append(baselines)
            advance(1)
    baselines = Baselines.mean(per_pair, check=True)
    scores = baselines.normalise(total / len(token_pairs), difference=True).float() * valid
    return EdgeScores(up, down, scores, valid, metric.name, baselines.clean, baselines.corrupt)

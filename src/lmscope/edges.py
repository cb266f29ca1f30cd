"""Edge attribution: EAP (Syed et al. 2023) and EAP-IG (Hanna et al. 2024) scores of every
edge of the computational graph between the input, attention heads, MLPs and the logits.

Nodes write to the residual stream (``input``: the embeddings entering layer 0; ``a{L}.h{H}``:
head H's output ``z_H W_O[H]``; ``m{L}``: the MLP output) and read from it (each head's q, k
and v inputs separately, each MLP's input, the logits). The score of an edge u -> v is

    (out_u(clean) - out_u(corrupt)) . dM/d in_v

summed over positions, where ``dM/d in_v`` is the gradient with respect to v's own copy of the
residual stream (as with TransformerLens's split q/k/v inputs in the EAP-IG code): the
gradient at v's projection output, through v's rows of the projection weight and the
norm's Jacobian. EAP-IG averages that gradient over inputs interpolated from corrupted to
clean (as :func:`lmscope.attribution.integrated_gradients`). With grouped-query attention
each query head reads its own copy of the shared key/value heads (keys and values are
expanded per query head while the gradients are taken), so k/v edges are per query head.

By the chain rule, the scores of all edges leaving a node sum to that node's attribution
score (:func:`lmscope.attribution.attribute`), which the tests check.

Supported where attention and MLP outputs enter the residual stream directly (not through a
post-norm: Gemma 2/3 and OLMo 2 are refused), with separate k/v projections for
grouped-query attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor

from lmscope.attribution import _final_metric, _inputs
from lmscope.errors import LmscopeError
from lmscope.interventions import apply
from lmscope.metrics import Metric, get_metric
from lmscope.patching import as_token_pairs
from lmscope.progress import progress_bar
from lmscope.tasks import PromptPair, TokenPair

QKV = ("q", "k", "v")


@dataclass
class EdgeScores:
    """Scores ``[n_upstream, n_downstream]`` (normalised by M(clean) - M(corrupt), as node
    scores are) and ``valid`` [same] marking real edges (upstream computed before downstream)."""

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


def graph_nodes(model) -> tuple[list[str], list[str], Tensor]:
    """Upstream and downstream node names and the validity mask of edges between them."""
    L, H = model.n_layers, model.n_heads
    parallel = bool(model.family.parallel_residual and getattr(model.hf.config, model.family.parallel_residual, False))
    up = ["input"] + [n for layer in range(L) for n in [f"a{layer}.h{h}" for h in range(H)] + [f"m{layer}"]]
    down = [n for layer in range(L) for n in [f"a{layer}.h{h}<{t}>" for t in QKV for h in range(H)] + [f"m{layer}"]] + [
        "logits"
    ]

    def writes(name: str) -> float:  # the layer position at which a node writes (input: -1)
        if name == "input":
            return -1.0
        layer = int(name[1:].split(".")[0])
        return layer + (0.0 if name.startswith("a") else 0.5)

    def reads(name: str) -> float:
        if name == "logits":
            return float(L)
        layer = int(name[1:].split(".")[0].split("<")[0])
        return layer + (0.0 if name.startswith("a") or parallel else 0.5)

    w = torch.tensor([writes(n) for n in up])
    r = torch.tensor([reads(n) for n in down])
    return up, down, w[:, None] < r[None, :]


def _check_supported(model) -> None:
    fam = model.family
    if fam.attn_contrib not in (fam.attn, "resid_attn_dropout", "post_attention_dropout"):
        raise LmscopeError(
            f"edge attribution needs attention outputs that enter the residual stream directly; "
            f"{model.hf.config.model_type} normalises them first (use node-level scores)"
        )
    if model.n_kv_heads != model.n_heads and fam.qkv_proj is not None:
        raise LmscopeError("edge attribution with grouped-query attention needs separate k/v projections")


def _head_index(model, t: str) -> Tensor:
    """Rows of the projection output (of ``t``'s own projection, or the fused one) that query
    head h uses for input ``t``: [n_heads, d_head]. Grouped k/v heads repeat within a group."""
    fam, H, K, D = model.family, model.n_heads, model.n_kv_heads, model.d_head
    if fam.qkv_layout == "per_head" and fam.qkv_proj is not None:
        return torch.arange(H * 3 * D).view(H, 3, D)[:, QKV.index(t)]
    n = H if t == "q" else K
    offset = 0 if fam.qkv_proj is None else {"q": 0, "k": H * D, "v": H * D + K * D}[t]
    index = offset + torch.arange(n * D).view(n, D)
    return index.repeat_interleave(H // n, dim=0)


def _projection(model, layer: int, t: str):
    fam = model.family
    path = fam.qkv_proj or {"q": fam.q_proj, "k": fam.k_proj, "v": fam.v_proj}[t]
    return model.layer_module(layer, path)


def _head_params(model, layer: int, t: str) -> tuple[Tensor, Tensor | None]:
    """Weight rows [n_heads, d_head, d_model] and bias [n_heads, d_head] (or None) that each
    query head reads for input ``t``."""
    proj = _projection(model, layer, t)
    weight = proj.weight.T if model.family.conv1d else proj.weight  # [out, d_model]
    index = _head_index(model, t)
    return weight[index], (None if proj.bias is None else proj.bias[index])


def _weight_rows(model, layer: int, t: str) -> Tensor:
    """Projection weight rows read by each query head for input ``t``: [n_heads, d_head, d_model]."""
    return _head_params(model, layer, t)[0]


def _projection_grads(model, layer: int, outputs: dict) -> dict[str, Tensor]:
    """Gradients at each query head's q/k/v projection output: t -> [S, T, n_heads, d_head]."""
    fam, H, K, D = model.family, model.n_heads, model.n_kv_heads, model.d_head
    if fam.qkv_proj is None:
        return {t: outputs[t].grad.unflatten(-1, (H, D)) for t in QKV}
    g = outputs["qkv"].grad
    if fam.qkv_layout == "per_head":
        per = g.unflatten(-1, (H, 3, D))
        return {t: per[..., i, :] for i, t in enumerate(QKV)}
    parts = g.split([H * D, K * D, K * D], dim=-1)
    return {t: p.unflatten(-1, (-1, D)) for t, p in zip(QKV, parts)}


def _norm_vjp(norm, x: Tensor, cotangents: Tensor) -> Tensor:
    """J_norm(x)^T applied to each of ``cotangents`` [n, *x.shape] (identity without a norm)."""
    if norm is None:
        return cotangents
    _, vjp = torch.func.vjp(norm, x)
    return torch.vmap(lambda c: vjp(c)[0])(cotangents)


def _edge_gradients(model, pair: TokenPair, metric: Metric, steps: int, clean_logprobs, batch: int = 16) -> Tensor:
    """Mean over interpolation steps of dM/d in_v for every downstream input v: [V, T, d_model]."""
    fam, L, H = model.family, model.n_layers, model.n_heads
    group = H // model.n_kv_heads
    corrupt_emb = model.run(_inputs(pair.corrupt, pair.corrupt_mask), capture=["embed"]).cache["embed"]
    clean_emb = model.run(_inputs(pair.clean, pair.clean_mask), capture=["embed"]).cache["embed"]
    delta = clean_emb - corrupt_emb
    total = None
    last = f"blocks.{L - 1}.resid_post"
    for first in range(0, steps, batch):
        alphas = torch.arange(first, min(first + batch, steps), dtype=delta.dtype, device=delta.device) / steps
        S = len(alphas)
        saved: list[dict] = [{} for _ in range(L)]
        with ExitStack() as stack:
            for layer in range(L):
                stack.enter_context(_grad_hooks(model, layer, saved[layer], group))
            interpolate = apply("embed", lambda x, a=alphas: corrupt_emb + a[:, None, None] * delta)
            ids = {
                "input_ids": pair.corrupt[None].expand(S, -1),
                "attention_mask": pair.corrupt_mask[None].expand(S, -1),
            }
            sites = [last] + [f"blocks.{layer}.mlp.in" for layer in range(L)]
            run = model.run(ids, capture=sites, interventions=[interpolate], grad=True)
            _final_metric(metric, run.logits, pair, clean_logprobs).sum().backward()
        grads = []
        for layer in range(L):
            s = saved[layer]
            g = _projection_grads(model, layer, s["out"])
            attn_norm = model.layer_module(layer, fam.attn_norm) if fam.attn_norm else None
            mlp_norm = model.layer_module(layer, fam.mlp_norm) if fam.mlp_norm else None
            with torch.no_grad():
                per_head = torch.cat(
                    [torch.einsum("sthd,hde->hste", g[t], _weight_rows(model, layer, t)) for t in QKV]
                )  # [3H, S, T, d] in the normalised space
            heads = _norm_vjp(attn_norm, s["attn_in"], per_head)
            mlp = _norm_vjp(mlp_norm, s["mlp_in"], run.cache[f"blocks.{layer}.mlp.in"].grad[None])
            grads += [heads, mlp]
        grads.append(run.cache[last].grad[None])
        step_sum = torch.cat(grads).detach().sum(1)  # [V, T, d]
        total = step_sum if total is None else total + step_sum
    model.hf.zero_grad(set_to_none=True)
    return total / steps


class _grad_hooks:
    """During one forward: keep the q/k/v projection outputs (with gradients; k and v expanded
    to one copy per query head) and the inputs of the layer's two norms."""

    def __init__(self, model, layer: int, saved: dict, group: int):
        self.model, self.layer, self.saved, self.group = model, layer, saved, group
        self.handles: list = []

    def __enter__(self):
        m, fam, saved = self.model, self.model.family, self.saved
        at = lambda p: m.layer_module(self.layer, p)
        saved["out"] = {}

        def keep(name, expand):
            def hook(mod, args, out):
                if expand:
                    out = out.unflatten(-1, (-1, m.d_head)).repeat_interleave(self.group, dim=-2).flatten(-2)
                out.retain_grad()
                saved["out"][name] = out
                return out

            return hook

        paths = {"qkv": fam.qkv_proj} if fam.qkv_proj else {"q": fam.q_proj, "k": fam.k_proj, "v": fam.v_proj}
        for name, path in paths.items():
            expand = name in ("k", "v") and self.group > 1
            self.handles.append(at(path).register_forward_hook(keep(name, expand)))

        def inputs(key):
            def hook(mod, args, kwargs):
                saved[key] = (args[0] if args else kwargs["hidden_states"]).detach()

            return hook

        self.handles.append(
            at(fam.attn_norm or fam.attn).register_forward_pre_hook(inputs("attn_in"), with_kwargs=True)
        )
        self.handles.append(at(fam.mlp_norm or fam.mlp).register_forward_pre_hook(inputs("mlp_in"), with_kwargs=True))
        self.attn = at(fam.attn)
        self.groups = getattr(self.attn, "num_key_value_groups", None)
        if self.group > 1:
            self.attn.num_key_value_groups = 1  # k/v now have one head per query head
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        if self.groups is not None:
            self.attn.num_key_value_groups = self.groups
        return False


def edge_attribution(
    model,
    pairs: Sequence[PromptPair] | Sequence[TokenPair],
    metric: str | Metric = "logit_diff",
    steps: int = 100,
    align: str = "strict",
) -> EdgeScores:
    """EAP-IG edge scores (``steps=1``: plain EAP, gradients at the corrupted input),
    averaged over pairs and normalised by M(clean) - M(corrupt)."""
    _check_supported(model)
    metric = get_metric(metric)
    token_pairs = as_token_pairs(model, pairs, align)
    up, down, valid = graph_nodes(model)
    L, H, D = model.n_layers, model.n_heads, model.d_head
    fam = model.family
    sites = ["blocks.0.resid_pre"] + [f"blocks.{layer}.{k}" for layer in range(L) for k in ("attn.z", "mlp.out")]
    total = torch.zeros(len(up), len(down), dtype=torch.float64)
    clean_total = corrupt_total = 0.0
    with progress_bar("EAP-IG edges", total=len(token_pairs)) as advance:
        for pair in token_pairs:
            with torch.no_grad():
                clean = model.run(_inputs(pair.clean, pair.clean_mask), capture=sites)
                corrupt = model.run(_inputs(pair.corrupt, pair.corrupt_mask), capture=sites)
                diff = {s: clean.cache[s][0] - corrupt.cache[s][0] for s in sites}
                outs = [diff["blocks.0.resid_pre"][None]]
                for layer in range(L):
                    o = model.layer_module(layer, fam.o_proj).weight
                    w_o = (o if fam.conv1d else o.T).unflatten(0, (H, D))  # [H, D, d]
                    outs.append(torch.einsum("thd,hde->hte", diff[f"blocks.{layer}.attn.z"], w_o))
                    outs.append(diff[f"blocks.{layer}.mlp.out"][None])
                upstream = torch.cat(outs)  # [U, T, d]
            clean_logprobs = clean.logits[0, -1].log_softmax(-1)
            clean_total += float(_final_metric(metric, clean.logits, pair, clean_logprobs)[0])
            corrupt_total += float(_final_metric(metric, corrupt.logits, pair, clean_logprobs)[0])
            downstream = _edge_gradients(model, pair, metric, steps, clean_logprobs)
            total += torch.einsum("utd,vtd->uv", upstream.double(), downstream.double())
            advance(1)
    n = len(token_pairs)
    clean_m, corrupt_m = clean_total / n, corrupt_total / n
    if clean_m == corrupt_m:
        raise LmscopeError(f"the metric is the same on clean and corrupted prompts ({clean_m:.4g})")
    scores = (total / n / (clean_m - corrupt_m)).float() * valid
    return EdgeScores(up, down, scores, valid, metric.name, clean_m, corrupt_m)

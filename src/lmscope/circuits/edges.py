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
clean (as :func:`lmscope.circuits.attribution.integrated_gradients`). With grouped-query attention
each query head reads its own copy of the shared key/value heads (keys and values are
expanded per query head while the gradients are taken), so k/v edges are per query head.

By the chain rule, the scores of all edges leaving a node sum to that node's attribution
score (:func:`lmscope.circuits.attribution.attribute`), which the tests check.

In Gemma 2/3 and OLMo 2 a post-norm scales the attention output before it joins the
residual stream; a head's contribution is its share ``z_h W_O[h]`` times that norm's scale,
computed from the whole attention output and held fixed (the contributions sum to what the
layer adds), and an MLP's is the post-feedforward norm's output. Where one norm covers all key
heads (OLMo 2 with grouped-query attention), each query head's keys come from its own input
copy through the whole key projection and that norm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmscope.circuits.attribution import _final_metric, _inputs, interpolations
from lmscope.circuits.metrics import Metric, get_metric
from lmscope.circuits.pairs import PromptPair, TokenPair
from lmscope.circuits.patching import as_token_pairs
from lmscope.core.errors import LmscopeError
from lmscope.core.progress import progress_bar

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


@contextlib.contextmanager
def per_query_heads(model, expand: bool):
    """Keys and values per query head (grouped-query attention only): the attention modules
    treat k and v as having ``n_heads`` heads; with ``expand``, the k/v projection outputs are
    repeated within each group (otherwise the caller's own projection hooks produce them)."""
    H, K, D, fam = model.n_heads, model.n_kv_heads, model.d_head, model.family
    if H == K:
        yield
        return
    saved, handles = [], []

    def repeat(x: Tensor) -> Tensor:
        return x.unflatten(-1, (K, D)).repeat_interleave(H // K, dim=-2).flatten(-2)

    def fused(mod, args, out):
        q, k, v = out.split([H * D, K * D, K * D], dim=-1)
        return torch.cat([q, repeat(k), repeat(v)], dim=-1)

    try:
        for layer in range(model.n_layers):
            attn = model.layer_module(layer, fam.attn)
            for name, value in (("num_key_value_groups", 1), ("num_key_value_heads", H)):
                if hasattr(attn, name):
                    saved.append((attn, name, getattr(attn, name)))
                    setattr(attn, name, value)
            if expand and fam.qkv_proj:
                handles.append(model.layer_module(layer, fam.qkv_proj).register_forward_hook(fused))
            elif expand:
                k_module = joint_k_norm(model, layer) or model.layer_module(layer, fam.k_proj)
                for module in (k_module, model.layer_module(layer, fam.v_proj)):
                    handles.append(module.register_forward_hook(lambda m, a, o: repeat(o)))
        yield
    finally:
        for h in handles:
            h.remove()
        for attn, name, value in saved:
            setattr(attn, name, value)


def joint_k_norm(model, layer: int):
    """The key norm of a grouped-query attention layer that normalises all key heads together
    (OLMo 2), or None. Such a norm sits between k_proj and the heads, so a query head's keys are
    computed from its own input copy through the whole projection and norm."""
    norm = getattr(model.layer_module(layer, model.family.attn), "k_norm", None)
    if model.n_kv_heads == model.n_heads or norm is None:
        return None
    return norm if norm.weight.numel() == model.n_kv_heads * model.d_head else None


def head_contributions(model, layer: int, z: Tensor) -> Tensor:
    """What each head writes to the residual stream, [n_heads, ..., pos, d_model], from z
    [..., pos, n_heads, d_head]: ``z_h W_O[h]``, times the post-attention norm's scale (computed
    from the whole attention output, then held fixed) in Gemma 2/3 and OLMo 2, so the heads'
    contributions sum to what the layer adds."""
    fam, H, D = model.family, model.n_heads, model.d_head
    o = model.layer_module(layer, fam.o_proj)
    w_o = (o.weight if fam.conv1d else o.weight.T).unflatten(0, (H, D))  # [H, D, d]
    per_head = torch.einsum("...hd,hde->h...e", z, w_o)
    if "norm" not in fam.attn_contrib:
        return per_head
    total = per_head.sum(0) + (o.bias if o.bias is not None else 0)
    return per_head * _norm_scale(model.layer_module(layer, fam.attn_contrib), total)


def _norm_scale(norm, x: Tensor) -> Tensor:
    """The elementwise factor an RMS norm multiplies ``x`` by: gain / rms(x)."""
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
    gain = norm(torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)) * (1 + eps) ** 0.5
    return gain * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


@contextlib.contextmanager
def mlp_contributions(model):
    """Records what each MLP adds to the residual stream (the output of ``family.mlp_contrib``)
    during the forwards run inside; yields the list, one tensor per layer."""
    outputs: list = [None] * model.n_layers

    def keep(layer):
        def hook(mod, args, out):
            outputs[layer] = out

        return hook

    handles = [
        model.layer_module(layer, model.family.mlp_contrib).register_forward_hook(keep(layer))
        for layer in range(model.n_layers)
    ]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


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


def head_params(model, layer: int, t: str) -> tuple[Tensor, Tensor | None]:
    """Weight rows [n_heads, d_head, d_model] and bias [n_heads, d_head] (or None) that each
    query head reads for input ``t``."""
    proj = _projection(model, layer, t)
    weight = proj.weight.T if model.family.conv1d else proj.weight  # [out, d_model]
    index = _head_index(model, t)
    return weight[index], (None if proj.bias is None else proj.bias[index])


def _projection_grads(model, outputs: dict) -> dict[str, Tensor]:
    """Gradients at each query head's q/k/v projection output (k/v expanded per query head):
    t -> [S, T, n_heads, d_head]."""
    fam, H, D = model.family, model.n_heads, model.d_head
    if fam.qkv_proj is None:
        return {t: outputs[t].grad.unflatten(-1, (H, D)) for t in QKV}
    g = outputs["qkv"].grad
    if fam.qkv_layout == "per_head":
        per = g.unflatten(-1, (H, 3, D))
        return {t: per[..., i, :] for i, t in enumerate(QKV)}
    return {t: p.unflatten(-1, (H, D)) for t, p in zip(QKV, g.split(H * D, dim=-1))}


def _norm_vjp(norm, x: Tensor, cotangents: Tensor) -> Tensor:
    """J_norm(x)^T applied to each of ``cotangents`` [n, *x.shape] (identity without a norm)."""
    if norm is None:
        return cotangents
    _, vjp = torch.func.vjp(norm, x)
    return torch.vmap(lambda c: vjp(c)[0])(cotangents)


def _edge_gradients(model, pair: TokenPair, metric: Metric, steps: int, clean_logprobs, embeds) -> Tensor:
    """Mean over interpolation steps of dM/d in_v for every downstream input v: [V, T, d_model]."""
    fam, L = model.family, model.n_layers
    total = None
    last = f"blocks.{L - 1}.resid_post"
    sites = [last] + [f"blocks.{layer}.mlp.in" for layer in range(L)]
    for inputs, interpolate in interpolations(model, pair, steps, embeds=embeds):
        saved: list[dict] = [{} for _ in range(L)]
        with per_query_heads(model, expand=True), _grad_hooks(model, saved):
            run = model.run(inputs, capture=sites, interventions=[interpolate], grad=True)
            _final_metric(metric, run.logits, pair, clean_logprobs).sum().backward()
        grads = []
        for layer in range(L):
            s = saved[layer]
            g = _projection_grads(model, s["out"])
            attn_norm = model.layer_module(layer, fam.attn_norm) if fam.attn_norm else None
            mlp_norm = model.layer_module(layer, fam.mlp_norm) if fam.mlp_norm else None
            with torch.no_grad():
                parts = [torch.einsum("sthd,hde->hste", g[t], head_params(model, layer, t)[0]) for t in QKV]
            k_norm = joint_k_norm(model, layer)
            if k_norm is not None:  # back through the joint key norm, then the whole k projection
                parts[1] = _through_joint_norm(model, layer, k_norm, s["k_in"], g["k"])
            per_head = torch.cat(parts)  # [3H, S, T, d] in the normalised space
            heads = _norm_vjp(attn_norm, s["attn_in"], per_head)
            mlp = _norm_vjp(mlp_norm, s["mlp_in"], run.cache[f"blocks.{layer}.mlp.in"].grad[None])
            grads += [heads, mlp]
        grads.append(run.cache[last].grad[None])
        step_sum = torch.cat(grads).detach().sum(1)  # [V, T, d]
        total = step_sum if total is None else total + step_sum
    model.hf.zero_grad(set_to_none=True)
    return total / steps


def _through_joint_norm(model, layer: int, norm, k_in: Tensor, g_k: Tensor) -> Tensor:
    """Input gradient of each query head's keys, [H, S, T, d], from the gradients at the joint
    key norm's (expanded) output g_k [S, T, H, D] and that norm's input k_in [S, T, K * D]."""
    H, K, D = model.n_heads, model.n_kv_heads, model.d_head
    group = torch.arange(H) // (H // K)
    cot = g_k.new_zeros(H, *k_in.shape).unflatten(-1, (K, D))  # [H, S, T, K, D]
    cot[torch.arange(H), :, :, group] = g_k.permute(2, 0, 1, 3)
    through = _norm_vjp(norm, k_in, cot.flatten(-2))  # [H, S, T, K * D]
    proj = model.layer_module(layer, model.family.k_proj)
    return torch.einsum("hstk,kd->hstd", through, proj.weight)


@contextlib.contextmanager
def _grad_hooks(model, saved: list[dict]):
    """During one forward: keep each layer's q/k/v projection outputs (with gradients) and the
    inputs of its two norms."""
    fam = model.family
    handles = []

    def keep(layer, name):
        def hook(mod, args, out):
            out.retain_grad()
            saved[layer].setdefault("out", {})[name] = out

        return hook

    def inputs(layer, key):
        def hook(mod, args, kwargs):
            saved[layer][key] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    paths = {"qkv": fam.qkv_proj} if fam.qkv_proj else {"q": fam.q_proj, "k": fam.k_proj, "v": fam.v_proj}
    try:
        for layer in range(model.n_layers):
            at = lambda p, _layer=layer: model.layer_module(_layer, p)
            k_norm = joint_k_norm(model, layer)
            for name, path in paths.items():
                module = k_norm if name == "k" and k_norm is not None else at(path)
                handles.append(module.register_forward_hook(keep(layer, name)))
            if k_norm is not None:
                handles.append(k_norm.register_forward_pre_hook(inputs(layer, "k_in"), with_kwargs=True))
            for key, path in (("attn_in", fam.attn_norm or fam.attn), ("mlp_in", fam.mlp_norm or fam.mlp)):
                handles.append(at(path).register_forward_pre_hook(inputs(layer, key), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def edge_attribution(
    model,
    pairs: Sequence[PromptPair] | Sequence[TokenPair],
    metric: str | Metric = "logit_diff",
    steps: int = 100,
    align: str = "strict",
) -> EdgeScores:
    """EAP-IG edge scores (``steps=1``: plain EAP, gradients at the corrupted input),
    averaged over pairs and normalised by M(clean) - M(corrupt)."""
    metric = get_metric(metric)
    token_pairs = as_token_pairs(model, pairs, align)
    up, down, valid = graph_nodes(model)
    L = model.n_layers
    sites = ["embed", "blocks.0.resid_pre"] + [f"blocks.{layer}.attn.z" for layer in range(L)]
    total = torch.zeros(len(up), len(down), dtype=torch.float64)
    clean_total = corrupt_total = 0.0
    with progress_bar("EAP-IG edges", total=len(token_pairs)) as advance:
        for pair in token_pairs:
            with torch.no_grad():
                with mlp_contributions(model) as clean_mlp:
                    clean = model.run(_inputs(pair.clean, pair.clean_mask), capture=sites)
                with mlp_contributions(model) as corrupt_mlp:
                    corrupt = model.run(_inputs(pair.corrupt, pair.corrupt_mask), capture=sites)
                outs = [clean.cache["blocks.0.resid_pre"] - corrupt.cache["blocks.0.resid_pre"]]
                for layer in range(L):
                    z = f"blocks.{layer}.attn.z"
                    heads = head_contributions(model, layer, clean.cache[z]) - head_contributions(
                        model, layer, corrupt.cache[z]
                    )
                    outs += [heads[:, 0], (clean_mlp[layer] - corrupt_mlp[layer])]
                upstream = torch.cat(outs)  # [U, T, d]
            clean_logprobs = clean.logits[0, -1].log_softmax(-1)
            clean_total += float(_final_metric(metric, clean.logits, pair, clean_logprobs)[0])
            corrupt_total += float(_final_metric(metric, corrupt.logits, pair, clean_logprobs)[0])
            embeds = (clean.cache["embed"], corrupt.cache["embed"])
            downstream = _edge_gradients(model, pair, metric, steps, clean_logprobs, embeds)
            total += torch.einsum("utd,vtd->uv", upstream.double(), downstream.double())
            advance(1)
    n = len(token_pairs)
    clean_m, corrupt_m = clean_total / n, corrupt_total / n
    if clean_m == corrupt_m:
        raise LmscopeError(f"the metric is the same on clean and corrupted prompts ({clean_m:.4g})")
    scores = (total / n / (clean_m - corrupt_m)).float() * valid
    return EdgeScores(up, down, scores, valid, metric.name, clean_m, corrupt_m)

"""Circuits: select edges by score, prune what is left unconnected, measure faithfulness,
export the graph.

- selection: the top-n edges by |score|, or every edge with |score| >= threshold;
- pruning: keep only edges on a path from ``input`` to ``logits`` (a head's q, k and v inputs
  count as the head), repeated until nothing changes;
- faithfulness: run the model with every head and MLP outside the circuit
  interchange-ablated (its output patched from the corrupted run, at all positions) and report
  the metric C next to the full model's B, normalised as (C - M(corrupt)) / (B - M(corrupt)),
  and the CRS score of "Temporal Heads" (Park et al. 2025): 100 when C >= B, else
  100 * sf * exp(-|B - C| / |B|) with sf 1.0 when both are positive, 0.5 both negative,
  0.8 for B < 0 < C and 0.6 for B > 0 > C. An edge circuit ablates every edge outside it
  (as the EAP-IG code's ``evaluate_graph``); a node list ablates every head and MLP outside it.
- export: JSON with nodes ``input``, ``a{L}.h{H}``, ``m{L}``, ``logits`` and weighted edges,
  and a drawing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lmscope.circuits.edges import (
    QKV,
    EdgeScores,
    graph_nodes,
    head_contributions,
    head_params,
    joint_k_norm,
    mlp_contributions,
    per_query_heads,
)
from lmscope.circuits.metrics import Metric, get_metric
from lmscope.circuits.pairs import PromptPair, TokenPair
from lmscope.circuits.patching import as_token_pairs
from lmscope.core.errors import LmscopeError
from lmscope.core.interventions import Intervention, Site, _take


def node_of(name: str) -> str:
    """The graph node an edge endpoint belongs to: ``a3.h2<q>`` -> ``a3.h2``."""
    return name.split("<")[0]


@dataclass
class Circuit:
    """Selected edges ``(from, to, score)`` and the nodes they connect."""

    edges: list[tuple[str, str, float]]

    @property
    def nodes(self) -> list[str]:
        names = {node_of(n) for edge in self.edges for n in edge[:2]}
        return sorted(names, key=_order)

    def to_json(self) -> dict:
        return {
            "nodes": self.nodes,
            "edges": [
                {"from": u, "to": node_of(v), "input": v.split("<")[1][0] if "<" in v else None, "score": s}
                for u, v, s in self.edges
            ],
        }


def _order(name: str) -> tuple:
    if name == "input":
        return (-1, 0, 0)
    if name == "logits":
        return (10**9, 0, 0)
    layer = int(name[1:].split(".")[0])
    return (layer, 0 if name.startswith("a") else 1, int(name.split(".h")[1]) if ".h" in name else 0)


def select(scores: EdgeScores, top: int | None = None, threshold: float | None = None) -> Circuit:
    """Edges by top-n |score| or |score| >= threshold, then pruned (see :func:`prune`)."""
    if (top is None) == (threshold is None):
        raise LmscopeError("choose edges by exactly one of top-n or threshold")
    edges = sorted(scores.edges(), key=lambda e: -abs(e[2]))
    if top is not None:
        if top < 1:
            raise LmscopeError("--top must be at least 1")
        edges = edges[:top]
    else:
        edges = [e for e in edges if abs(e[2]) >= threshold]
    return prune(Circuit(edges))


def prune(circuit: Circuit) -> Circuit:
    """Drop edges not on a path from ``input`` to ``logits``, until nothing changes."""
    edges = list(circuit.edges)
    while True:
        reached = {"input"}
        for u, v, _ in sorted(edges, key=lambda e: _order(node_of(e[1]))):
            if u in reached:
                reached.add(node_of(v))
        useful = {"logits"}
        for u, v, _ in sorted(edges, key=lambda e: _order(e[0]), reverse=True):
            if node_of(v) in useful:
                useful.add(u)
        kept = [e for e in edges if e[0] in reached and e[0] in useful and node_of(e[1]) in useful]
        if len(kept) == len(edges):
            return Circuit(kept)
        edges = kept


def crs(baseline: float, circuit: float) -> float:
    """Circuit reproduction score of "Temporal Heads" (0-100)."""
    b, c = baseline, circuit
    if c >= b:
        return 100.0
    if b > 0 and c > 0:
        sf = 1.0
    elif b < 0 and c < 0:
        sf = 0.5
    elif b < 0 < c:
        sf = 0.8
    else:
        sf = 0.6
    return 100.0 * sf * math.exp(-abs(b - c) / abs(b)) if b != 0 else 0.0


@dataclass
class Faithfulness:
    baseline: float  # B: metric of the full model on the clean prompts
    circuit: float  # C: metric with everything outside the circuit patched from the corrupted run
    corrupt: float
    normalised: float
    crs: float


def ablate_outside(model, nodes: Sequence[str], corrupt_cache) -> list[Intervention]:
    """Interventions patching every head and MLP not in ``nodes`` from the corrupted run."""
    keep = set(nodes)
    ivs = []
    for layer in range(model.n_layers):
        heads = [h for h in range(model.n_heads) if f"a{layer}.h{h}" not in keep]
        if heads:
            site = Site("attn.z", layer)
            src = corrupt_cache[site.name]
            mask = torch.zeros(model.n_heads, dtype=torch.bool)
            mask[heads] = True

            def patch_heads(x, pos, _src=src, _site=site, _mask=mask):
                return torch.where(_mask.to(x.device)[:, None], _take(_src, _site, pos, x), x)

            ivs.append(Intervention(site, patch_heads))
        if f"m{layer}" not in keep:
            site = Site("mlp.out", layer)
            ivs.append(
                Intervention(site, lambda x, pos, _src=corrupt_cache[site.name], _s=site: _take(_src, _s, pos, x))
            )
    return ivs


def faithfulness(
    model,
    pairs: Sequence[PromptPair] | Sequence[TokenPair],
    circuit: Circuit | Sequence[str],
    metric: str | Metric = "logit_diff",
    align: str = "strict",
) -> Faithfulness:
    """Metric of the circuit vs the full model, on the clean prompts with everything outside
    the circuit interchange-ablated: for a :class:`Circuit`, every edge outside it (each
    downstream input reads the residual stream minus, for each missing edge u -> v,
    out_u(run) - out_u(corrupt), as the EAP-IG code's ``evaluate_graph``); for a list of
    node names, every head and MLP outside it."""
    metric = get_metric(metric)
    sites = ["blocks.0.resid_pre"] + [
        f"blocks.{layer}.{k}" for layer in range(model.n_layers) for k in ("attn.z", "mlp.out")
    ]
    b = c = k = 0.0
    token_pairs = as_token_pairs(model, pairs, align)
    for pair in token_pairs:
        clean = {"input_ids": pair.clean[None], "attention_mask": pair.clean_mask[None]}
        corrupt = {"input_ids": pair.corrupt[None], "attention_mask": pair.corrupt_mask[None]}
        clean_run = model.run(clean)
        with mlp_contributions(model) as corrupt_mlp:
            corrupt_run = model.run(corrupt, capture=sites)
        lp = clean_run.logits[0, -1].log_softmax(-1)
        if isinstance(circuit, Circuit):
            with _EdgeAblation(model, circuit, corrupt_run.cache, corrupt_mlp):
                circuit_run = model.run(clean)
        else:
            circuit_run = model.run(clean, interventions=ablate_outside(model, circuit, corrupt_run.cache))
        b += float(metric(clean_run.logits[:, -1], pair, lp)[0])
        k += float(metric(corrupt_run.logits[:, -1], pair, lp)[0])
        c += float(metric(circuit_run.logits[:, -1], pair, lp)[0])
    n = len(token_pairs)
    b, c, k = b / n, c / n, k / n
    return Faithfulness(b, c, k, (c - k) / (b - k) if b != k else float("nan"), crs(b, c))


class _EdgeAblation:
    """Hooks that give every downstream input (each head's q/k/v, each MLP, the logits) its own
    copy of the residual stream, minus out_u(run) - out_u(corrupt) for each upstream node u
    whose edge into it is not in the circuit. Keys and values are computed per query head."""

    def __init__(self, model, circuit: Circuit, corrupt_cache, corrupt_mlp: list[Tensor]):
        self.model, self.qkv = model, QKV
        up, down, valid = graph_nodes(model)
        kept = torch.zeros_like(valid)
        u_index, d_index = {n: i for i, n in enumerate(up)}, {n: i for i, n in enumerate(down)}
        for u, v, _ in circuit.edges:
            kept[u_index[u], d_index[v]] = True
        self.ablate = (valid & ~kept).float()  # [U, V]
        self.u_index, self.d_index = u_index, d_index
        self.corrupt = corrupt_cache
        self.corrupt_mlp = corrupt_mlp
        self.handles: list = []
        self.kv = per_query_heads(model, expand=False)

    def _missing(self, names: list[str]) -> Tensor:
        """Sum of out_u(run) - out_u(corrupt) over the ablated edges into each of ``names``: [n, B, T, d]."""
        cols = self.ablate[:, [self.d_index[n] for n in names]].to(self.deltas.dtype)  # [U, n]
        return torch.einsum("un,ubtd->nbtd", cols, self.deltas)

    def __enter__(self):
        m, fam = self.model, self.model.family
        L, H, D = m.n_layers, m.n_heads, m.d_head
        self.deltas = None
        self.kv.__enter__()
        at = lambda layer, p: m.layer_module(layer, p)

        def start(mod, args, kwargs):  # layer 0: the input node
            x = args[0] if args else kwargs["hidden_states"]
            self.deltas = x.new_zeros(len(self.u_index), *x.shape)
            self.deltas[0] = x - self.corrupt["blocks.0.resid_pre"]

        self.handles.append(at(0, "").register_forward_pre_hook(start, with_kwargs=True))
        for layer in range(L):
            self._hook_layer(layer, at, H, D)

        def logits_input(mod, args):
            return (args[0] - self._missing(["logits"])[0], *args[1:])

        self.handles.append(m.module(fam.final_norm).register_forward_pre_hook(logits_input))
        return self

    def _hook_layer(self, layer, at, H, D):
        m, fam = self.model, self.model.family
        saved = {}

        def resid(mod, args, kwargs):
            saved["pre"] = args[0] if args else kwargs["hidden_states"]

        self.handles.append(at(layer, "").register_forward_pre_hook(resid, with_kwargs=True))
        norm = at(layer, fam.attn_norm) if fam.attn_norm else (lambda x: x)

        def per_head(t):
            names = [f"a{layer}.h{h}<{t}>" for h in range(H)]
            x = saved["pre"][None] - self._missing(names)  # [H, B, T, d]
            w, b = head_params(m, layer, t)
            out = torch.einsum("hbtd,hed->bthe", norm(x), w)
            return out if b is None else out + b  # [B, T, H, D]

        k_norm = joint_k_norm(m, layer)

        def joint_keys():  # each query head's keys through the whole projection and joint norm
            x = saved["pre"][None] - self._missing([f"a{layer}.h{h}<k>" for h in range(H)])
            keys = k_norm.forward(at(layer, fam.k_proj)(norm(x)))  # forward: not this hook again
            keys = keys.unflatten(-1, (m.n_kv_heads, D))  # [H, B, T, K, D]
            group = torch.arange(H) // (H // m.n_kv_heads)
            return keys[torch.arange(H), :, :, group].permute(1, 2, 0, 3).flatten(-2)  # [B, T, H * D]

        if fam.qkv_proj is None:
            for t in self.qkv:
                if t == "k" and k_norm is not None:
                    self.handles.append(k_norm.register_forward_hook(lambda mod, args, out: joint_keys()))
                    continue
                self.handles.append(
                    at(layer, getattr(fam, f"{t}_proj")).register_forward_hook(
                        lambda mod, args, out, _t=t: per_head(_t).flatten(-2)
                    )
                )
        else:
            # the fused output, with k and v per query head: q|k|v, or per head (q, k, v)
            dim = -3 if fam.qkv_layout == "per_head" else -2

            def fused(mod, args, out):
                parts = [per_head(t) for t in self.qkv]  # [B, T, H, D] each
                if fam.qkv_layout == "per_head":
                    return torch.stack(parts, dim=-2).flatten(dim)
                return torch.cat([p.flatten(dim) for p in parts], dim=-1)

            self.handles.append(at(layer, fam.qkv_proj).register_forward_hook(fused))
        first = self.u_index[f"a{layer}.h0"]
        corrupt_heads = head_contributions(m, layer, self.corrupt[f"blocks.{layer}.attn.z"])

        def heads_out(mod, args):
            z = args[0].unflatten(-1, (H, D))
            self.deltas[first : first + H] = head_contributions(m, layer, z) - corrupt_heads

        self.handles.append(at(layer, fam.o_proj).register_forward_pre_hook(heads_out))
        mlp_norm = at(layer, fam.mlp_norm) if fam.mlp_norm else None

        def mlp_resid(mod, args):
            saved["mid"] = args[0]

        def mlp_input(mod, args):
            x = saved["mid"] - self._missing([f"m{layer}"])[0]
            return (mlp_norm(x) if mlp_norm is not None else x, *args[1:])

        def mlp_out(mod, args, out):
            self.deltas[self.u_index[f"m{layer}"]] = out - self.corrupt_mlp[layer]

        if mlp_norm is not None:
            self.handles.append(mlp_norm.register_forward_pre_hook(mlp_resid))
        else:
            self.handles.append(at(layer, fam.mlp).register_forward_pre_hook(mlp_resid))
        self.handles.append(at(layer, fam.mlp).register_forward_pre_hook(mlp_input))
        self.handles.append(at(layer, fam.mlp_contrib).register_forward_hook(mlp_out))

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.kv.__exit__(*exc)
        return False


def draw(circuit: Circuit, path: str | Path, title: str = "circuit") -> Path:
    """A layered drawing: layers bottom to top, heads left to right; edge width ~ |score|,
    red positive, blue negative."""
    from lmscope.reports.plots import plt

    nodes = circuit.nodes
    layers = sorted({_order(n)[0] for n in nodes})
    rank = {layer: i for i, layer in enumerate(layers)}
    pos = {}
    for n in nodes:
        layer, kind, head = _order(n)
        y = rank[layer] * 2 + kind
        x = 0.0 if n in ("input", "logits") else (head if kind == 0 else -1.5)
        pos[n] = (x, y)
    fig, ax = plt.subplots(figsize=(8, max(4, 0.6 * len(layers) + 2)))
    biggest = max((abs(s) for *_, s in circuit.edges), default=1.0) or 1.0
    for u, v, s in circuit.edges:
        (x0, y0), (x1, y1) = pos[u], pos[node_of(v)]
        ax.plot(
            [x0, x1],
            [y0, y1],
            color="tab:red" if s > 0 else "tab:blue",
            alpha=0.6,
            linewidth=0.5 + 4 * abs(s) / biggest,
        )
    for n, (x, y) in pos.items():
        ax.scatter([x], [y], s=300, color="white", edgecolors="black", zorder=3)
        ax.annotate(n, (x, y), ha="center", va="center", fontsize=6, zorder=4)
    ax.set_axis_off()
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

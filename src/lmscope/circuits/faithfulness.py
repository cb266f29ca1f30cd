"""Faithfulness of a circuit: the model run with everything outside the circuit
interchange-ablated (taken from the corrupted run), next to the full model.

For a pair, the metric C of that run is reported next to the full model's B on the clean
prompt and M(corrupt), normalised as (C - M(corrupt)) / (B - M(corrupt)) (NaN when B equals
M(corrupt)), and as the CRS score of "Temporal Heads" (Park et al. 2025), as the paper's code
computes it (:func:`crs`): 100 when B > 0 and C >= B, else 100 * sf * exp(-dist / |B|) with
dist = max(0, B - C) for B > 0 and |C| for B <= 0, and sf 1.0 (B > 0, C >= 0), 0.6 (B > 0,
C < 0), 0.8 (B <= 0, C >= 0), 0.5 (B <= 0, C < 0). Values are averaged over pairs before
normalising.

- An edge circuit (:class:`~lmscope.circuits.graph.Circuit`) ablates every edge outside it, as
  the EAP-IG code's ``evaluate_graph`` (Hanna et al. 2024): each downstream input (each head's
  q, k and v, each MLP, the logits) reads its own copy of the residual stream, minus
  out_u(run) - out_u(corrupt) for every upstream node u whose edge into it is missing
  (:func:`edge_ablation`).
- A list of node names ablates every head and MLP outside it: their outputs are patched from
  the corrupted run at all positions (:func:`ablate_outside`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lmscope.circuits.edges import graph_nodes
from lmscope.circuits.graph import Circuit
from lmscope.circuits.metrics import Metric, get_metric
from lmscope.circuits.nodes import head_node, mlp_node
from lmscope.circuits.pairs import Baselines, PromptPair, TokenPair, as_token_pairs, bind
from lmscope.core import distributed
from lmscope.core.anatomy import (
    QKV,
    head_contributions,
    head_params,
    join_qkv,
    joint_k_norm,
    kv_head_of,
    mlp_contributions,
    per_query_heads,
    qkv_points,
)
from lmscope.core.hooks import Hook, hooked
from lmscope.core.interventions import Intervention, patch
from lmscope.core.model import Model
from lmscope.core.sites import Site


def crs(baseline: float, circuit: float, eps: float = 1e-9) -> float:
    """Circuit reproduction score of "Temporal Heads" (Park et al., ACL 2025, arXiv 2502.14258),
    0-100, exactly as the ``CRS`` function of the paper's ``1.circuit_construction.ipynb``
    (alpha = 1): with B the full model's metric and C the circuit's,

    - 100 when B > 0 and C >= B;
    - else ``100 * sf * exp(-dist / max(|B|, eps))`` with ``dist = max(0, B - C)`` when B > 0
      and ``|C|`` when B <= 0 (C = 0 is the target then), and the sign factor sf = 1.0 (B > 0,
      C >= 0), 0.6 (B > 0, C < 0), 0.8 (B <= 0, C >= 0), 0.5 (B <= 0, C < 0).
    """
    b, c = baseline, circuit
    if b > 0 and c >= b:
        return 100.0
    if b > 0:
        sf = 1.0 if c >= 0 else 0.6
        dist = max(0.0, b - c)
    else:
        sf = 0.8 if c >= 0 else 0.5
        dist = abs(c)
    return 100.0 * sf * math.exp(-dist / max(abs(b), eps))


@dataclass
class Faithfulness:
    baseline: float  # B: metric of the full model on the clean prompts
    circuit: float  # C: metric with everything outside the circuit patched from the corrupted run
    corrupt: float
    normalised: float  # (C - corrupt) / (B - corrupt); NaN when B == corrupt
    crs: float

    def to_json(self) -> dict:
        """The five values by name (``normalised`` may be NaN: ``null`` in results files, read back
        as NaN by :func:`lmscope.reports.results.nan_for_none`)."""
        return asdict(self)


def ablate_outside(model: Model, nodes: Sequence[str], corrupt_cache: Mapping[str, Tensor]) -> list[Intervention]:
    """Interventions patching every head's ``attn.z`` and every MLP's output not in ``nodes``
    from the corrupted run's cache (``blocks.{L}.attn.z`` and ``blocks.{L}.mlp.out``)."""
    keep = set(nodes)
    ivs = []
    for layer in range(model.n_layers):
        z = Site("attn.z", layer)
        ivs += [
            patch(z, corrupt_cache[z.name], head=h) for h in range(model.n_heads) if head_node(layer, h) not in keep
        ]
        mlp = Site("mlp.out", layer)
        if mlp_node(layer) not in keep:
            ivs.append(patch(mlp, corrupt_cache[mlp.name]))
    return ivs


class _EdgeAblation:
    """Callbacks on hook points that give every downstream input (each head's q/k/v, each MLP,
    the logits) its own copy of the residual stream, minus out_u(run) - out_u(corrupt) for each
    upstream node u whose edge into it is not in the circuit (the EAP-IG code's
    ``evaluate_graph``). Keys and values are computed per query head."""

    def __init__(self, model: Model, circuit: Circuit, corrupt_cache: Mapping[str, Tensor], corrupt_mlp: list[Tensor]):
        self.model = model
        up, down, valid = graph_nodes(model)
        kept = torch.zeros_like(valid)
        u_index, d_index = {n: i for i, n in enumerate(up)}, {n: i for i, n in enumerate(down)}
        for u, v, _ in circuit.edges:
            kept[u_index[u], d_index[v]] = True
        self.ablate = (valid & ~kept).float()  # [U, V]
        self.u_index, self.d_index = u_index, d_index
        self.corrupt = corrupt_cache
        self.corrupt_mlp = corrupt_mlp
        self.deltas: Tensor | None = None  # out_u(run) - out_u(corrupt) [U, B, T, d], filled as the run goes

    def _missing(self, names: list[str]) -> Tensor:
        """Sum of out_u(run) - out_u(corrupt) over the ablated edges into each of ``names``: [n, B, T, d]."""
        cols = self.ablate[:, [self.d_index[n] for n in names]].to(self.deltas.dtype)  # [U, n]
        return torch.einsum("un,ubtd->nbtd", cols, self.deltas)

    def hooks(self) -> list[Hook]:
        hooks = [Hook("resid_pre", 0, self._start)]
        for layer in range(self.model.n_layers):
            hooks += self._layer_hooks(layer)
        hooks.append(Hook("final_norm.in", None, lambda x: x - self._missing(["logits"])[0]))
        return hooks

    def _start(self, x: Tensor) -> None:  # layer 0: the input node
        self.deltas = x.new_zeros(len(self.u_index), *x.shape)
        self.deltas[0] = x - self.corrupt["blocks.0.resid_pre"]

    def _layer_hooks(self, layer: int) -> list[Hook]:
        m, fam = self.model, self.model.family
        H, D = m.n_heads, m.d_head_of(layer)
        saved = {}

        def resid(x: Tensor) -> None:
            saved["pre"] = x

        norm = m.layer_module(layer, fam.attn_norm) if fam.attn_norm else (lambda x: x)

        def per_head(t: str) -> Tensor:
            names = [head_node(layer, h, t) for h in range(H)]
            x = saved["pre"][None] - self._missing(names)  # [H, B, T, d]
            w, b = head_params(m, layer, t)
            out = torch.einsum("hbtd,hed->bthe", norm(x), w)
            return out if b is None else out + b  # [B, T, H, D]

        k_norm = joint_k_norm(m, layer)

        def joint_keys() -> Tensor:  # each query head's keys through the whole projection and joint norm
            x = saved["pre"][None] - self._missing([head_node(layer, h, "k") for h in range(H)])
            keys = k_norm.forward(m.layer_module(layer, fam.k_proj)(norm(x)))  # forward: not this hook again
            keys = keys.unflatten(-1, (m.n_kv_heads_of(layer), D))  # [H, B, T, K, D]
            return keys[torch.arange(H), :, :, kv_head_of(m, layer)].permute(1, 2, 0, 3).flatten(-2)  # [B, T, H * D]

        hooks = [Hook("resid_pre", layer, resid)]
        points = qkv_points(m, layer)
        if "qkv" in points:  # the fused output, with k and v per query head
            hooks.append(Hook(points["qkv"], layer, lambda x: join_qkv(m, {t: per_head(t) for t in QKV})))
        else:
            for t in QKV:
                if t == "k" and k_norm is not None:
                    hooks.append(Hook(points[t], layer, lambda x: joint_keys()))
                else:
                    hooks.append(Hook(points[t], layer, lambda x, _t=t: per_head(_t).flatten(-2)))

        first = self.u_index[head_node(layer, 0)]
        corrupt_heads = head_contributions(m, layer, self.corrupt[f"blocks.{layer}.attn.z"])

        def heads_out(z: Tensor) -> None:  # z [B, T, H, D]
            self.deltas[first : first + H] = head_contributions(m, layer, z) - corrupt_heads

        mlp_norm = m.layer_module(layer, fam.mlp_norm) if fam.mlp_norm else None

        def mlp_resid(x: Tensor) -> None:
            saved["mid"] = x

        def mlp_input(x: Tensor) -> Tensor:
            x = saved["mid"] - self._missing([mlp_node(layer)])[0]
            return mlp_norm(x) if mlp_norm is not None else x

        def mlp_out(x: Tensor) -> None:
            self.deltas[self.u_index[mlp_node(layer)]] = x - self.corrupt_mlp[layer]

        return hooks + [
            Hook("attn.z", layer, heads_out),
            Hook("mlp.resid_in", layer, mlp_resid),
            Hook("mlp.in", layer, mlp_input),
            Hook("mlp.contrib", layer, mlp_out),
        ]


@contextlib.contextmanager
def edge_ablation(
    model: Model, circuit: Circuit, corrupt_cache: Mapping[str, Tensor], corrupt_mlp: list[Tensor]
) -> Iterator[None]:
    """While the block runs, forwards of ``model`` ablate every edge outside ``circuit`` (the
    EAP-IG code's ``evaluate_graph``): each downstream input reads the residual stream minus
    out_u(run) - out_u(corrupt) for each upstream node u whose edge into it is missing.
    ``corrupt_cache``: the corrupted run's ``blocks.0.resid_pre`` and ``blocks.{L}.attn.z``;
    ``corrupt_mlp``: its MLP contributions (:func:`lmscope.core.anatomy.mlp_contributions`)."""
    ablation = _EdgeAblation(model, circuit, corrupt_cache, corrupt_mlp)
    with per_query_heads(model, expand=False), hooked(model, ablation.hooks()):
        yield


def faithfulness(
    model: Model,
    pairs: Sequence[PromptPair] | Sequence[TokenPair],
    circuit: Circuit | Sequence[str],
    metric: str | Metric = "logit_diff",
) -> Faithfulness:
    """Metric of the circuit vs the full model, on the clean prompts with everything outside
    the circuit interchange-ablated: for a :class:`~lmscope.circuits.graph.Circuit`, every edge
    outside it (:func:`edge_ablation`, as the EAP-IG code's ``evaluate_graph``); for a list of
    node names, every head and MLP outside it (:func:`ablate_outside`). B, C and M(corrupt) are
    averaged over pairs; ``normalised`` is NaN when B equals M(corrupt). ``pairs``: token
    pairs, or prompt pairs of equal token length."""
    metric = get_metric(metric)
    sites = ["blocks.0.resid_pre"] + [
        f"blocks.{layer}.{k}" for layer in range(model.n_layers) for k in ("attn.z", "mlp.out")
    ]
    token_pairs = as_token_pairs(model, pairs)

    def run_pair(pair: TokenPair) -> tuple[float, float, float]:
        """M(clean), M(corrupt) and M(circuit) of one pair."""
        clean = pair.inputs("clean", model.device)
        clean_run = model.run(clean)
        with mlp_contributions(model) as corrupt_mlp:
            corrupt_run = model.run(pair.inputs("corrupt", model.device), capture=sites)
        bound = bind(metric, pair, clean_run.logits[0, -1])
        if isinstance(circuit, Circuit):
            with edge_ablation(model, circuit, corrupt_run.cache, corrupt_mlp):
                circuit_run = model.run(clean)
        else:
            circuit_run = model.run(clean, interventions=ablate_outside(model, circuit, corrupt_run.cache))
        return tuple(float(bound(run.logits[:, -1])[0]) for run in (clean_run, corrupt_run, circuit_run))

    per_pair, circuit_total = [], 0.0
    # Under torchrun, pairs go round-robin to the ranks and add up in order on each.
    for clean_value, corrupt_value, circuit_value in distributed.ordered_map(token_pairs, run_pair):
        per_pair.append((clean_value, corrupt_value))
        circuit_total += circuit_value
    baselines = Baselines.mean(per_pair, check=False)
    c = circuit_total / len(token_pairs)
    return Faithfulness(baselines.clean, c, baselines.corrupt, baselines.normalise(c), crs(baselines.clean, c))

"""Expert inspection: how a mixture-of-experts model routes the tokens of one or more corpora.

Streaming over batches of windows (one forward per batch, only the routing sites captured), per
MoE layer L and expert e, over the tokens of each domain d (one corpus per domain):

- ``load[d, L, e]``: the fraction of d's tokens whose routing chose e (routing weight != 0);
- ``score[d, L, e]``: e's mean routing weight over d's tokens (0 where not chosen), Monet's
  routing score (Park et al., ICLR 2025, "Monet: Mixture of Monosemantic Experts", §5);
- ``entropy[d, L]``: the mean over d's tokens of the Shannon entropy (nats) of the router's
  distribution over all experts, softmax of its logits (for sigmoid routers such as DeepSeek-V3's
  still a measure of how peaked the logits are); ``balance[L]``: the entropy of the load over
  experts (all domains) divided by log(n_experts), 1 = perfectly balanced;
- ``coactivation[L, i, j]``: the number of tokens (all domains) that chose both i and j, divided
  by the number that chose i, i.e. P(j chosen | i chosen); the diagonal is 1 for used experts;
- ``top_tokens``: per (L, e), the ``top`` token occurrences with the largest routing weight of e,
  with the ``context`` tokens before each;
- ``specialisation[d, L, e]`` (two or more domains): e's routing score on d divided by its highest
  routing score on any other domain, as Monet's domain analyses select the experts that fire much
  more on one domain than on every other (``score + 1e-6`` on both sides, so an expert never
  chosen outside d has a large finite ratio).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmscope.core import moe
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.core.progress import progress_bar
from lmscope.core.corpus import Corpus
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table, nan_for_none

_EPS = 1e-6


def moe_layers(model: Model) -> tuple[list[int], int]:
    """The model's mixture-of-experts layers and their (common) number of experts; a clear error
    for a dense model or layers with different expert counts."""
    layers = model.layers_with("experts") if model.family.experts else []
    if not layers:
        raise LmscopeError(f"{model.name} has no mixture-of-experts layers")
    counts = {moe.n_experts(model, layer) for layer in layers}
    if len(counts) != 1:
        raise LmscopeError(f"{model.name}: MoE layers have different expert counts {sorted(counts)}")
    return layers, counts.pop()


@dataclass
class ExpertStats(Result):
    """Routing statistics of every MoE layer over each domain (definitions in the module
    docstring). Tensors: ``load``/``score`` [domains, layers, experts], ``entropy`` [domains,
    layers], ``coactivation`` [layers, experts, experts]; ``top_tokens``: one dict per occurrence
    (``layer``, ``expert``, ``weight``, ``domain``, ``position``, ``token``, ``context``)."""

    domains: list[str]
    layers: list[int]
    n_experts: int
    tokens: list[int]
    load: Tensor
    score: Tensor
    entropy: Tensor
    coactivation: Tensor
    top_tokens: list[dict] = field(default_factory=list)

    @property
    def balance(self) -> Tensor:
        """Per layer: entropy of the load over experts (all domains) / log(n_experts)."""
        weights = torch.tensor(self.tokens, dtype=torch.float64)[:, None, None]
        load = (self.load.double() * weights).sum(0)
        p = load / load.sum(-1, keepdim=True).clamp_min(1e-12)
        h = -(p * p.clamp_min(1e-12).log()).sum(-1)
        return (h / math.log(self.n_experts)).float()

    @property
    def specialisation(self) -> Tensor | None:
        """[domains, layers, experts]: score on a domain / the highest score on another (None
        with one domain)."""
        if len(self.domains) < 2:
            return None
        ratios = []
        for d in range(len(self.domains)):
            others = torch.cat([self.score[:d], self.score[d + 1 :]]).amax(0)
            ratios.append((self.score[d] + _EPS) / (others + _EPS))
        return torch.stack(ratios)

    def most_specialised(self, domain: str, n: int) -> list[tuple[int, int]]:
        """The ``n`` (layer, expert) pairs most specialised to ``domain`` (highest ratio, ties by
        routing score), among experts that ``domain``'s tokens chose at all."""
        spec = self.specialisation
        if spec is None:
            raise LmscopeError("expert specialisation needs at least two corpora (domains)")
        if domain not in self.domains:
            raise LmscopeError(f"unknown domain '{domain}' (domains: {', '.join(self.domains)})")
        d = self.domains.index(domain)
        ratio, score = spec[d].flatten(), self.score[d].flatten()
        used = (score > 0).nonzero().flatten().tolist()
        if n > len(used):
            raise LmscopeError(f"cannot pick {n} experts for {domain}: its tokens chose {len(used)}")
        order = sorted(used, key=lambda i: (-float(ratio[i]), -float(score[i])))[:n]
        return [(self.layers[i // self.n_experts], i % self.n_experts) for i in order]

    @classmethod
    def from_json(cls, data: dict) -> ExpertStats:
        """Read back :meth:`to_json`'s output (derived fields are recomputed)."""
        tensors = {k: torch.tensor(nan_for_none(data[k])) for k in ("load", "score", "entropy", "coactivation")}
        fields = {k: data[k] for k in ("domains", "layers", "n_experts", "tokens", "top_tokens")}
        return cls(**fields, **tensors)

    def to_json(self) -> dict:
        spec = self.specialisation
        return {
            "domains": self.domains,
            "layers": self.layers,
            "n_experts": self.n_experts,
            "tokens": self.tokens,
            "load": self.load.tolist(),
            "score": self.score.tolist(),
            "entropy": self.entropy.tolist(),
            "balance": self.balance.tolist(),
            "coactivation": self.coactivation.tolist(),
            "specialisation": spec.tolist() if spec is not None else None,
            "top_tokens": self.top_tokens,
        }

    def text(self) -> str:
        total = sum(self.tokens)
        return (
            f"{total} tokens over {len(self.domains)} domain(s) ({', '.join(self.domains)}); "
            f"{len(self.layers)} MoE layers of {self.n_experts} experts; "
            f"mean load balance {float(self.balance.mean()):.3f} (1 = uniform)."
        )

    def tables(self) -> list[Table]:
        """Per layer: routing entropy per domain, load balance, the most loaded expert; per
        domain, its most specialised experts (up to 8, those firing more on it than on any other
        domain) with their top tokens."""
        rows = []
        for i, layer in enumerate(self.layers):
            row = {"layer": layer}
            row.update({f"entropy ({d})": float(self.entropy[j, i]) for j, d in enumerate(self.domains)})
            all_load = (self.load[:, i] * torch.tensor(self.tokens)[:, None]).sum(0) / sum(self.tokens)
            row["balance"] = float(self.balance[i])
            row["busiest expert"] = int(all_load.argmax())
            row["its load"] = float(all_load.max())
            rows.append(row)
        tables = [Table("routing per layer (entropy in nats of softmax(router logits); balance 1 = uniform)", rows)]
        if self.specialisation is not None:
            tables.append(Table("most specialised experts per domain, with their top tokens", self._specialists()))
        return tables

    def _specialists(self, n: int = 8) -> list[dict]:
        spec = self.specialisation
        rows = []
        for d, domain in enumerate(self.domains):
            for layer, expert in self.most_specialised(domain, min(n, int((self.score[d] > 0).sum()))):
                i = self.layers.index(layer)
                if float(spec[d, i, expert]) <= 1.0:  # fires no more on this domain than on another
                    break
                tops = [t for t in self.top_tokens if t["layer"] == layer and t["expert"] == expert]
                rows.append(
                    {
                        "domain": domain,
                        "layer": layer,
                        "expert": expert,
                        "ratio": float(spec[d, i, expert]),
                        "load": float(self.load[d, i, expert]),
                        "top tokens": " | ".join(t["context"] for t in tops[:3]),
                    }
                )
        return rows

    def figures(self) -> list[Figure]:
        """Load heatmap (layer x expert, all domains); per domain, log10 specialisation; the
        co-activation of the last MoE layer."""
        weights = torch.tensor(self.tokens, dtype=torch.float32)[:, None, None]
        load = (self.load * weights).sum(0) / weights.sum()
        experts = [str(e) for e in range(self.n_experts)]
        layers = [str(layer) for layer in self.layers]
        figures = [
            Figure(
                "expert_load",
                "heatmap",
                "expert load (fraction of tokens routed)",
                "expert",
                "layer",
                x=experts,
                y=layers,
                z=load.tolist(),
                value_label="load",
            )
        ]
        spec = self.specialisation
        if spec is not None:
            for d, domain in enumerate(self.domains):
                figures.append(
                    Figure(
                        f"specialisation_{d}",
                        "heatmap",
                        f"specialisation to {domain} (log10 ratio)",
                        "expert",
                        "layer",
                        x=experts,
                        y=layers,
                        z=spec[d].log10().tolist(),
                        diverging=True,
                        value_label="log10 ratio",
                    )
                )
        figures.append(
            Figure(
                "expert_coactivation",
                "heatmap",
                f"co-activation, layer {self.layers[-1]}: P(j chosen | i chosen)",
                "expert j",
                "expert i",
                x=experts,
                y=experts,
                z=self.coactivation[-1].tolist(),
                value_label="P",
            )
        )
        return figures


class _Accumulator:
    """Running sums of one pass over the domains' tokens."""

    def __init__(self, n_domains: int, n_layers: int, n_experts: int, top: int):
        self.chosen = torch.zeros(n_domains, n_layers, n_experts, dtype=torch.float64)
        self.weight = torch.zeros_like(self.chosen)
        self.entropy = torch.zeros(n_domains, n_layers, dtype=torch.float64)
        self.pairs = torch.zeros(n_layers, n_experts, n_experts, dtype=torch.float64)
        self.count = [0] * n_domains
        # best routing weights per (layer, expert) and where they were: (domain, token position)
        self.best = torch.full((n_layers, n_experts, top), -1.0)
        self.where = torch.zeros(n_layers, n_experts, top, 2, dtype=torch.long)

    def add(self, d: int, i: int, logits: Tensor, weights: Tensor, positions: Tensor) -> None:
        """One layer's routing of a batch: ``logits`` and ``weights`` [tokens, experts],
        ``positions`` [tokens] (the tokens' places in domain ``d``'s corpus)."""
        weights, logits = weights.double(), logits.double()
        chosen = (weights != 0).double()
        self.chosen[d, i] += chosen.sum(0)
        self.weight[d, i] += weights.sum(0)
        p = logits.softmax(-1)
        self.entropy[d, i] += -(p * p.clamp_min(1e-300).log()).sum()
        self.pairs[i] += chosen.T @ chosen
        k = min(self.best.shape[-1], weights.shape[0])
        w, idx = weights.float().T.topk(k, dim=-1)  # [experts, k]
        where = torch.stack([torch.full_like(idx, d), positions[idx]], -1)
        w_all = torch.cat([self.best[i], w], -1)
        where_all = torch.cat([self.where[i], where], -2)
        keep = w_all.topk(self.best.shape[-1], dim=-1).indices
        self.best[i] = w_all.gather(-1, keep)
        self.where[i] = where_all.gather(-2, keep[..., None].expand(-1, -1, 2))


def expert_stats(
    model: Model,
    corpora: Sequence[Corpus],
    *,
    window: int = 256,
    batch_size: int = 4,
    top: int = 5,
    context: int = 8,
) -> ExpertStats:
    """Routing statistics of ``model``'s MoE layers over ``corpora`` (one domain each; names must
    differ), streaming over non-overlapping windows of ``window`` tokens; see the module docstring."""
    layers, n = moe_layers(model)
    names = [c.name for c in corpora]
    if len(set(names)) != len(names):
        raise LmscopeError(f"corpus names must differ: {names}")
    sites = [f"blocks.{layer}.moe.{kind}" for layer in layers for kind in ("router", "weights")]
    acc = _Accumulator(len(corpora), len(layers), n, top)
    total = sum(len(c.windows(window)) for c in corpora)
    with torch.no_grad(), progress_bar("expert routing", total) as advance:
        for d, corpus in enumerate(corpora):
            windows = corpus.windows(window)
            for start in range(0, len(windows), batch_size):
                batch = windows[start : start + batch_size]
                cache = model.run(batch, capture=sites, logits=False, to_cpu=True).cache
                positions = (torch.arange(start, start + len(batch))[:, None] * window + torch.arange(window)).flatten()
                for i, layer in enumerate(layers):
                    logits = cache[f"blocks.{layer}.moe.router"].reshape(-1, n)
                    weights = cache[f"blocks.{layer}.moe.weights"].reshape(-1, n)
                    acc.add(d, i, logits, weights, positions)
                acc.count[d] += batch.numel()
                advance(len(batch))
    counts = torch.tensor(acc.count, dtype=torch.float64)
    used = acc.pairs.diagonal(dim1=-2, dim2=-1)
    return ExpertStats(
        domains=names,
        layers=layers,
        n_experts=n,
        tokens=acc.count,
        load=(acc.chosen / counts[:, None, None]).float(),
        score=(acc.weight / counts[:, None, None]).float(),
        entropy=(acc.entropy / counts[:, None]).float(),
        coactivation=(acc.pairs / used.clamp_min(1)[..., None]).float(),
        top_tokens=_top_tokens(model, corpora, layers, acc, context),
    )


def _top_tokens(model: Model, corpora: Sequence[Corpus], layers: list[int], acc: _Accumulator, context: int) -> list:
    """The best occurrences per (layer, expert) as rows, the token in brackets after its context."""

    def text(ids: Sequence[int]) -> str:
        if model.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return model.tokenizer.decode(list(ids))

    rows = []
    for i, layer in enumerate(layers):
        for e in range(acc.best.shape[1]):
            for w, (d, pos) in zip(acc.best[i, e].tolist(), acc.where[i, e].tolist(), strict=True):
                if w <= 0:
                    continue
                tokens = corpora[d].tokens
                before = tokens[max(0, pos - context) : pos].tolist()
                token = int(tokens[pos])
                rows.append(
                    {
                        "layer": layer,
                        "expert": e,
                        "weight": w,
                        "domain": corpora[d].name,
                        "position": pos,
                        "token": text([token]),
                        "context": f"{text(before)}[{text([token])}]",
                    }
                )
    return rows

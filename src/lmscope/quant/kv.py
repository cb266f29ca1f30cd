"""Key/value analysis: norms and singular-value spectra of cached keys and values, and of W_k, W_v.

KV-AdaQuant (Hariri et al. 2025, "Quantize What Counts: More for Keys, Less for Values")
observes that keys have larger norms than values, in the activations and in the projection
weights, so that keys need more bits than values at the same budget. This module measures
both, per layer and per KV head:

- activations: the keys (after the rotary embedding, as the KV cache stores them) and values
  of every token of a corpus form a matrix K [n_tokens, d_head] per KV head; streaming its Gram
  matrix K^T K gives the Frobenius norm sqrt(tr K^T K), the singular values sqrt(eig(K^T K))
  and the spectral norm (the largest), in memory independent of the corpus length. Norms of
  the whole layer use all KV heads' columns together [n_tokens, n_kv_heads * d_head].
- weights: Frobenius and spectral norms of each KV head's rows of W_k and W_v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmscope.core import distributed
from lmscope.core.anatomy import head_params
from lmscope.core.model import Model
from lmscope.core.progress import progress_bar
from lmscope.core.corpus import Corpus
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table


@dataclass
class KVStats:
    """Streaming Gram matrices of the keys and values: ``gram[t]`` is [n_layers, n_kv*d_head, n_kv*d_head]."""

    gram: dict[str, Tensor]
    n_kv_heads: int
    d_head: int
    n_tokens: int = 0

    def norms(self, t: str) -> dict:
        """Per layer: Frobenius and spectral norm of the whole layer's matrix and, per KV head,
        Frobenius norm, spectral norm and singular values (descending)."""
        gram = self.gram[t]
        n_layers, D = gram.shape[0], self.d_head
        heads = torch.stack([gram[:, h * D : (h + 1) * D, h * D : (h + 1) * D] for h in range(self.n_kv_heads)], 1)
        sv_heads = _singular_values(heads)  # [L, n_kv, D]
        sv_layer = _singular_values(gram)  # [L, n_kv * D]
        return {
            "frobenius": sv_layer.square().sum(-1).sqrt().tolist(),
            "spectral": sv_layer[:, 0].tolist(),
            "head_frobenius": sv_heads.square().sum(-1).sqrt().tolist(),
            "head_spectral": sv_heads[..., 0].tolist(),
            "head_singular_values": sv_heads.tolist(),
            "n_layers": n_layers,
        }

    def summary(self) -> KVSummary:
        """The norms (:meth:`norms`) of the keys and of the values."""
        return KVSummary(self.n_tokens, self.norms("k"), self.norms("v"))


@dataclass
class KVSummary(Result):
    """Norms and spectra of the cached keys and values over ``n_tokens`` tokens: ``keys`` and
    ``values`` as :meth:`KVStats.norms` gives them."""

    n_tokens: int
    keys: dict
    values: dict

    def to_json(self) -> dict:
        return {"n_tokens": self.n_tokens, "keys": self.keys, "values": self.values}

    def figures(self) -> list[Figure]:
        """Frobenius and spectral norms of K and V per layer."""
        layers = list(range(len(self.keys["frobenius"])))
        return [
            Figure(
                "kv_norms",
                "lines",
                f"key vs value norms per layer ({self.n_tokens} tokens)",
                "layer",
                "norm",
                x=layers,
                series={
                    "|K|_F": self.keys["frobenius"],
                    "|V|_F": self.values["frobenius"],
                    "|K|_2 (spectral)": self.keys["spectral"],
                    "|V|_2 (spectral)": self.values["spectral"],
                },
                log=True,
            )
        ]


@dataclass
class KVNorms(Result):
    """Keys vs values: the norms of the cached keys and values (``activations``) and of W_k and
    W_v (``weights``, as :func:`weight_norms` gives them)."""

    activations: KVSummary
    weights: dict

    def to_json(self) -> dict:
        return {"kv": self.activations.to_json(), "weights": self.weights}

    def tables(self) -> list[Table]:
        """Per layer: |K|_F, |V|_F, their ratio, |K|_2, |V|_2, |W_k|_F, |W_v|_F."""
        keys, values, w = self.activations.keys, self.activations.values, self.weights
        rows = []
        for layer, (k, v) in enumerate(zip(keys["frobenius"], values["frobenius"])):
            rows.append(
                {
                    "layer": layer,
                    "|K|_F": k,
                    "|V|_F": v,
                    "K/V": k / v if v else None,
                    "|K|_2": keys["spectral"][layer],
                    "|V|_2": values["spectral"][layer],
                    "|W_k|_F": w["k"]["frobenius"][layer],
                    "|W_v|_F": w["v"]["frobenius"][layer],
                }
            )
        return [Table("keys vs values", rows)]

    def figures(self) -> list[Figure]:
        """K vs V norms per layer: activations, then weights."""
        w = self.weights
        return [
            *self.activations.figures(),
            Figure(
                "kv_weight_norms",
                "lines",
                "W_k vs W_v norms per layer",
                "layer",
                "norm",
                x=list(range(len(w["k"]["frobenius"]))),
                series={
                    "|W_k|_F": w["k"]["frobenius"],
                    "|W_v|_F": w["v"]["frobenius"],
                    "|W_k|_2": w["k"]["spectral"],
                    "|W_v|_2": w["v"]["spectral"],
                },
            ),
        ]


def _singular_values(gram: Tensor) -> Tensor:
    """Singular values (descending) of the matrices whose Gram matrices are ``gram`` [..., n, n]."""
    return torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().flip(-1)


def kv_stats(model: Model, corpus: Corpus, *, window: int = 512, batch_size: int = 4) -> KVStats:
    """Stream ``corpus`` (non-overlapping windows of ``window`` tokens) and accumulate the Gram
    matrices of every layer's keys and values (a clear error where layers differ in head size or
    KV heads: the statistics stack the layers)."""
    model.require_uniform_heads("key/value statistics")
    sites = [f"blocks.{layer}.attn.{t}" for layer in range(model.n_layers) for t in "kv"]
    batches = corpus.windows(window).split(batch_size)

    def batch_grams(batch: Tensor) -> list[Tensor]:
        with torch.no_grad():
            cache = model.run(batch.to(model.device), capture=sites, logits=False).cache
        advance(batch.numel() * distributed.world_size())
        return [
            torch.stack([_gram(cache[f"blocks.{layer}.attn.{t}"]) for layer in range(model.n_layers)]) for t in "kv"
        ]

    # Under torchrun each rank sums its share of the batches, then the ranks' sums add up.
    with progress_bar("key/value statistics", sum(b.numel() for b in batches)) as advance:
        keys, values = distributed.shard_sum(batches, batch_grams)
    return KVStats({"k": keys, "v": values}, model.n_kv_heads, model.d_head, sum(b.numel() for b in batches))


def _gram(x: Tensor) -> Tensor:
    """X^T X of keys or values ``x`` [batch, pos, n_kv_heads, d_head], on the CPU in float64."""
    flat = x.detach().flatten(0, 1).flatten(1).float()
    return (flat.T @ flat).double().cpu()


def kv_norms(model: Model, corpus: Corpus, *, window: int = 512, batch_size: int = 4) -> KVNorms:
    """Norms of the keys and values of ``corpus`` (:func:`kv_stats`) and of W_k, W_v (:func:`weight_norms`)."""
    summary = kv_stats(model, corpus, window=window, batch_size=batch_size).summary()
    return KVNorms(summary, weight_norms(model))


def weight_norms(model: Model) -> dict:
    """Frobenius and spectral norms of W_k and W_v: per layer (all KV heads' rows) and per KV
    head. Keys: ``"k"``/``"v"`` -> ``frobenius`` [L], ``spectral`` [L], ``head_frobenius``
    [L][n_kv], ``head_spectral`` [L][n_kv]. A clear error where layers differ in head size or KV
    heads, or reuse an earlier layer's keys and values."""
    model.require_uniform_heads("key/value weight norms")
    groups = model.n_heads // model.n_kv_heads
    out = {}
    with torch.no_grad():
        for t in "kv":
            per_head = torch.stack(
                [head_params(model, layer, t)[0][::groups].float() for layer in range(model.n_layers)]
            )  # [L, n_kv, d_head, d_model]
            whole = per_head.flatten(1, 2)
            out[t] = {
                "frobenius": torch.linalg.matrix_norm(whole).tolist(),
                "spectral": torch.linalg.matrix_norm(whole, ord=2).tolist(),
                "head_frobenius": torch.linalg.matrix_norm(per_head).tolist(),
                "head_spectral": torch.linalg.matrix_norm(per_head, ord=2).tolist(),
            }
    return out

"""Evaluating dictionaries: how well they reconstruct, how sparse they are, and what splicing them
into the model costs downstream.

Over held-out tokens (positions ``skip_first`` on of every window, less the massive activations
that :func:`lmscope.features.harvest.ordinary` leaves out of training too), for each dictionary, with
``x`` its target in its own space (the input site for an autoencoder, the output site for a
transcoder), ``x_hat`` its reconstruction and ``f`` its features:

- **L0**: mean number of active features per token;
- **FVU**: fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean x||^2`` over
  all tokens (1 - SAELens's ``explained_variance``; sparsify's training FVU);
- **cosine**: mean over tokens of ``cos(x, x_hat)``; **L2 ratio**: mean of ``||x_hat|| / ||x||``;
- **relative reconstruction bias** (Rajamanoharan et al. 2024, eq. 10; SAEBench, SAELens,
  dictionary_learning): ``gamma = argmin_g E||x_hat / g - x||^2 = E||x_hat||^2 / E<x, x_hat>``,
  below 1 when reconstructions shrink (the reciprocal of ``argmin_g E||x - g x_hat||^2``);
- **dead** fraction: features that never fire on these tokens; **dense** fraction: features
  firing on more than ``dense`` (10%) of them; the **feature density** histogram (log10 of the
  fraction of tokens each feature fires on, SAELens's ``feature_density``);
- **downstream** (``downstream=True``; SAELens's ``ce_loss_score`` and KL, computed over the next-
  token predictions at positions ``skip_first`` on): the model's cross-entropy clean, with the
  dictionary spliced in at those tokens (its error term zeroed through
  :func:`lmscope.features.sites.attach`: the site becomes ``decode(encode(x))``), and with the
  written site zero- or mean-ablated there (the mean over the same tokens); **CE recovered**
  ``(CE_ablated - CE_spliced) / (CE_ablated - CE_clean)`` for each ablation; the mean KL
  divergence ``KL(clean || spliced)`` of the next-token distributions (and of each ablation).

Under torchrun the batches are split over ranks and the sums exchanged
(:func:`lmscope.core.distributed.shard_sum`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lmscope.core import distributed
from lmscope.core.errors import LmscopeError
from lmscope.core.interventions import apply
from lmscope.core.progress import progress_bar
from lmscope.features.dictionary import Dictionary
from lmscope.features.harvest import ordinary
from lmscope.features.sites import attach
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table

DENSE = 0.1  # a feature firing on more than this fraction of tokens is dense
_NAME = "evaluated"  # the attachment name while evaluating


# -- reconstruction metrics ------------------------------------------------------------------------


class Sums:
    """Running sums over tokens of everything :func:`reconstruction_metrics` reports; ``add``
    batches of ``x`` [n, d], ``x_hat`` [n, d], ``f`` [n, d_sae] (float64 sums)."""

    def __init__(self, d: int, d_sae: int):
        self.vector = torch.zeros(d, dtype=torch.float64)  # sum of x
        self.fired = torch.zeros(d_sae, dtype=torch.float64)  # tokens each feature fires on
        self.scalars = torch.zeros(
            8, dtype=torch.float64
        )  # n, ||x||^2, ||e||^2, cos, ratio, ||x_hat||^2, <x, x_hat>, l0

    def add(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        norm, norm_hat = x.norm(dim=-1), x_hat.norm(dim=-1)
        active = f != 0
        self.vector += x.sum(0).cpu()
        self.fired += active.sum(0).double().cpu()
        self.scalars += torch.stack([
            torch.tensor(float(x.shape[0]), dtype=torch.float64), x.pow(2).sum(), (x - x_hat).pow(2).sum(),
            ((x * x_hat).sum(-1) / (norm * norm_hat).clamp_min(1e-30)).sum(), (norm_hat / norm.clamp_min(1e-30)).sum(),
            x_hat.pow(2).sum(), (x * x_hat).sum(), active.sum().double(),
        ]).cpu()  # fmt: skip

    def tensors(self) -> list[Tensor]:
        return [self.vector, self.fired, self.scalars]

    @classmethod
    def of(cls, parts: Sequence[Tensor]) -> Sums:
        sums = cls(parts[0].numel(), parts[1].numel())
        sums.vector, sums.fired, sums.scalars = (p.double().cpu() for p in parts)
        return sums


def reconstruction_metrics(sums: Sums, dense: float = DENSE) -> dict[str, float]:
    """The reconstruction and sparsity numbers of the module docstring from :class:`Sums`."""
    n, sq, err, cos, ratio, sq_hat, dot, l0 = (float(v) for v in sums.scalars)
    if n == 0:
        raise LmscopeError("no tokens to evaluate")
    variance = sq - float(sums.vector.pow(2).sum()) / n
    density = sums.fired / n
    return {
        "tokens": int(n),
        "l0": l0 / n,
        "fvu": err / variance if variance > 0 else math.nan,
        "mse": err / n,
        "cosine": cos / n,
        "l2_ratio": ratio / n,
        "relative_bias": sq_hat / dot if dot else math.nan,
        "dead": float((density == 0).double().mean()),
        "dense": float((density > dense).double().mean()),
    }


def density_histogram(density: Tensor, n_tokens: int) -> dict[str, int]:
    """Features per bin of log10 density (0.5 wide, from the lowest density one token can
    give up to 0), with ``dead`` for features that never fired."""
    low = math.floor(2 * math.log10(1 / max(n_tokens, 1))) / 2
    edges = [low + 0.5 * i for i in range(round(-low / 0.5) + 1)]
    counts = {"dead": int((density == 0).sum())}
    logs = torch.log10(density[density > 0].double())
    for a in edges[:-1]:
        b = a + 0.5
        inside = (logs >= a) & ((logs < b) if b < 0 else (logs <= b))
        counts[f"{a:g}"] = int(inside.sum())
    return counts


# -- downstream ------------------------------------------------------------------------------------


def _next_token_stats(logits: Tensor, ids: Tensor, first: int) -> tuple[Tensor, Tensor]:
    """Log-probabilities [b, p', vocab] of the predictions at positions ``first .. pos - 2`` and
    the cross-entropy of their next tokens [b, p']."""
    logp = F.log_softmax(logits[:, first:-1].double(), dim=-1)
    ce = -logp.gather(-1, ids[:, first + 1 :, None].to(logp.device)).squeeze(-1)
    return logp, ce


def _kl(clean: Tensor, other: Tensor) -> Tensor:
    """``KL(clean || other)`` per prediction from log-probabilities."""
    return (clean.exp() * (clean - other)).sum(-1)


@dataclass
class DictionaryEvaluation:
    """One dictionary's numbers (module docstring) and feature densities."""

    name: str
    site: str
    out_site: str | None
    arch: str
    d_sae: int
    metrics: dict[str, float]
    density: list[float] = field(repr=False)


@dataclass
class Evaluation(Result):
    """Evaluation of dictionaries on held-out tokens (:func:`evaluate`)."""

    corpus: str
    tokens: int
    skip_first: int
    dense: float
    dictionaries: list[DictionaryEvaluation] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "corpus": self.corpus,
            "tokens": self.tokens,
            "skip_first": self.skip_first,
            "dense": self.dense,
            "dictionaries": [dataclasses.asdict(e) for e in self.dictionaries],
        }

    def rows(self) -> list[dict]:
        """One row per dictionary with every number."""
        return [
            {"dictionary": e.name, "site": e.site, "arch": e.arch, "d_sae": e.d_sae, **e.metrics}
            for e in self.dictionaries
        ]

    def text(self) -> str:
        parts = []
        for e in self.dictionaries:
            m = e.metrics
            line = f"{e.name}: FVU {m['fvu']:.3f}, L0 {m['l0']:.1f}, cosine {m['cosine']:.3f}"
            if "ce_recovered_zero" in m:
                line += f", CE recovered {m['ce_recovered_zero']:.3f} (zero) / {m['ce_recovered_mean']:.3f} (mean), KL {m['kl']:.4f}"
            parts.append(line)
        return f"{self.tokens} held-out tokens of {self.corpus}. " + "; ".join(parts) + "."

    def tables(self) -> list[Table]:
        """Reconstruction and sparsity; with the downstream numbers, the cross-entropies and KLs."""
        recon = [
            {"dictionary": e.name, "arch": e.arch, "d_sae": e.d_sae, "tokens": e.metrics["tokens"], "L0": e.metrics["l0"],
             "FVU": e.metrics["fvu"], "cosine": e.metrics["cosine"], "L2 ratio": e.metrics["l2_ratio"],
             "rel. bias": e.metrics["relative_bias"], "dead": e.metrics["dead"], "dense": e.metrics["dense"]}
            for e in self.dictionaries
        ]  # fmt: skip
        out = [Table(f"Reconstruction on held-out tokens of {self.corpus} (dense: fires on > {self.dense:.0%})", recon)]
        downstream = [
            {"dictionary": e.name, "CE clean": e.metrics["ce_clean"], "CE spliced": e.metrics["ce_spliced"],
             "CE zero-abl.": e.metrics["ce_zero_ablated"], "CE mean-abl.": e.metrics["ce_mean_ablated"],
             "recovered (zero)": e.metrics["ce_recovered_zero"], "recovered (mean)": e.metrics["ce_recovered_mean"],
             "KL spliced": e.metrics["kl"]}
            for e in self.dictionaries if "ce_clean" in e.metrics
        ]  # fmt: skip
        if downstream:
            out.append(
                Table("Spliced into the model: next-token cross-entropy (nats) and KL to the clean model", downstream)
            )
        return out

    def figures(self) -> list[Figure]:
        if not self.dictionaries:
            return []
        hists = {e.name: density_histogram(torch.tensor(e.density), self.tokens) for e in self.dictionaries}
        x = list(next(iter(hists.values())))
        series = {name: [h.get(b, 0) for b in x] for name, h in hists.items()}
        return [
            Figure(
                "feature_density",
                "bars",
                "Feature density",
                "log10 fraction of tokens a feature fires on",
                "features",
                x=x,
                series=series,
            )
        ]


def evaluate(
    model,
    dictionaries: Dictionary | Mapping[str, Dictionary],
    windows: Tensor,
    *,
    batch_size: int = 8,
    skip_first: int = 1,
    outlier: float = 10.0,
    dense: float = DENSE,
    downstream: bool = True,
    corpus: str = "",
) -> Evaluation:
    """Evaluate each dictionary (at its own ``site`` / ``out_site``) on token ``windows``
    [n, seq_len] of ``model`` (module docstring): positions ``skip_first`` on, tokens whose norm at
    the site read or written exceeds ``outlier`` times the median left out
    (:func:`lmscope.features.harvest.ordinary`; neither scored nor spliced). Each dictionary is
    spliced in alone."""
    if isinstance(dictionaries, Dictionary):
        dictionaries = {dictionaries.site or "dictionary": dictionaries}
    if not dictionaries:
        raise LmscopeError("no dictionary to evaluate")
    if windows.ndim != 2 or not 0 <= skip_first < windows.shape[1] - 1:
        raise LmscopeError(f"windows [n, seq_len] with more than skip_first + 1 = {skip_first + 1} positions needed")
    batches = list(windows.split(batch_size))
    result = Evaluation(corpus, windows.shape[0] * (windows.shape[1] - skip_first), skip_first, dense)
    for name, d in dictionaries.items():
        with attach(model, d, _NAME) as attachment:
            entry = attachment.entries[0]
            result.dictionaries.append(
                _evaluate_one(model, name, entry, batches, skip_first, outlier, dense, downstream)
            )
    return result


def _kept(cache: Mapping[str, Tensor], sites: Sequence[str], skip_first: int, outlier: float) -> Tensor:
    """Which tokens [batch, pos] are scored and spliced: positions ``skip_first`` on whose norms
    at ``sites`` are no outliers."""
    x = [cache[s][:, skip_first:].flatten(2) for s in sites]
    shape = x[0].shape[:2]
    keep = ordinary([v.flatten(0, 1) for v in x], outlier).view(shape)
    return torch.cat([torch.zeros(shape[0], skip_first, dtype=torch.bool, device=keep.device), keep], 1)


def _where(keep: Tensor, value: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``x -> value(x)`` at the kept tokens, ``x`` elsewhere."""

    def fn(x: Tensor) -> Tensor:
        mask = keep.to(x.device).view(*keep.shape, *([1] * (x.ndim - 2)))
        return torch.where(mask, value(x), x)

    return fn


def _evaluate_one(model, name: str, entry, batches: list[Tensor], skip_first: int, outlier: float, dense: float,
                  downstream: bool) -> DictionaryEvaluation:  # fmt: skip
    d = entry.dictionary
    features, error = str(entry.features), str(entry.error)
    sites = list(dict.fromkeys([str(entry.site), str(entry.out_site)]))
    out_site = sites[-1]
    means = _site_mean(model, sites, batches, skip_first, outlier) if downstream else None

    def one(ids: Tensor) -> list[Tensor]:
        sums = Sums(d.d_out, d.d_sae)
        with torch.no_grad():
            stop = {} if downstream else {"stop_after": entry.out_site.layer}
            clean = model.run(ids, [features, error, *sites], logits=downstream, **stop)
            keep = _kept(clean.cache, sites, skip_first, outlier)
            f = clean.cache[features][keep]
            err = clean.cache[error][keep].to(d.dtype)
            target = entry.space_out.to_dict(clean.cache[out_site][keep], d.dtype)
            sums.add(target, target - err, f)
            parts = sums.tensors()
            if downstream:
                logp, ce = _next_token_stats(clean.logits, ids, skip_first)
                row = [ce.sum()]
                for ivs in (
                    [apply(error, _where(keep, torch.zeros_like))],
                    [apply(out_site, _where(keep, torch.zeros_like))],
                    [apply(out_site, _where(keep, lambda x: means.to(x.dtype).expand_as(x)))],
                ):
                    other_logp, other_ce = _next_token_stats(model.run(ids, interventions=ivs).logits, ids, skip_first)
                    row += [other_ce.sum(), _kl(logp, other_logp).sum()]
                parts.append(torch.stack(row + [torch.tensor(float(ce.numel()), dtype=torch.float64)]).cpu())
        return parts

    with progress_bar(f"evaluate {name}", len(batches)) as advance:

        def counted(ids: Tensor) -> list[Tensor]:
            out = one(ids)
            advance(1)
            return out

        totals = distributed.shard_sum(batches, counted)
    sums = Sums.of(totals[:3])
    metrics = reconstruction_metrics(sums, dense)
    if downstream:
        ce_clean, ce_spliced, kl, ce_zero, kl_zero, ce_mean, kl_mean, _ = (
            float(v) / float(totals[3][-1]) for v in totals[3]
        )
        metrics.update({
            "ce_clean": ce_clean, "ce_spliced": ce_spliced, "ce_zero_ablated": ce_zero, "ce_mean_ablated": ce_mean,
            "ce_recovered_zero": _recovered(ce_zero, ce_spliced, ce_clean),
            "ce_recovered_mean": _recovered(ce_mean, ce_spliced, ce_clean),
            "kl": kl, "kl_zero_ablated": kl_zero, "kl_mean_ablated": kl_mean,
        })  # fmt: skip
    density = (sums.fired / max(1.0, float(sums.scalars[0]))).tolist()
    return DictionaryEvaluation(
        name, str(entry.site), out_site if d.transcoder else None, d.inference_arch, d.d_sae, metrics, density
    )


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    gap = ablated - clean
    return (ablated - spliced) / gap if gap else math.nan


def _site_mean(model, sites: Sequence[str], batches: list[Tensor], skip_first: int, outlier: float) -> Tensor:
    """The mean of the last of ``sites`` (the one written) over the tokens :func:`_kept` keeps
    (its shape without batch and position)."""
    layer = max(model.site(s).layer for s in sites)

    def one(ids: Tensor) -> list[Tensor]:
        with torch.no_grad():
            cache = model.run(ids, sites, logits=False, stop_after=layer).cache
        x = cache[sites[-1]][_kept(cache, sites, skip_first, outlier)]
        return [x.double().sum(0).cpu(), torch.tensor(float(x.shape[0]), dtype=torch.float64)]

    total, count = distributed.shard_sum(batches, one)
    return (total / count).to(model.device, next(model.hf.parameters()).dtype)

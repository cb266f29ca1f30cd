"""Activation outliers: streaming per-channel statistics, OSP excess kurtosis, massive activations.

Statistics stream over a corpus with memory independent of its length. For every site
(default: the residual stream entering layer 0, leaving every layer, and the final norm's
output) and every channel they keep the count, mean and the central sums of squares, cubes
and fourth powers, merged batch by batch with the pairwise update of Pébay (2008, "Formulas
for robust, one-pass parallel computation of covariances and arbitrary-order statistical
moments"), so two partial runs merge into the result of one. They also keep max |x| with the
token where it occurred, the top-k entries by magnitude, a log-scale histogram of |x| (for
the median) and the per-token OSP kurtosis.

- **OSP excess kurtosis** (Park et al. 2025, "Outlier-Safe Pre-Training for Robust 4-Bit
  Quantization of Large Language Models", ``evaluate_kurtosis.py``): for each hidden state
  x of a token, over channels, ``relu(mean(x**4) / std(x)**4 - 3)`` (``std`` unbiased, the
  fourth moment not centred), averaged over tokens, then over the hidden states the model
  returns with ``output_hidden_states`` (embedding output, every layer's output but the last,
  and the final norm's output). OSP's script feeds every token as its own length-1 sequence
  (``protocol="osp"``); ``protocol="in-context"`` feeds windows of running text.
- **Massive activations** (Sun et al. 2024, "Massive Activations in Large Language Models"):
  entries with |x| > 100 and > 1000 times the median |x| of the layer's hidden states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmscope.core import distributed
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.core.progress import progress_bar
from lmscope.core.corpus import Corpus
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table

PROTOCOLS = ("in-context", "osp")
# |x| histogram binned by the top 12 bits of the float32 (exponent and 4 mantissa bits):
# 16 bins per octave over the whole float range, so the median is known to within 4.4%.
_HIST_SHIFT, _HIST_BINS = 19, 4096
MASSIVE_ABS, MASSIVE_RATIO = 100.0, 1000.0


def residual_sites(n_layers: int) -> list[str]:
    """The residual stream: entering layer 0, leaving every layer, and the final norm's output."""
    return ["blocks.0.resid_pre", *(f"blocks.{layer}.resid_post" for layer in range(n_layers)), "final_norm"]


def site_label(name: str) -> str:
    """Short axis label of a residual site: ``emb`` (entering layer 0), the layer index of a
    ``resid_post``, ``norm`` for the final norm, else the name itself."""
    if name == "blocks.0.resid_pre":
        return "emb"
    if name == "final_norm":
        return "norm"
    if name.endswith(".resid_post"):
        return name.split(".")[1]
    return name


def hidden_state_sites(n_layers: int) -> list[str]:
    """The sites equal to Hugging Face's ``output_hidden_states`` (what OSP averages over)."""
    return ["blocks.0.resid_pre", *(f"blocks.{layer}.resid_post" for layer in range(n_layers - 1)), "final_norm"]


def osp_token_kurtosis(x: Tensor) -> Tensor:
    """OSP's per-token excess kurtosis over the last axis: ``relu(mean(x^4)/std(x)^4 - 3)``
    with ``std`` unbiased [...]. The variance comes from the power sums in float64 (cheaper
    than ``torch.std``; a hidden state's mean over channels is small next to its spread)."""
    x = x.float()
    d = x.shape[-1]
    sq = x * x
    s1, s2, s4 = x.sum(-1).double(), sq.sum(-1).double(), (sq * sq).sum(-1).double()
    var = (s2 - s1 * s1 / d) / (d - 1)
    return (s4 / d / var**2 - 3).relu()


@dataclass
class SiteStats:
    """Streaming statistics of one site over tokens, per channel ([d] tensors, float64).

    ``m2``/``m3``/``m4`` are central sums (sum of (x - mean)^k). ``top_*`` hold the ``k``
    largest |x| entries: value (signed), channel and global token index.
    """

    d: int
    k: int = 16
    n: int = 0
    mean: Tensor = None
    m2: Tensor = None
    m3: Tensor = None
    m4: Tensor = None
    absmax: Tensor = None
    absmax_token: Tensor = None
    hist: Tensor = None
    top_value: Tensor = None
    top_channel: Tensor = None
    top_token: Tensor = None
    osp_sum: float = 0.0

    def __post_init__(self):
        zeros = lambda: torch.zeros(self.d, dtype=torch.float64)
        self.mean, self.m2, self.m3, self.m4 = zeros(), zeros(), zeros(), zeros()
        self.absmax = zeros()
        self.absmax_token = torch.zeros(self.d, dtype=torch.long)
        self.hist = torch.zeros(_HIST_BINS, dtype=torch.float64)
        self.top_value = torch.zeros(0, dtype=torch.float64)
        self.top_channel = torch.zeros(0, dtype=torch.long)
        self.top_token = torch.zeros(0, dtype=torch.long)

    # -- accumulation -------------------------------------------------------------------

    def update(self, x: Tensor, tokens: Tensor) -> None:
        """Add ``x`` [n, d] whose rows are the global token indices ``tokens`` [n]."""
        self.merge_(SiteStats.of(x, tokens, self.k))

    @classmethod
    def of(cls, x: Tensor, tokens: Tensor, k: int = 16) -> SiteStats:
        """The statistics of ``x`` [n, d] alone, its rows being the token indices ``tokens`` [n]."""
        x = x.detach().float()
        batch = cls(x.shape[-1], k)
        batch.n = x.shape[0]
        # Sums of powers of x - shift (shift: the float32 batch mean), then corrected to the
        # exact mean shift + d in float64: channels with a large offset keep full precision.
        shift = x.mean(0)
        dev = x - shift
        sq = dev * dev
        n = float(batch.n)
        d = dev.sum(0).double() / n
        s2, s3, s4 = sq.sum(0).double(), (sq * dev).sum(0).double(), (sq * sq).sum(0).double()
        batch.mean = shift.double() + d
        batch.m2 = s2 - n * d**2
        batch.m3 = s3 - 3 * d * s2 + 2 * n * d**3
        batch.m4 = s4 - 4 * d * s3 + 6 * d**2 * s2 - 3 * n * d**4
        mag = x.abs()
        top, row = mag.max(0)
        batch.absmax, batch.absmax_token = top.double(), tokens[row]
        batch.hist = torch.bincount((mag.view(torch.int32) >> _HIST_SHIFT).flatten(), minlength=_HIST_BINS).double()
        k = min(k, mag.numel())
        _, flat = mag.flatten().topk(k)
        batch.top_value = x.flatten()[flat].double()
        batch.top_channel = flat % batch.d
        batch.top_token = tokens[flat // batch.d]
        batch.osp_sum = float(osp_token_kurtosis(x).double().sum())
        return batch

    def merge_(self, other: SiteStats, token_offset: int = 0) -> SiteStats:
        """Merge ``other`` into this one (Pébay's pairwise formulas for the central sums);
        ``token_offset`` is added to ``other``'s token indices."""
        if other.d != self.d:
            raise LmscopeError(f"cannot merge statistics of {other.d} channels into {self.d}")
        if other.n == 0:
            return self
        other_absmax_token = other.absmax_token + token_offset
        other_top_token = other.top_token + token_offset
        if self.n == 0:
            self.__dict__.update({key: value for key, value in other.__dict__.items() if key != "k"})
            self.absmax_token, self.top_token = other_absmax_token, other_top_token
            return self
        na, nb = float(self.n), float(other.n)
        n = na + nb
        delta = other.mean - self.mean
        m2 = self.m2 + other.m2 + delta**2 * na * nb / n
        m3 = self.m3 + other.m3 + delta**3 * na * nb * (na - nb) / n**2 + 3 * delta * (na * other.m2 - nb * self.m2) / n
        m4 = (
            self.m4
            + other.m4
            + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
            + 6 * delta**2 * (na * na * other.m2 + nb * nb * self.m2) / n**2
            + 4 * delta * (na * other.m3 - nb * self.m3) / n
        )
        self.mean = self.mean + delta * nb / n
        self.m2, self.m3, self.m4 = m2, m3, m4
        self.n += other.n
        take = other.absmax > self.absmax
        self.absmax = torch.where(take, other.absmax, self.absmax)
        self.absmax_token = torch.where(take, other_absmax_token, self.absmax_token)
        self.hist = self.hist + other.hist
        values = torch.cat([self.top_value, other.top_value])
        order = values.abs().argsort(descending=True)[: self.k]
        self.top_value = values[order]
        self.top_channel = torch.cat([self.top_channel, other.top_channel])[order]
        self.top_token = torch.cat([self.top_token, other_top_token])[order]
        self.osp_sum += other.osp_sum
        return self

    # -- derived statistics -------------------------------------------------------------

    @property
    def variance(self) -> Tensor:
        """Per-channel population variance [d]."""
        return self.m2 / self.n

    @property
    def skewness(self) -> Tensor:
        """Per-channel skewness ``sqrt(n) m3 / m2^1.5`` [d]."""
        return math.sqrt(self.n) * self.m3 / self.m2**1.5

    @property
    def kurtosis(self) -> Tensor:
        """Per-channel excess kurtosis over tokens, ``n m4 / m2^2 - 3`` (population) [d]."""
        return self.n * self.m4 / self.m2**2 - 3

    @property
    def osp_kurtosis(self) -> float:
        """OSP excess kurtosis of this hidden state: the per-token value averaged over tokens."""
        return self.osp_sum / self.n

    @property
    def median_abs(self) -> float:
        """Median |x| over all entries: the geometric centre of the histogram bin holding it
        (within 4.4%)."""
        cum = self.hist.cumsum(0)
        i = int(torch.searchsorted(cum, cum[-1] / 2))
        edges = torch.tensor([i, i + 1], dtype=torch.int32) << _HIST_SHIFT
        lo, hi = edges.view(torch.float32).double().tolist()
        return math.sqrt(lo * hi) if lo > 0 else hi / 2

    @property
    def massive_threshold(self) -> float:
        """Sun et al.'s threshold: max(100, 1000 x median |x|)."""
        return max(MASSIVE_ABS, MASSIVE_RATIO * self.median_abs)


@dataclass
class OutlierStats:
    """Statistics of every site over a corpus (see the module docstring)."""

    sites: dict[str, SiteStats]
    protocol: str
    n_layers: int
    n_tokens: int = 0
    token_ids: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def merge_(self, other: OutlierStats) -> OutlierStats:
        """Merge a run over further tokens; its token indices are shifted to follow this run's."""
        if set(other.sites) != set(self.sites) or other.protocol != self.protocol:
            raise LmscopeError("cannot merge statistics of different sites or protocols")
        for name, stats in self.sites.items():
            stats.merge_(other.sites[name], token_offset=self.n_tokens)
        self.n_tokens += other.n_tokens
        self.token_ids = torch.cat([self.token_ids, other.token_ids])
        return self

    @property
    def osp_kurtosis(self) -> float:
        """OSP's summary: the per-hidden-state kurtosis averaged over Hugging Face's hidden states."""
        names = hidden_state_sites(self.n_layers)
        return sum(self.sites[s].osp_kurtosis for s in names) / len(names)

    def kurtosis_curve(self) -> dict[str, float]:
        """OSP kurtosis of each site."""
        return {name: s.osp_kurtosis for name, s in self.sites.items()}

    def massive(self, tokenizer=None) -> list[dict]:
        """Massive activations: per site, the channels whose max |x| passes Sun et al.'s
        threshold, with the largest entries' tokens (from the top-k entries)."""
        rows = []
        for name, s in self.sites.items():
            threshold = s.massive_threshold
            for channel in (s.absmax > threshold).nonzero().flatten().tolist():
                hits = (s.top_channel == channel) & (s.top_value.abs() > threshold)
                tokens = s.top_token[hits].tolist() or [int(s.absmax_token[channel])]
                rows.append(
                    {
                        "site": name,
                        "channel": channel,
                        "max_abs": float(s.absmax[channel]),
                        "median_abs": s.median_abs,
                        "ratio": float(s.absmax[channel]) / s.median_abs,
                        "tokens": [self._token(t, tokenizer) for t in tokens[:5]],
                    }
                )
        return rows

    def _token(self, index: int, tokenizer) -> dict:
        token_id = int(self.token_ids[index])
        text = tokenizer.decode([token_id]) if tokenizer is not None else None
        return {"index": index, "id": token_id, "text": text}

    def summary(self, tokenizer=None) -> OutlierSummary:
        """Every number as an :class:`OutlierSummary`: per-site kurtosis, max |x|, median |x|,
        top channels, and the massive activations (tokens decoded with ``tokenizer``)."""
        per_site = {}
        for name, s in self.sites.items():
            kurt = s.kurtosis.nan_to_num(0.0)
            top = kurt.topk(min(5, s.d))
            per_site[name] = {
                "osp_kurtosis": s.osp_kurtosis,
                "max_abs": float(s.absmax.max()),
                "max_abs_channel": int(s.absmax.argmax()),
                "median_abs": s.median_abs,
                "channel_kurtosis_mean": float(kurt.mean()),
                "channel_kurtosis_top": [{"channel": int(c), "kurtosis": float(v)} for v, c in zip(*top)],
                "absmax_per_channel": s.absmax.tolist(),
            }
        return OutlierSummary(self.protocol, self.n_tokens, self.osp_kurtosis, per_site, self.massive(tokenizer))


@dataclass
class OutlierSummary(Result):
    """The outlier statistics of a corpus as plain data.

    ``sites``: per site, ``osp_kurtosis``, ``max_abs`` and its ``max_abs_channel``,
    ``median_abs``, ``channel_kurtosis_mean``, the five channels of largest excess kurtosis over
    tokens (``channel_kurtosis_top``) and ``absmax_per_channel``; ``massive``: the rows of
    :meth:`OutlierStats.massive`; ``osp_kurtosis``: OSP's mean over the hidden states.
    """

    protocol: str
    n_tokens: int
    osp_kurtosis: float
    sites: dict[str, dict]
    massive: list[dict]

    def to_json(self) -> dict:
        return {
            "protocol": self.protocol,
            "n_tokens": self.n_tokens,
            "osp_kurtosis": self.osp_kurtosis,
            "sites": self.sites,
            "massive": self.massive,
        }

    def text(self) -> str:
        return f"Mean OSP excess kurtosis over the hidden states: {self.osp_kurtosis:.2f} ({self.n_tokens} tokens)."

    def tables(self) -> list[Table]:
        """The massive activations: site, channel, max |x|, its ratio to the median, tokens."""
        rows = [
            {
                "hidden state": row["site"],
                "channel": row["channel"],
                "max |x|": row["max_abs"],
                "x median": row["ratio"],
                "tokens": ", ".join(repr(t["text"]) for t in row["tokens"]),
            }
            for row in self.massive
        ]
        return [Table("massive activations", rows or [{"massive activations": "none"}])]

    def figures(self) -> list[Figure]:
        """Per-site OSP kurtosis curve, max and median |x| per site, and max |x| per site and
        channel, over the residual stream (other measured sites are in the JSON only)."""
        sites = {name: s for name, s in self.sites.items() if site_label(name) != name}
        if not sites:
            return []
        labels = [site_label(name) for name in sites]
        xlabel = "hidden state (emb = embedding output, L = output of layer L, norm = final norm)"
        return [
            Figure(
                "kurtosis",
                "lines",
                f"OSP excess kurtosis per hidden state ({self.protocol}; mean {self.osp_kurtosis:.1f})",
                xlabel,
                "excess kurtosis",
                x=labels,
                series={"OSP kurtosis": [s["osp_kurtosis"] for s in sites.values()]},
            ),
            Figure(
                "max_abs",
                "lines",
                "max |x| and median |x| per hidden state",
                xlabel,
                "|x|",
                x=labels,
                series={
                    "max |x|": [s["max_abs"] for s in sites.values()],
                    "median |x|": [s["median_abs"] for s in sites.values()],
                },
                log=True,
            ),
            Figure(
                "max_abs_channels",
                "heatmap",
                "max |x| per hidden state and channel",
                "channel",
                "hidden state",
                x=list(range(len(next(iter(sites.values()))["absmax_per_channel"]))),
                y=labels,
                z=[s["absmax_per_channel"] for s in sites.values()],
                log=True,
                value_label="max |x|",
            ),
        ]


def activation_stats(
    model: Model,
    corpus: Corpus,
    *,
    sites: list[str] | None = None,
    protocol: str = "in-context",
    window: int = 512,
    batch_size: int = 4,
    top_k: int = 16,
) -> OutlierStats:
    """Stream ``corpus`` through ``model`` and accumulate :class:`SiteStats` per site.

    ``protocol="in-context"`` runs non-overlapping windows of ``window`` tokens,
    ``batch_size`` at a time; ``protocol="osp"`` runs every token as its own length-1
    sequence (OSP's script), ``window * batch_size`` tokens per forward. Sites default to
    :func:`residual_sites`; multi-axis sites (e.g. ``attn.k``) are flattened to channels.
    The unembedding is skipped unless ``logits`` is among the sites.
    """
    if protocol not in PROTOCOLS:
        raise LmscopeError(f"unknown protocol {protocol!r} (choose from {', '.join(PROTOCOLS)})")
    names = sites or residual_sites(model.n_layers)
    windows = corpus.windows(window)
    ids = windows.flatten()
    batches = windows.split(batch_size) if protocol == "in-context" else ids.split(window * batch_size)
    starts = torch.tensor([0, *(len(b.flatten()) for b in batches)]).cumsum(0).tolist()

    def batch_stats(i: int) -> dict[str, SiteStats]:
        batch = batches[i]
        inputs = batch if protocol == "in-context" else batch.unsqueeze(1)
        with torch.no_grad():
            cache = model.run(inputs.to(model.device), capture=names, logits="logits" in names).cache
        tokens = torch.arange(starts[i], starts[i] + batch.numel())
        return {name: SiteStats.of(cache[name].flatten(0, 1).flatten(1).cpu(), tokens, top_k) for name in names}

    stats: dict[str, SiteStats] = {}
    with progress_bar(f"activation statistics ({protocol})", ids.numel()) as advance:
        # Under torchrun, batches go round-robin to the ranks and merge in order on each.
        for i, part in enumerate(distributed.ordered_map(range(len(batches)), batch_stats)):
            for name in names:
                stats.setdefault(name, SiteStats(part[name].d, top_k)).merge_(part[name])
            advance(batches[i].numel())
    return OutlierStats(stats, protocol, model.n_layers, starts[-1], ids.clone())

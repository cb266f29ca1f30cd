"""Directions and probes: what a layer represents, read from labelled examples or contrastive pairs.

Input is JSONL, one example per line, either labelled texts ``{"text": ..., "label": 0 | 1}``
or contrastive pairs ``{"positive": ..., "negative": ...}`` (with an optional shared
``"prompt"`` prefixed to both, as in contrastive activation addition). A text may mark a span
with ``[[`` and ``]]``; the markers are removed before tokenising.

Per layer the activation of each example at a site (default the residual stream after the layer,
``blocks.L.resid_post``) is reduced over positions (:data:`POSITIONS`: the last token, the mean
over tokens, or the mean over the marked span's tokens), then:

- **difference of means** (Rimsky et al. 2024, "Steering Llama 2 via Contrastive Activation
  Addition"; Marks & Tegmark 2023, "The Geometry of Truth"): ``mean(x | 1) - mean(x | 0)``;
- **first principal component** (Zou et al. 2023, "Representation Engineering"): for pairs the
  top right singular vector of the pair differences ``x_pos - x_neg`` (not centred, so a shared
  offset counts as signal); for labelled sets that of the activations centred on their mean.
  Unit norm, signed so that class 1 projects higher;
- **logistic regression**: scikit-learn's ``LogisticRegression(C=1.0)`` objective,
  ``0.5 ||w||^2 + C * sum_i log(1 + exp(-s_i (w . z_i + b)))`` with ``s_i = +-1`` on the raw
  activations centred on the training mean (``z = x - mu``; centring only moves the bias), as
  probing papers fit it (Marks & Tegmark 2023), minimised by L-BFGS. Per-feature standardising
  would make the probe's direction favour low-variance channels, not the class direction.

Held-out accuracy: examples split into train and test by group (a pair stays on one side);
directions classify by the projection's threshold halfway between the two training class means.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.jsonl import STRING, TEXT, Kind, Schema, read_rows
from lmscope.core.model import Model
from lmscope.core.progress import progress_bar
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table

POSITIONS = ("last", "mean", "span")
METHODS = ("mean_diff", "pca", "logistic")
SPAN = ("[[", "]]")


@dataclass(frozen=True)
class Examples:
    """Texts with binary labels; ``groups[i]`` is the example's contrastive pair (its own index
    for labelled sets), so splits keep pairs together. ``source``: the data's SHA-256 prefix."""

    texts: list[str]
    labels: list[int]
    groups: list[int]
    paired: bool
    source: str = ""

    def __post_init__(self):
        if len(set(self.labels)) < 2:
            raise LmscopeError("examples need both labels (0 and 1)")

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, str]]) -> Examples:
        """Contrastive pairs ``(positive, negative)``: labels 1 and 0, one group per pair."""
        texts = [t for pair in pairs for t in pair]
        return cls(texts, [1, 0] * len(pairs), [i // 2 for i in range(len(texts))], True, _digest(texts))

    @classmethod
    def from_labels(cls, texts: Sequence[str], labels: Sequence[int]) -> Examples:
        if len(texts) != len(labels):
            raise LmscopeError(f"{len(texts)} texts but {len(labels)} labels")
        return cls(list(texts), [int(y) for y in labels], list(range(len(texts))), False, _digest(texts))


def _digest(texts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


LABELLED = Schema({"text": TEXT, "label": Kind("0 or 1", lambda v: v in (0, 1) and not isinstance(v, float))})
CONTRASTIVE = Schema({"positive": TEXT, "negative": TEXT}, {"prompt": STRING})


def load_examples(path: str | Path) -> Examples:
    """Read labelled texts (:data:`LABELLED`) or contrastive pairs (:data:`CONTRASTIVE`), see
    the module docstring, from JSONL; errors name the file, line and field."""
    pairs, texts, labels = [], [], []
    for where, row, schema in read_rows(path, LABELLED, CONTRASTIVE, what="examples"):
        if schema is CONTRASTIVE:
            prompt = row.get("prompt", "")
            pairs.append((prompt + row["positive"], prompt + row["negative"]))
        else:
            texts.append(row["text"])
            labels.append(int(row["label"]))  # true/false read as 1/0
        for text in pairs[-1] if schema is CONTRASTIVE else texts[-1:]:
            try:
                _span(text)
            except LmscopeError as e:
                raise LmscopeError(f"{where}: {e}") from None
    if pairs and texts:
        raise LmscopeError(f"{path}: mixes labelled texts and contrastive pairs")
    if texts and len(set(labels)) < 2:
        raise LmscopeError(f"{path}: every example has label {labels[0]}; probes need both labels (0 and 1)")
    return Examples.from_pairs(pairs) if pairs else Examples.from_labels(texts, labels)


# -- activations -----------------------------------------------------------------------------


def _span(text: str) -> tuple[str, tuple[int, int] | None]:
    """The text without span markers and the span's character range (None if unmarked)."""
    start = text.find(SPAN[0])
    if start < 0:
        return text, None
    end = text.find(SPAN[1], start)
    if end < 0:
        raise LmscopeError(f"unclosed span marker in {text[:60]!r}")
    inner = text[start + len(SPAN[0]) : end]
    return text[:start] + inner + text[end + len(SPAN[1]) :], (start, start + len(inner))


def pooling_weights(model: Model, texts: Sequence[str], position: str) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids, attention mask and per-token pooling weights [batch, pos] (rows sum to 1)."""
    if position not in POSITIONS:
        raise LmscopeError(f"unknown position {position!r} (choose from {', '.join(POSITIONS)})")
    if model.tokenizer is None:
        raise LmscopeError(f"model {model.name} has no tokenizer")
    clean, spans = zip(*(_span(t) for t in texts), strict=True)
    model.check_length(clean)
    enc = model.tokenizer(list(clean), return_tensors="pt", padding=True, padding_side="right", **_offsets(position))
    mask = enc["attention_mask"].float()
    if position == "last":
        weights = torch.zeros_like(mask)
        weights[torch.arange(len(texts)), mask.sum(1).long() - 1] = 1.0
    elif position == "mean":
        weights = mask
    else:
        offsets = enc["offset_mapping"]  # [batch, pos, 2] character ranges
        weights = torch.zeros_like(mask)
        for i, span in enumerate(spans):
            if span is None:
                raise LmscopeError(f"position 'span' needs a [[marked]] span in every text: {clean[i][:60]!r}")
            a, b = span
            weights[i] = ((offsets[i, :, 0] < b) & (offsets[i, :, 1] > a)).float() * mask[i]
            if not weights[i].any():
                raise LmscopeError(f"the marked span covers no token in {clean[i][:60]!r}")
    weights = weights / weights.sum(1, keepdim=True)
    return enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device), weights


def _offsets(position: str) -> dict:
    return {"return_offsets_mapping": True} if position == "span" else {}


def features(
    model: Model,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    site: str = "resid_post",
    position: str = "last",
    batch_size: int = 16,
) -> Tensor:
    """Each text's activation at ``blocks.{L}.{site}`` for every layer L in ``layers``, pooled
    over positions as ``position`` says: [n_texts, n_layers, d] float32 on the CPU."""
    names = [f"blocks.{layer}.{site}" for layer in layers]
    for name in names:
        model.site(name)  # unknown sites and layers fail before any forward
    out = []
    with torch.no_grad(), progress_bar("activations", len(texts)) as advance:
        for start in range(0, len(texts), batch_size):
            ids, mask, weights = pooling_weights(model, texts[start : start + batch_size], position)
            cache = model.run(
                {"input_ids": ids, "attention_mask": mask}, names, logits=False, stop_after=max(layers)
            ).cache
            stacked = torch.stack([cache[n].float().cpu() for n in names], 1)  # [batch, layers, pos, d]
            out.append(torch.einsum("blpd,bp->bld", stacked, weights))
            advance(len(ids))
    return torch.cat(out)


# -- directions and probes ---------------------------------------------------------------------


def mean_difference(x: Tensor, labels: Tensor) -> Tensor:
    """``mean(x | label 1) - mean(x | label 0)``: x [n, d], labels [n] -> [d]."""
    return x[labels == 1].mean(0) - x[labels == 0].mean(0)


def first_component(x: Tensor, labels: Tensor, groups: Tensor | None = None) -> Tensor:
    """Unit first principal component [d] (see the module docstring), signed so that class 1
    projects higher on average. With ``groups`` (pairs), of the pair differences."""
    if groups is not None:
        pos = {int(g): x[i] for i, g in enumerate(groups) if labels[i] == 1}
        neg = {int(g): x[i] for i, g in enumerate(groups) if labels[i] == 0}
        data = torch.stack([pos[g] - neg[g] for g in pos if g in neg])
    else:
        data = x - x.mean(0)
    direction = torch.linalg.svd(data.double(), full_matrices=False).Vh[0].to(x.dtype)
    return direction if float(mean_difference(x, labels) @ direction) >= 0 else -direction


@dataclass
class LogisticProbe:
    """A logistic-regression probe: ``p(1 | x) = sigmoid(w . (x - mu) + b)``."""

    weight: Tensor  # [d]
    bias: float
    mu: Tensor  # [d]

    def logits(self, x: Tensor) -> Tensor:
        """Log-odds of class 1: x [n, d] -> [n]."""
        return (x - self.mu) @ self.weight + self.bias

    @property
    def direction(self) -> Tensor:
        """The probe's direction ``w / |w|`` [d]."""
        return self.weight / self.weight.norm()


def fit_logistic(x: Tensor, labels: Tensor, c: float = 1.0, max_iter: int = 200) -> LogisticProbe:
    """Minimise scikit-learn's L2 logistic objective (module docstring) with L-BFGS, in float64."""
    mu = x.mean(0)
    z = (x - mu).double()
    s = labels.double() * 2 - 1
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        opt.zero_grad()
        value = 0.5 * w @ w + c * torch.nn.functional.softplus(-s * (z @ w + b)).sum()
        value.backward()
        return value

    opt.step(loss)
    return LogisticProbe(w.detach().float(), float(b.detach()), mu)


def threshold_accuracy(direction: Tensor, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]) -> float:
    """Accuracy on ``test`` of classifying by projection on ``direction``, the threshold halfway
    between the training classes' mean projections (class 1 on the side of its mean)."""
    (x, y), (xt, yt) = train, test
    proj = x @ direction
    hi, lo = proj[y == 1].mean(), proj[y == 0].mean()
    guess = ((xt @ direction - (hi + lo) / 2) * torch.sign(hi - lo)) > 0
    return float((guess.long() == yt).float().mean())


def split(examples: Examples, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Train and test example indices, split by group with ``random.Random(seed)``."""
    groups = sorted(set(examples.groups))
    random.Random(seed).shuffle(groups)
    n_test = max(1, round(len(groups) * test_fraction)) if test_fraction > 0 else 0
    held = set(groups[:n_test])
    test = [i for i, g in enumerate(examples.groups) if g in held]
    train = [i for i, g in enumerate(examples.groups) if g not in held]
    return torch.tensor(train), torch.tensor(test, dtype=torch.long)


@dataclass
class ProbeResult(Result):
    """Per layer: held-out accuracy of each method, and its direction (unit norm, [n_layers, d])."""

    model: str
    site: str
    position: str
    layers: list[int]
    accuracy: dict[str, list[float]]  # method -> per layer
    directions: dict[str, Tensor] = field(repr=False)  # method -> [n_layers, d]
    mean_diff: Tensor = field(repr=False)  # [n_layers, d], not normalised (the steering vector)
    n_train: int = 0
    n_test: int = 0
    data: str = ""

    def best_layer(self, method: str = "logistic") -> int:
        accs = self.accuracy[method]
        return self.layers[max(range(len(accs)), key=accs.__getitem__)]

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "site": self.site,
            "position": self.position,
            "layers": self.layers,
            "accuracy": self.accuracy,
            "best_layer": {m: self.best_layer(m) for m in self.accuracy},
            "n_train": self.n_train,
            "n_test": self.n_test,
            "data": self.data,
        }

    def text(self) -> str:
        best = self.best_layer()
        acc = self.accuracy["logistic"][self.layers.index(best)]
        return f"Best logistic probe at layer {best}: held-out accuracy {acc:.3f} ({self.n_test} test examples)."

    def tables(self) -> list[Table]:
        rows = [
            {"layer": layer, **{m: round(a[i], 4) for m, a in self.accuracy.items()}}
            for i, layer in enumerate(self.layers)
        ]
        return [Table(f"Held-out accuracy per layer ({self.site}, position {self.position})", rows)]

    def figures(self) -> list[Figure]:
        return [
            Figure(
                "probe_accuracy",
                "lines",
                f"{self.model}: held-out probe accuracy",
                "layer",
                "accuracy",
                x=self.layers,
                series=self.accuracy,
            )
        ]


def probe(
    model: Model,
    examples: Examples,
    layers: Sequence[int] | None = None,
    *,
    site: str = "resid_post",
    position: str = "last",
    test_fraction: float = 0.25,
    seed: int = 0,
    batch_size: int = 16,
) -> ProbeResult:
    """Directions and probes per layer with held-out accuracy (see the module docstring)."""
    layers = list(range(model.n_layers)) if layers is None else [int(layer) for layer in layers]
    x = features(model, examples.texts, layers, site=site, position=position, batch_size=batch_size)
    y = torch.tensor(examples.labels)
    train, test = split(examples, test_fraction, seed)
    if len(set(y[train].tolist())) < 2:
        raise LmscopeError("the training split lacks one of the labels: add examples")
    groups = torch.tensor(examples.groups)[train] if examples.paired else None
    accuracy: dict[str, list[float]] = {m: [] for m in METHODS}
    directions: dict[str, list[Tensor]] = {m: [] for m in METHODS}
    diffs = []
    for i in range(len(layers)):
        xs, ys = x[train, i], y[train]
        held = (x[test, i], y[test])
        diff = mean_difference(xs, ys)
        diffs.append(diff)
        logistic = fit_logistic(xs, ys)
        for method, direction in (
            ("mean_diff", diff / diff.norm()),
            ("pca", first_component(xs, ys, groups)),
            ("logistic", logistic.direction),
        ):
            directions[method].append(direction)
            if method == "logistic":
                acc = (
                    float(((logistic.logits(held[0]) > 0).long() == held[1]).float().mean())
                    if len(test)
                    else float("nan")
                )
            else:
                acc = threshold_accuracy(direction, (xs, ys), held) if len(test) else float("nan")
            accuracy[method].append(acc)
    return ProbeResult(
        model.name,
        site,
        position,
        layers,
        accuracy,
        {m: torch.stack(d) for m, d in directions.items()},
        torch.stack(diffs),
        len(train),
        len(test),
        examples.source,
    )

"""Semi-nonnegative matrix factorisation (SNMF) of MLP activations.

Shafran et al. 2025, "Dissecting MLP activations via semi-nonnegative matrix factorization",
factorise the MLP's hidden activations ``mlp.post`` (the input of the down-projection) of one
layer over a corpus. With ``A`` [n_neurons, n_tokens] (one column per token)::

    A ~= F G^T          F [n_neurons, rank]: the features, in neuron space, any sign
                        G [n_tokens, rank] >= 0: each token's coefficients on them

and every iteration of :func:`fit_snmf` runs, as their code does:

1. **F step** (:func:`f_step`): the least-squares ``F = argmin ||A - F G^T||``, i.e.
   ``F = A G (G^T G)^-1`` (a ridge of ``ridge`` on the diagonal only guards a singular ``G^T G``);
2. **winner-take-all** (:func:`winner_take_all`): each column of F keeps its
   ``ceil(sparsity * n_neurons)`` entries of largest magnitude, the rest set to 0, so a feature
   is a small set of neurons;
3. **balance** (:func:`balance`): each column of G scaled to unit norm, F's column times that
   norm (``F G^T`` unchanged);
4. **G step** (:func:`g_step`): Ding, Li & Jordan's (2010, "Convex and semi-nonnegative matrix
   factorizations", eq. 8) multiplicative rule, which keeps G >= 0 and, F fixed, never increases
   ``||A - F G^T||``::

       G <- G * sqrt(((A^T F)^+ + G (F^T F)^-) / ((A^T F)^- + G (F^T F)^+))

   with ``X^+ = (|X| + X) / 2`` and ``X^- = (|X| - X) / 2``.

**Early stopping** on the relative reconstruction error ``||A - F G^T||_F / ||A||_F``: the fit
stops when it has not improved on the best by more than ``tol`` for ``patience`` iterations (or
after ``max_iter``) and returns the best factors seen (winner-take-all can raise the error of an
iteration, so the last is not always the best).

**Top tokens** (:func:`top_tokens`): a feature's input side is read through G: the token
occurrences with the largest coefficients on it, grouped by the token's text.

Steering with a feature adds ``coeff * F[:, j]`` at ``blocks.L.mlp.post``; ``lmscope steer
--vectors FILE#j`` does it in the evaluated sweep, with the coefficient calibrated to a target KL
(``--match-kl``; :mod:`lmscope.steering.vectors`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lmscope.core.corpus import BUNDLED, load_corpus
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.core.progress import progress_bar
from lmscope.core.tensorfile import load_tensors, save_tensors
from lmscope.features.vocab import logit_effects, token_texts
from lmscope.reports.command import Command, RunWriter, option
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table

INITS = ("random", "kmeans")
FORMAT = "lmscope-snmf"


# -- the updates ---------------------------------------------------------------------------------


def positive(x: Tensor) -> Tensor:
    """``X^+ = (|X| + X) / 2``."""
    return (x.abs() + x) / 2


def negative(x: Tensor) -> Tensor:
    """``X^- = (|X| - X) / 2`` (so ``X = X^+ - X^-``, both >= 0)."""
    return (x.abs() - x) / 2


def f_step(A: Tensor, G: Tensor, ridge: float = 0.0) -> Tensor:
    """The least-squares features ``F = A G (G^T G + ridge I)^-1`` [n_neurons, rank] of ``A``
    [n_neurons, n_tokens] given ``G`` [n_tokens, rank] (``ridge`` 0: the exact minimiser of
    ``||A - F G^T||_F``, which ``torch.linalg.lstsq(G, A^T)`` also gives)."""
    gram = G.T @ G
    if ridge:
        gram = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram, (A @ G).T).T


def g_step(A: Tensor, F: Tensor, G: Tensor, eps: float = 1e-12) -> Tensor:
    """Ding et al.'s multiplicative update of ``G`` >= 0 [n_tokens, rank] with ``F`` fixed
    (module docstring); ``eps`` keeps the denominator positive."""
    P, Q = A.T @ F, F.T @ F
    numerator = positive(P) + G @ negative(Q)
    denominator = negative(P) + G @ positive(Q)
    return G * torch.sqrt(numerator / (denominator + eps))


def winner_take_all(F: Tensor, sparsity: float) -> Tensor:
    """``F`` with each column keeping only its ``ceil(sparsity * n_neurons)`` entries of largest
    magnitude (Shafran et al.'s winner-take-all); ``sparsity`` 1 keeps every entry."""
    keep = max(1, math.ceil(sparsity * F.shape[0]))
    if keep >= F.shape[0]:
        return F
    index = F.abs().topk(keep, dim=0).indices
    return torch.zeros_like(F).scatter(0, index, F.gather(0, index))


def balance(F: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """``(F * n, G / n)`` with ``n`` [rank] the norms of G's columns: unit-norm token
    coefficients, the product ``F G^T`` unchanged."""
    norms = G.norm(dim=0).clamp_min(1e-12)
    return F * norms, G / norms


def sq_error(A: Tensor, F: Tensor, G: Tensor, chunk: int = 4096) -> Tensor:
    """``||A - F G^T||_F^2``, the residual formed ``chunk`` tokens at a time."""
    return sum(((a - F @ g.T) ** 2).sum() for a, g in zip(A.split(chunk, 1), G.split(chunk), strict=True))


# -- the fit ---------------------------------------------------------------------------------------


@dataclass
class Fit:
    """An SNMF fit: ``F`` [n_neurons, rank], ``G`` [n_tokens, rank] >= 0 (the best iteration's),
    the relative reconstruction error after each iteration, the best iteration and why it stopped."""

    F: Tensor
    G: Tensor
    errors: list[float] = field(default_factory=list)
    best: int = 0
    stopped: str = ""

    @property
    def error(self) -> float:
        """The relative reconstruction error of (F, G)."""
        return self.errors[self.best] if self.errors else math.nan


def _init(A: Tensor, rank: int, init: str, generator: torch.Generator) -> Tensor:
    """The starting ``G`` [n_tokens, rank] > 0: uniform random (their default), or ``0.2`` plus
    the cluster indicators of spherical k-means over the tokens (Ding et al. start from k-means
    indicators + 0.2; tokens of one feature lie along a ray, so they are clustered by direction),
    seeded by k-means++ and run for 10 iterations."""
    n = A.shape[1]
    if init == "random":
        return torch.rand(n, rank, generator=generator, dtype=A.dtype).to(A.device).clamp_min(1e-6)
    X = torch.nn.functional.normalize(A.T, dim=1)
    centres = X[_kmeans_pp(X, rank, generator)]
    for _ in range(10):
        labels = (X @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, labels, X)
        centres = torch.where(sums.norm(dim=1, keepdim=True) > 0, torch.nn.functional.normalize(sums, dim=1), centres)
    return torch.nn.functional.one_hot(labels, rank).to(A.dtype) + 0.2


def _kmeans_pp(X: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) on unit rows ``X``: the indices of ``k``
    rows, each drawn with probability proportional to its squared distance to the nearest seed."""
    first = int(torch.randint(X.shape[0], (1,), generator=generator))
    picked = [first]
    dist = (2 - 2 * (X @ X[first])).clamp_min(0)
    for _ in range(k - 1):
        weights = dist.cpu().double()
        if not weights.sum() > 0:
            weights = torch.ones_like(weights)
        i = int(torch.multinomial(weights, 1, generator=generator))
        picked.append(i)
        dist = torch.minimum(dist, (2 - 2 * (X @ X[i])).clamp_min(0))
    return torch.tensor(picked, device=X.device)


def fit_snmf(
    A: Tensor,
    rank: int,
    *,
    sparsity: float = 0.01,
    max_iter: int = 500,
    tol: float = 1e-5,
    patience: int = 25,
    init: str = "random",
    seed: int = 0,
    ridge: float = 1e-6,
    on_iteration: Callable[[int, float], None] | None = None,
) -> Fit:
    """Factorise ``A`` [n_neurons, n_tokens] as ``F G^T`` (module docstring): ``rank`` features,
    winner-take-all keeping a ``sparsity`` fraction of each feature's neurons, early stopping
    after ``patience`` iterations without an improvement of the relative error by more than
    ``tol``. ``on_iteration(i, relative_error)`` is called after each iteration."""
    if A.ndim != 2:
        raise LmscopeError(f"SNMF factorises a matrix [n_neurons, n_tokens], got shape {list(A.shape)}")
    if not 1 <= rank <= min(A.shape):
        raise LmscopeError(f"SNMF rank {rank} must be between 1 and min(n_neurons, n_tokens) = {min(A.shape)}")
    if not 0 < sparsity <= 1:
        raise LmscopeError(f"SNMF sparsity {sparsity} must be in (0, 1] (the fraction of neurons a feature keeps)")
    if init not in INITS:
        raise LmscopeError(f"unknown SNMF init '{init}' (known: {', '.join(INITS)})")
    a2 = (A * A).sum()
    if not a2 > 0:
        raise LmscopeError("SNMF of an all-zero matrix")
    norm = a2.sqrt()
    G = _init(A, rank, init, torch.Generator().manual_seed(seed))
    fit = Fit(torch.zeros(A.shape[0], rank, dtype=A.dtype, device=A.device), G)
    since_best = 0
    for it in range(max_iter):
        F = winner_take_all(f_step(A, G, ridge), sparsity)
        F, G = balance(F, G)
        G = g_step(A, F, G)
        error = float(sq_error(A, F, G).sqrt() / norm)
        fit.errors.append(error)
        if on_iteration is not None:
            on_iteration(it, error)
        if not math.isfinite(error):
            fit.stopped = f"the error became {error} at iteration {it}"
            break
        if it == 0 or error < fit.error - tol:
            fit.F, fit.G, fit.best, since_best = F, G, it, 0
        else:
            since_best += 1
            if since_best >= patience:
                fit.stopped = f"no improvement above {tol:g} for {patience} iterations"
                break
    else:
        fit.stopped = f"max_iter {max_iter} reached"
    return fit


# -- reading the features --------------------------------------------------------------------------


def top_tokens(G: Tensor, texts: list[str], *, occurrences: int = 100, n: int = 8) -> list[list[tuple[str, float, int]]]:
    """Per feature (column of ``G`` [n_tokens, rank]), its top tokens through G: of the
    ``occurrences`` token occurrences with the largest coefficients, grouped by the token's text
    (``texts[i]``: occurrence i's token), the ``n`` texts of largest summed coefficient, as
    ``(text, summed coefficient, count)``."""
    if G.shape[0] != len(texts):
        raise LmscopeError(f"G has {G.shape[0]} tokens but {len(texts)} token texts were given")
    k = min(occurrences, G.shape[0])
    values, index = G.float().topk(k, dim=0)
    out = []
    for j in range(G.shape[1]):
        groups: dict[str, list[float]] = {}
        for v, i in zip(values[:, j].tolist(), index[:, j].tolist(), strict=True):
            if v > 0:
                groups.setdefault(texts[i], []).append(v)
        ranked = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:n]
        out.append([(text, sum(vs), len(vs)) for text, vs in ranked])
    return out


# -- saving ---------------------------------------------------------------------------------------


def save_snmf(path: str | Path, F: Tensor, G: Tensor, token_ids: Tensor, *, layer: int, model: str, **meta) -> Path:
    """Write the features ``F`` [n_neurons, rank], coefficients ``G`` and the tokens' ids to
    ``path`` (safetensors, format ``lmscope-snmf``; site ``blocks.<layer>.mlp.post``)."""
    tensors = {"F": F, "G": G, "token_ids": token_ids}
    return save_tensors(path, tensors, FORMAT, layer=layer, model=model, site=f"blocks.{layer}.mlp.post", **meta)


def load_snmf(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors (``F``, ``G``, ``token_ids``) and metadata (``layer``, ``site``, ``model``) of
    a file written by :func:`save_snmf`."""
    tensors, meta = load_tensors(path, FORMAT)
    if "F" not in tensors or "layer" not in meta:
        raise LmscopeError(f"{path}: an lmscope-snmf file without features F or their layer")
    return tensors, meta


# -- activations -----------------------------------------------------------------------------------


def mlp_activations(model: Model, layer: int, windows: Tensor, batch_size: int = 8) -> Tensor:
    """``A`` [d_mlp, n_tokens]: ``blocks.<layer>.mlp.post`` of every token of ``windows``
    [n_windows, length] (token ids), window by window, as float32 on the model's device."""
    site = f"blocks.{layer}.mlp.post"
    model.site(site)
    columns = []
    with torch.no_grad(), progress_bar("mlp.post activations", len(windows)) as advance:
        for batch in windows.split(batch_size):
            x = model.run(batch, [site], logits=False, stop_after=layer).cache[site]
            columns.append(x.flatten(0, 1).float())
            advance(len(batch))
    return torch.cat(columns).T


# -- the command -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SNMFSettings:
    """``lmscope features snmf``: SNMF of one layer's MLP activations over a corpus."""

    layer: int = option(help="the layer whose mlp.post activations are factorised")
    rank: int = option(32, "number of features")
    tokens: int = option(8192, "corpus tokens (columns of A)")
    corpus: str = option("wikitext2", "text or JSONL file, or the bundled 'wikitext2' (test split)")
    window: int = option(128, "tokens per corpus window")
    skip_first: int = option(1, "tokens at the start of every window left out (the first token's outsized activations)")
    sparsity: float = option(0.01, "winner-take-all: the fraction of neurons each feature keeps")
    init: str = option("kmeans", "start of G: kmeans (spherical k-means indicators + 0.2) or random")
    max_iter: int = option(500, "most iterations")
    patience: int = option(25, "stop after this many iterations without improvement")
    tol: float = option(1e-5, "an improvement of the relative error smaller than this does not count")
    seed: int = option(0, "seed of the initialisation")
    top: int = option(8, "top tokens shown per feature")

    def __post_init__(self) -> None:
        checks = [(self.rank >= 1, "--rank must be at least 1"), (self.tokens >= 1, "--tokens must be positive"),
                  (self.window >= 2, "--window must be at least 2"),
                  (0 <= self.skip_first < self.window, "--skip-first must be in [0, --window)"),
                  (0 < self.sparsity <= 1, "--sparsity must be in (0, 1]"),
                  (self.init in INITS, f"--init must be one of {', '.join(INITS)}"),
                  (self.max_iter >= 1 and self.patience >= 1, "--max-iter and --patience must be at least 1"),
                  (self.tol >= 0, "--tol must be non-negative"), (self.top >= 1, "--top must be at least 1")]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise LmscopeError(message)
        if self.corpus not in BUNDLED and not Path(self.corpus).is_file():
            raise LmscopeError(f"--corpus {self.corpus}: no such file (or the bundled 'wikitext2')")


@dataclass
class SNMFFit(Result):
    """The factorisation of one layer's ``mlp.post`` activations: ``F`` [d_mlp, rank], ``G``
    [n_tokens, rank] >= 0, the tokens' ids, the relative error per iteration; written to
    ``snmf.safetensors`` (:func:`save_snmf`)."""

    model: str
    layer: int
    F: Tensor
    G: Tensor
    token_ids: Tensor
    errors: list[float]
    best: int
    stopped: str
    sparsity: float

    @property
    def error(self) -> float:
        return self.errors[self.best]

    def to_json(self) -> dict:
        return {"model": self.model, "layer": self.layer, "site": f"blocks.{self.layer}.mlp.post",
                "d_mlp": self.F.shape[0], "rank": self.F.shape[1], "tokens": self.G.shape[0],
                "relative_error": self.error, "best_iteration": self.best, "iterations": len(self.errors),
                "stopped": self.stopped, "sparsity": self.sparsity,
                "neurons_per_feature": (self.F != 0).sum(0).tolist(), "errors": self.errors}  # fmt: skip

    def text(self) -> str:
        return (f"{self.model} layer {self.layer}: {self.F.shape[1]} SNMF features of {self.G.shape[0]} tokens' "
                f"mlp.post; relative reconstruction error {self.error:.4f} at iteration {self.best} "
                f"({self.stopped}).")  # fmt: skip

    def figures(self) -> list[Figure]:
        return [Figure("snmf_error", "lines", f"{self.model} layer {self.layer}: SNMF reconstruction",
                       "iteration", "||A - F G^T|| / ||A||", x=list(range(len(self.errors))),
                       series={"relative error": self.errors})]  # fmt: skip


@dataclass
class SNMFFeatures(Result):
    """Per feature: its top tokens through G (occurrences with the largest coefficients, grouped
    by text), its share of G's mass, its neurons, and the tokens its direction promotes and
    suppresses (logit effects through the down-projection, :mod:`lmscope.features.vocab`)."""

    rows: list[dict]

    def tables(self) -> list[Table]:
        return [Table("SNMF features: top tokens through G, neurons kept, logit effects", self.rows)]


def _feature_rows(model: Model, fit: SNMFFit, top: int) -> SNMFFeatures:
    texts = token_texts(model, fit.token_ids)
    tops = top_tokens(fit.G, texts, n=top)
    mass = fit.G.sum(0) / fit.G.sum()
    site = model.site(f"blocks.{fit.layer}.mlp.post")
    effects = logit_effects(model, site, fit.F.T.to(model.device))
    up, down = effects.topk(top, dim=1).indices, (-effects).topk(top, dim=1).indices
    rows = []
    for j in range(fit.F.shape[1]):
        neurons = fit.F[:, j].abs().topk(min(5, fit.F.shape[0])).indices.tolist()
        rows.append({
            "feature": j,
            "top tokens": " | ".join(f"{t!r} ({count})" for t, _, count in tops[j]),
            "G mass": float(mass[j]),
            "neurons": int((fit.F[:, j] != 0).sum()),
            "largest neurons": ", ".join(map(str, neurons)),
            "promotes": " ".join(repr(t) for t in token_texts(model, up[j])),
            "suppresses": " ".join(repr(t) for t in token_texts(model, down[j])),
        })  # fmt: skip
    return SNMFFeatures(rows)


def run_snmf(model: Model, settings: SNMFSettings, out: RunWriter) -> SNMFFeatures:
    """Semi-nonnegative matrix factorisation of one layer's MLP activations (Shafran et al. 2025): features
    in neuron space kept sparse by winner-take-all, nonnegative token coefficients, each feature's top tokens
    and logit effects; the factors written to snmf.safetensors (steer with `lmscope steer --vectors
    snmf.safetensors#j`)."""
    if not 0 <= settings.layer < model.n_layers:
        raise LmscopeError(f"--layer {settings.layer} out of range (model has {model.n_layers} layers)")
    model.site(f"blocks.{settings.layer}.mlp.post")

    def fit() -> SNMFFit:
        per_window = settings.window - settings.skip_first
        n_windows = math.ceil(settings.tokens / per_window)
        corpus = load_corpus(model, settings.corpus, max_tokens=n_windows * settings.window)
        windows = corpus.windows(settings.window)[:n_windows]
        A = mlp_activations(model, settings.layer, windows)
        A = A.unflatten(1, windows.shape)[:, :, settings.skip_first :].flatten(1)[:, : settings.tokens]
        ids = windows[:, settings.skip_first :].flatten()[: settings.tokens]
        if settings.rank > min(A.shape):
            raise LmscopeError(f"--rank {settings.rank} exceeds min(d_mlp, tokens) = {min(A.shape)}")
        with progress_bar("SNMF", settings.max_iter) as advance:
            result = fit_snmf(A, settings.rank, sparsity=settings.sparsity, max_iter=settings.max_iter,
                              tol=settings.tol, patience=settings.patience, init=settings.init, seed=settings.seed,
                              on_iteration=lambda i, e: advance(1))  # fmt: skip
        return SNMFFit(model.name, settings.layer, result.F.cpu(), result.G.cpu(), ids, result.errors, result.best,
                       result.stopped, settings.sparsity)  # fmt: skip

    factors = out.part("fit", "SNMF", "A = F G^T of mlp.post activations, G >= 0, F sparse by winner-take-all.", fit)
    save_snmf(out.file("snmf.safetensors"), factors.F, factors.G, factors.token_ids, layer=factors.layer,
              model=model.name, relative_error=factors.error, corpus=settings.corpus)  # fmt: skip
    return out.part("features", "Features", "Top tokens through G and logit effects through the down-projection.",
                    lambda: _feature_rows(model, factors, settings.top))


SNMF = Command("features snmf", SNMFSettings, run_snmf)

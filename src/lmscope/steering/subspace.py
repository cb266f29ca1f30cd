"""Subspace interventions: distributed alignment search (DAS) and the illusion check.

**DAS** (Geiger et al. 2023, "Finding alignments between interpretable causal variables and
distributed neural representations"; pyvene's ``LowRankRotatedSpaceIntervention``) learns a
k-dimensional subspace span(B) of a site, B ``[features, k]`` with orthonormal columns (kept so by
``torch.nn.utils.parametrizations.orthogonal``), such that the interchange intervention
:func:`lmscope.core.interventions.subspace_patch`, ``x' = x + (s - x) B B^T`` with ``x`` the base
run's activation and ``s`` the source run's, makes the model output the *counterfactual label*: what
a high-level causal model predicts for the base input with the variable set to its value on the
source input. It minimises the cross-entropy of the final-position logits of the intervened base
run against those labels, the model frozen. Its score is the **interchange-intervention accuracy**
(IIA): the fraction of pairs whose intervened final-position argmax is the counterfactual label,
on the training pairs and on held-out pairs.

**The illusion check** (Makelov, Lange, Geiger & Nanda, "Is This the Subspace You Are Looking
For? An Interpretability Illusion for Subspace Activation Patching", ICLR 2024): a subspace
patch can change the output without the model using the subspace, by moving the activation along
a *causally disconnected* direction (one the downstream weights never read, but whose value
differs between base and source) and, through the same patch, along a *dormant* direction (one
the downstream weights read, but whose value never varies on the data). The check splits the
subspace by the weights that read the site downstream, ``R`` (:func:`readers`):

    v = v_row + v_null,  v_row in the row space of R,  v_null in its null space (R v_null = 0),

patches span(B_row) and span(B_null) (orthonormal bases of the two parts of B) alone, and compares
each effect with the whole subspace's. ``flagged``: the whole subspace has an effect (at least
``min_effect``) but its row-space part alone keeps less than ``ratio`` of it, i.e. the effect
needs the part downstream weights cannot read (Makelov et al.'s criterion for the dormant-pathway
illusion: the row-space component alone does not reproduce the patch).

The **effect** of a patch is the fractional change of the logit difference (Makelov et al.'s
fractional logit difference decrease, signed to the counterfactual): with ``LD = logit[label] -
logit[base label]`` at the final position (the base label is the base run's own answer unless
given), ``effect = mean(LD(patched) - LD(base)) / mean(-LD(base))`` over the pairs whose label
differs from the base label: 0 is no change, 1 is a tie, 2 the base's preference mirrored.

Usage::

    from lmscope.steering.subspace import das, illusion_check

    result = das(model, "blocks.6.resid_post", base_prompts, source_prompts, labels, k=1)
    result.heldout_iia
    check = illusion_check(model, "blocks.6.resid_post", result.basis, base_prompts, source_prompts, labels)
    check.flagged

Positions follow :mod:`lmscope.core.interventions`: absolute indices into the sequence, negative
from its end. Base and source prompts are tokenised with left padding to one common length, so
position -1 (the default) is every prompt's final token, and a non-negative position counts the
padding in front of a shorter prompt.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lmscope.core.errors import LmscopeError
from lmscope.core.interventions import subspace_patch
from lmscope.core.model import Inputs, Model
from lmscope.core.modules import is_conv1d, is_linear
from lmscope.core.sites import Site
from lmscope.core.weights import parameter
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table
from lmscope.steering.store import load, save

Positions = int | Sequence[int] | None

# -- base/source pairs ------------------------------------------------------------------------


@dataclass
class _Pairs:
    """Tokenised base and source inputs ``{"input_ids", "attention_mask"}`` [n, pos] (left-padded
    to one length) and the counterfactual labels [n] (token ids)."""

    base: dict[str, Tensor]
    source: dict[str, Tensor]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: Tensor) -> _Pairs:
        """The pairs at ``index``."""
        pick = lambda batch: {key: value[index] for key, value in batch.items()}
        return _Pairs(pick(self.base), pick(self.source), self.labels[index])


def _make_pairs(model: Model, base: Inputs, source: Inputs, labels: Sequence[int] | Tensor) -> _Pairs:
    """Tokenise base and source inputs (strings, token ids [n, pos] or a tokenizer's batch) with left
    padding to one common length, so equal negative positions name the same final tokens."""
    (b_ids, b_mask), (s_ids, s_mask) = model.tokenize(base, "left"), model.tokenize(source, "left")
    labels = torch.as_tensor(labels, dtype=torch.long, device=model.device).reshape(-1)
    if not len(b_ids) == len(s_ids) == len(labels):
        raise LmscopeError(f"{len(b_ids)} base inputs, {len(s_ids)} source inputs and {len(labels)} labels")
    n = max(b_ids.shape[1], s_ids.shape[1])
    pad = model.pad_id or 0
    base_batch = {"input_ids": _left_pad(b_ids, n, pad), "attention_mask": _left_pad(b_mask, n, 0)}
    source_batch = {"input_ids": _left_pad(s_ids, n, pad), "attention_mask": _left_pad(s_mask, n, 0)}
    return _Pairs(base_batch, source_batch, labels)


def _left_pad(x: Tensor, n: int, value: int) -> Tensor:
    """[batch, pos] left-padded with ``value`` to ``n`` positions."""
    return torch.nn.functional.pad(x, (n - x.shape[1], 0), value=value)


def _chunks(n: int, size: int) -> Iterator[Tensor]:
    for start in range(0, n, size):
        yield torch.arange(start, min(start + size, n))


def _source_activations(model: Model, site: Site, pairs: _Pairs, batch_size: int) -> Tensor:
    """The site's whole tensor on every source input [n, pos, ...], without gradients."""
    parts = []
    for index in _chunks(len(pairs), batch_size):
        parts.append(model.run(pairs.take(index).source, capture=[site.name], logits=False).cache[site.name])
    return torch.cat(parts)


def _patched_logits(
    model: Model, site: Site, pairs: _Pairs, source: Tensor, basis: Tensor | None, positions: Positions, **run
) -> Tensor:
    """Final-position logits [n, vocab] of the base inputs with span(``basis``) patched from
    ``source`` (the whole pairs batch at once; no patch when ``basis`` is None)."""
    patches = [] if basis is None else [subspace_patch(site, source, basis, positions)]
    return model.run(pairs.base, interventions=patches, logits="last", **run).logits[:, -1]


def _final_logits(
    model: Model, site: Site, pairs: _Pairs, source: Tensor, basis: Tensor | None, positions: Positions, batch_size: int
) -> Tensor:
    """:func:`_patched_logits` in batches of ``batch_size`` pairs, without gradients."""
    parts = []
    for index in _chunks(len(pairs), batch_size):
        parts.append(_patched_logits(model, site, pairs.take(index), source[index], basis, positions))
    return torch.cat(parts)


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    """Interchange-intervention accuracy: the fraction of rows whose argmax is the label."""
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else math.nan


def _positions(positions: Positions) -> list[int] | None:
    return None if positions is None else [positions] if isinstance(positions, int) else list(positions)


def _check_positions(positions: Positions, pairs: _Pairs) -> None:
    """A one-line error for a position outside the padded inputs (which no patch would reach)."""
    n = pairs.base["input_ids"].shape[1]
    outside = [p for p in _positions(positions) or [] if not -n <= p < n]
    if outside:
        raise LmscopeError(f"position {outside[0]} is outside the inputs ({n} tokens after padding: {-n} to {n - 1})")


def _features(model: Model, site: Site) -> int:
    """The number of features of a site (the product of its axes after the position axis)."""
    shapes = dict(model.site_shapes())
    if site.name not in shapes:
        raise LmscopeError(f"site '{site}' has no fixed feature size")
    shape = shapes[site.name][2:]
    if site.head is not None and site.head_axis is not None:
        shape = shape[1:]
    return math.prod(shape)


# -- DAS ----------------------------------------------------------------------------------------


class _Basis(nn.Module):
    """A [features, k] matrix kept with orthonormal columns by ``parametrizations.orthogonal``."""

    def __init__(self, features: int, k: int, generator: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, k, generator=generator))
        nn.utils.parametrizations.orthogonal(self, "weight")


@dataclass
class DASResult(Result):
    """What :func:`das` found: the basis [features, k] (orthonormal columns) of the learned subspace
    at ``site`` (``positions``), its interchange-intervention accuracy on the training and on the
    held-out pairs (their numbers), and the training loss per step."""

    site: str
    positions: list[int] | None
    k: int
    basis: Tensor
    train_iia: float
    heldout_iia: float
    n_train: int
    n_heldout: int
    losses: list[float] = field(default_factory=list)

    def text(self) -> str:
        return (
            f"DAS at {self.site} (k={self.k}): interchange-intervention accuracy {self.train_iia:.3f} on "
            f"{self.n_train} training pairs, {self.heldout_iia:.3f} on {self.n_heldout} held-out pairs"
        )

    def tables(self) -> list[Table]:
        row = {
            "site": self.site,
            "positions": "all" if self.positions is None else " ".join(map(str, self.positions)),
            "k": self.k,
            "train IIA": round(self.train_iia, 4),
            "held-out IIA": round(self.heldout_iia, 4),
            "final loss": round(self.losses[-1], 4) if self.losses else math.nan,
        }
        return [Table("Distributed alignment search (Geiger et al. 2023)", [row])]

    def to_json(self) -> dict:
        """Every field but the basis (a tensor: :meth:`save` writes it), and the basis's shape."""
        fields = {k: v for k, v in super().to_json().items() if k != "basis"}
        return {**fields, "basis_shape": list(self.basis.shape)}

    def figures(self) -> list[Figure]:
        """The training loss per step, and the interchange-intervention accuracy on the training
        and held-out pairs."""
        figures = []
        if self.losses:
            steps = list(range(1, len(self.losses) + 1))
            figures.append(Figure("das_training", "lines", f"DAS at {self.site}: training loss", "step",
                                  "cross-entropy", x=steps, series={"loss": self.losses}))  # fmt: skip
        figures.append(Figure("das_iia", "bars", f"DAS at {self.site} (k={self.k}): interchange-intervention accuracy",
                              "pairs", "IIA", x=["train", "held-out"],
                              series={"IIA": [self.train_iia, self.heldout_iia]}))  # fmt: skip
        return figures

    def save(self, path: str | Path, **metadata) -> Path:
        """The basis and its site, positions and accuracies as an lmscope steering file."""
        info = {"k": self.k, "positions": self.positions, "train_iia": self.train_iia, "heldout_iia": self.heldout_iia}
        return save(path, {"basis": self.basis}, method="das", site=self.site, **info, **metadata)


def load_subspace(path: str | Path) -> tuple[Tensor, dict[str, str]]:
    """``(basis [features, k], metadata)`` from :meth:`DASResult.save`'s file."""
    tensors, meta = load(path)
    if meta.get("method") != "das" or "basis" not in tensors:
        raise LmscopeError(f"{path} is not a saved subspace")
    return tensors["basis"], meta


def das(
    model: Model,
    site: str | Site,
    base: Inputs,
    source: Inputs,
    labels: Sequence[int] | Tensor,
    *,
    positions: Positions = -1,
    k: int = 1,
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 32,
    holdout: float = 0.2,
    seed: int = 0,
) -> DASResult:
    """Distributed alignment search: learn span(B), B [features, k] orthonormal, at ``site``
    (``positions`` of the left-padded inputs; None: every position) so that patching it from each
    source input into its base input makes the model predict ``labels`` (token ids, the
    counterfactual labels).

    A ``holdout`` fraction of the pairs (chosen with ``seed``) is kept out of training; the rest
    train B for ``steps`` Adam steps (learning rate ``lr``) on random batches of ``batch_size``
    pairs, minimising the cross-entropy of the intervened final-position logits against the labels.
    """
    site = model.site(site)
    features = _features(model, site)
    if not 1 <= k <= features:
        raise LmscopeError(f"k (the subspace dimension) must be between 1 and {site}'s {features} features, not {k}")
    if steps < 0 or batch_size < 1 or not lr > 0 or not 0 <= holdout < 1:
        got = f"steps {steps}, batch_size {batch_size}, lr {lr}, holdout {holdout}"
        raise LmscopeError(f"DAS needs steps >= 0, batch_size >= 1, lr > 0 and 0 <= holdout < 1 (got {got})")
    pairs = _make_pairs(model, base, source, labels)
    _check_positions(positions, pairs)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pairs), generator=generator)
    n_held = round(len(pairs) * holdout)
    if len(pairs) - n_held < 1:
        raise LmscopeError(f"{len(pairs)} pairs leave none to train on with holdout={holdout}")
    train, held = order[n_held:], order[:n_held]
    sources = _source_activations(model, site, pairs, batch_size)
    basis = _Basis(features, k, generator).to(model.device)
    optimizer = torch.optim.Adam(basis.parameters(), lr=lr)
    losses = []
    with model.frozen():
        for _ in range(steps):
            index = train[torch.randperm(len(train), generator=generator)[:batch_size]]
            logits = _patched_logits(model, site, pairs.take(index), sources[index], basis.weight, positions, grad=True)
            loss = nn.functional.cross_entropy(logits.float(), pairs.labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    learned = basis.weight.detach().clone()

    def iia(index: Tensor) -> float:
        if not len(index):
            return math.nan
        logits = _final_logits(model, site, pairs.take(index), sources[index], learned, positions, batch_size)
        return _accuracy(logits, pairs.labels[index])

    return DASResult(
        str(site), _positions(positions), k, learned.cpu(), iia(train), iia(held), len(train), len(held), losses
    )


# -- what reads a site ----------------------------------------------------------------------------


def _linear_weight(module: nn.Module) -> Tensor:
    """A linear layer's weight as [out, in] (GPT-2's ``Conv1D`` stores [in, out])."""
    weight = parameter(module).detach()
    return weight.T if is_conv1d(module) else weight


def _norm_linear(norm: nn.Module | None, d: int, device: torch.device) -> Tensor:
    """The linear part N [d, d] of a norm (identity when None), up to a scalar factor:
    ``N e_i = (norm(sqrt(d) e_i) - norm(-sqrt(d) e_i)) / (2 sqrt(d))``. For an RMS norm,
    ``x -> gain * x / rms(x)`` with rms(sqrt(d) e_i) = 1, this is diag(gain) (in the model's own
    gain convention, e.g. Gemma's 1 + weight); for LayerNorm it is diag(gain) (I - 1 1^T / d) over
    the standard deviation sqrt(1 - 1/d) of every probe; the bias cancels. The norm's 1/rms(x)
    factor is not linear and is left out: readers are the weights the normalised direction meets."""
    if norm is None:
        return torch.eye(d, device=device)
    weight = parameter(norm)
    probe = math.sqrt(d) * torch.eye(d, device=device if weight is None else weight.device)
    probe = probe if weight is None else probe.to(weight.dtype)
    with torch.no_grad():
        return ((norm(probe) - norm(-probe)).float() / (2 * math.sqrt(d))).T


def _layer_readers(model: Model, layer: int, part: str, fold: bool = True) -> dict[str, Tensor]:
    """The weights [rows, d_model] with which ``part`` ("attn" or "mlp") of ``layer`` reads the
    residual stream: every linear layer of the attention (or the hybrid's token mixer) but the
    output projection, or of the MLP but the down projection, whose input is d_model wide, times
    the linear part of the norm in front (:func:`_norm_linear`) when ``fold``."""
    fam, d = model.family, model.d_model
    if part == "mlp" and fam.experts and model.has_module(layer, fam.experts):
        raise LmscopeError(
            f"layer {layer} is a mixture-of-experts layer: its stacked expert weights are not read here; "
            "pass reader_weights= to illusion_check"
        )
    if part == "attn":
        path = fam.attn if model.has_module(layer, fam.attn) else fam.mixer
        skip, norm_path = fam.o_proj, fam.attn_norm
    else:
        path, skip, norm_path = fam.mlp or fam.mlp_up, fam.mlp_down, fam.mlp_norm
    if path is None:
        return {}
    module = model.layer_module(layer, path)
    skipped = model.layer_module(layer, skip) if model.has_module(layer, skip) else None
    norm = model.layer_module(layer, norm_path) if fold and model.has_module(layer, norm_path) else None
    folded = _norm_linear(norm, d, model.device)
    out = {}
    for name, linear in module.named_modules():
        if not is_linear(linear) or linear is skipped:
            continue
        weight = _linear_weight(linear).float()
        if weight.shape[1] == d:
            where = f"blocks.{layer}.{path}.{name}".rstrip(".")
            out[where] = weight @ folded.to(weight.device)
    return out


def _residual_readers(model: Model, layer: int, stage: str) -> dict[str, Tensor]:
    """Everything that reads the residual stream at ``stage`` ("pre", "mid", "post") of ``layer``:
    the layer's own attention (at "pre") and MLP (at "pre"; at "mid" unless attention and MLP read
    the same stream), every later layer's, and the unembedding after the final norm. A clear error
    where layers read the stream in a third branch too (``Family.extra_contrib``), whose readers
    are not named here."""
    if model.family.extra_contrib:
        raise LmscopeError(
            f"the residual stream of {model.hf.config.model_type} is also read by each layer's "
            f"{model.family.extra_contrib} branch, whose weights are not collected here; pass reader_weights= to illusion_check"
        )
    out: dict[str, Tensor] = {}
    if stage == "pre":
        out |= _layer_readers(model, layer, "attn")
    if stage == "pre" or (stage == "mid" and not model.parallel_residual):
        out |= _layer_readers(model, layer, "mlp")
    for later in range(layer + 1, model.n_layers):
        out |= _layer_readers(model, later, "attn") | _layer_readers(model, later, "mlp")
    return out | _unembed_readers(model, fold=True)


def _unembed_readers(model: Model, fold: bool) -> dict[str, Tensor]:
    unembed = _linear_weight(model.module(model.family.unembed)).float()
    norm = model.module(model.family.final_norm) if fold else None
    return {model.family.unembed: unembed @ _norm_linear(norm, model.d_model, model.device).to(unembed.device)}


def _contribution_readers(model: Model, layer: int, part: str) -> dict[str, Tensor]:
    """What reads ``attn.out`` / ``mlp.out``: the residual stream's readers after the layer adds it,
    through the norm on the output where the model has one (``Family.attn_contrib`` /
    ``mlp_contrib`` naming a module other than the attention / MLP, as in Gemma 2)."""
    fam = model.family
    stage = "post" if part == "mlp" or model.parallel_residual else "mid"
    contrib, own = (fam.attn_contrib, fam.attn) if part == "attn" else (fam.mlp_contrib, fam.mlp)
    readers = _residual_readers(model, layer, stage)
    if contrib == own or "norm" not in contrib.rsplit(".", 1)[-1] or not model.has_module(layer, contrib):
        return readers
    fold = _norm_linear(model.layer_module(layer, contrib), model.d_model, model.device)
    return {name: weight @ fold.to(weight.device) for name, weight in readers.items()}


def readers(model: Model, site: str | Site) -> dict[str, Tensor]:
    """The weights that read ``site`` downstream, by module: ``{name: [rows, features]}``, the matrix
    ``R`` of Makelov et al.'s check (a direction v of the site with ``R v = 0`` is causally
    disconnected from the output; their worked case is an MLP's hidden layer, read only by its
    output projection).

    - ``mlp.post``: the down projection ``W_down`` [d_model, d_mlp];
    - ``attn.z``: the output projection ``W_O`` [d_model, n_heads * d_head] (one head: its columns);
    - ``mlp.in``: the MLP's input linear layers (up and gate), [d_mlp, d_model] each;
    - residual-stream sites (``embed``, ``resid_pre``/``mid``/``post``, ``attn.out``, ``mlp.out``):
      every later linear layer that reads the stream (queries, keys, values, MLP up and gate) and the
      unembedding, each times the linear part of the norm in front of it (:func:`_norm_linear`);
      with many layers these span the whole stream, so its null space is usually trivial;
    - ``final_norm``: the unembedding.

    Other sites (and mixture-of-experts layers on the residual path) need explicit readers
    (``illusion_check(..., reader_weights=...)``).
    """
    site = model.site(site)
    fam, layer = model.family, site.layer
    if site.kind == "mlp.post":
        return {f"blocks.{layer}.{fam.mlp_down}": _linear_weight(model.layer_module(layer, fam.mlp_down)).float()}
    if site.kind == "attn.z":
        weight = _linear_weight(model.layer_module(layer, fam.o_proj)).float()
        if site.head is not None:
            d_head = model.d_head_of(layer)
            weight = weight[:, site.head * d_head : (site.head + 1) * d_head]
        return {f"blocks.{layer}.{fam.o_proj}": weight}
    if site.kind == "mlp.in":
        return _layer_readers(model, layer, "mlp", fold=False)  # mlp.in is the norm's output
    if site.kind in ("resid_pre", "resid_mid", "resid_post"):
        return _residual_readers(model, layer, site.kind.removeprefix("resid_"))
    if site.kind == "embed":
        return _residual_readers(model, 0, "pre")
    if site.kind in ("attn.out", "mlp.out"):
        return _contribution_readers(model, layer, site.kind.split(".")[0])
    if site.kind == "final_norm":
        return _unembed_readers(model, fold=False)
    raise LmscopeError(f"no reader weights are defined for '{site}': pass reader_weights= to illusion_check")


def _unit_gram(w: Tensor) -> Tensor:
    return w.T @ w / max(float(w.norm()) ** 2, 1e-300)


def row_space(weights: Mapping[str, Tensor] | Sequence[Tensor] | Tensor, rtol: float = 1e-5) -> Tensor:
    """An orthonormal basis [features, r] of the row space of the stacked reader matrices: the
    eigenvectors of ``sum_i R_i^T R_i / |R_i|_F^2`` (float64; each reader scaled to unit norm so a
    small one still counts) whose singular value is above ``rtol`` times the largest."""
    if isinstance(weights, Tensor):
        blocks = [weights]
    else:
        blocks = list(weights.values()) if isinstance(weights, Mapping) else list(weights)
    if not blocks:
        raise LmscopeError("no reader weights")
    gram = sum(_unit_gram(w.detach().double().cpu()) for w in blocks)
    values, vectors = torch.linalg.eigh(gram)
    keep = values.clamp(min=0).sqrt() > rtol * values.max().clamp(min=0).sqrt()
    return vectors[:, keep].float()


# -- the illusion check -----------------------------------------------------------------------------


def orthonormal(matrix: Tensor, atol: float = 1e-4) -> Tensor:
    """An orthonormal basis [features, r] of the column span of ``matrix`` [features, k] (or of a
    single vector), dropping directions whose singular value is below ``atol``."""
    matrix = matrix.unsqueeze(-1) if matrix.ndim == 1 else matrix
    u, s, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u[:, s > atol].float()


def split_by_readers(basis: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal bases of the two parts of span(``basis``) [features, k]: ``v_row = P v`` in the
    readers' row space (``rows`` [features, r] orthonormal, ``P = rows rows^T``) and ``v_null = v - P v``."""
    projected = rows @ (rows.T @ basis)
    return orthonormal(projected), orthonormal(basis - projected)


@dataclass
class PartEffect:
    """The effect of patching one part of a subspace: its dimension, the fractional logit-difference
    change ``effect`` and the interchange-intervention accuracy ``iia``."""

    part: str
    dim: int
    effect: float
    iia: float


@dataclass
class IllusionResult(Result):
    """The illusion check of one subspace at ``site``: the readers' names and row-space rank, the
    share of the subspace in that row space (``|P B|_F^2 / k``), the effect of patching the whole
    subspace, its row-space part and its null-space part, the unpatched base's IIA, and ``flagged``
    (the whole subspace's effect is at least ``min_effect`` but the row-space part keeps less than
    ``ratio`` of it)."""

    site: str
    positions: list[int] | None
    k: int
    readers: list[str]
    reader_rank: int
    row_share: float
    base_iia: float
    parts: list[PartEffect]
    flagged: bool
    min_effect: float
    ratio: float

    def to_json(self) -> dict:
        return {**super().to_json(), "parts": [asdict(p) for p in self.parts]}

    def part(self, name: str) -> PartEffect:
        """The effect of part ``name`` ("subspace", "row space", "null space")."""
        return next(p for p in self.parts if p.part == name)

    def text(self) -> str:
        whole, row = self.part("subspace"), self.part("row space")
        verdict = (
            "FLAGGED: the effect needs the part no downstream weight reads (a dormant-pathway illusion, Makelov et al. 2024)"
            if self.flagged
            else "not flagged"
        )
        return (
            f"Illusion check at {self.site}: the subspace's effect {whole.effect:.3f}, its row-space part's "
            f"{row.effect:.3f} ({self.row_share:.0%} of the subspace lies in the readers' row space); {verdict}"
        )

    def tables(self) -> list[Table]:
        rows = [
            {"part": p.part, "dim": p.dim, "effect": round(p.effect, 4), "IIA": round(p.iia, 4)} for p in self.parts
        ]
        return [Table(f"Illusion check (Makelov et al. 2024) at {self.site}; unpatched IIA {self.base_iia:.3f}", rows)]


def _logit_difference(logits: Tensor, labels: Tensor, base_labels: Tensor) -> Tensor:
    """``logit[label] - logit[base label]`` per row [n]."""
    rows = torch.arange(len(labels), device=logits.device)
    return logits[rows, labels] - logits[rows, base_labels]


def illusion_check(
    model: Model,
    site: str | Site,
    basis: Tensor,
    base: Inputs,
    source: Inputs,
    labels: Sequence[int] | Tensor,
    *,
    base_labels: Sequence[int] | Tensor | None = None,
    positions: Positions = -1,
    reader_weights: Mapping[str, Tensor] | Tensor | None = None,
    min_effect: float = 0.2,
    ratio: float = 0.5,
    batch_size: int = 32,
) -> IllusionResult:
    """Makelov et al.'s check of a subspace span(``basis``) ([features] or [features, k]) at
    ``site``: patch the whole subspace, its part in the row space of the downstream readers
    (:func:`readers`, or ``reader_weights`` given as ``{name: [rows, features]}`` or one matrix),
    and its part in their null space, each from the source inputs into the base inputs, and measure
    each patch's effect on ``labels`` (the counterfactual labels) against ``base_labels`` (default:
    the unpatched base run's argmax): the fractional logit-difference change and the IIA (see the
    module docstring). ``flagged`` when the whole subspace's effect is at least ``min_effect`` and
    the row-space part's is below ``ratio`` times it."""
    site = model.site(site)
    basis = orthonormal(basis.float().to(model.device))
    weights = readers(model, site) if reader_weights is None else reader_weights
    named = {"readers": weights} if isinstance(weights, Tensor) else dict(weights)
    rows = row_space(named).to(model.device)
    if rows.shape[0] != basis.shape[0]:
        raise LmscopeError(f"readers have {rows.shape[0]} input features, the basis {basis.shape[0]} rows")
    row_part, null_part = split_by_readers(basis, rows)
    pairs = _make_pairs(model, base, source, labels)
    _check_positions(positions, pairs)
    sources = _source_activations(model, site, pairs, batch_size)
    logits = lambda b: _final_logits(model, site, pairs, sources, b, positions, batch_size)
    unpatched = logits(None)
    wrong = unpatched.argmax(-1) if base_labels is None else torch.as_tensor(base_labels, device=model.device)
    counted = pairs.labels != wrong
    if not counted.any():
        raise LmscopeError("every counterfactual label is the base's own answer: nothing to measure")
    before = _logit_difference(unpatched, pairs.labels, wrong)[counted]
    span = float(-before.mean())
    if span <= 0:
        raise LmscopeError("the unpatched base runs already prefer the counterfactual labels: nothing to measure")

    def measure(part: str, directions: Tensor) -> PartEffect:
        if directions.shape[1] == 0:
            return PartEffect(part, 0, 0.0, _accuracy(unpatched, pairs.labels))
        patched = logits(directions)
        change = float((_logit_difference(patched, pairs.labels, wrong)[counted] - before).mean())
        return PartEffect(part, directions.shape[1], change / span, _accuracy(patched, pairs.labels))

    parts = [measure("subspace", basis), measure("row space", row_part), measure("null space", null_part)]
    whole, row = parts[0].effect, parts[1].effect
    projected = rows.T @ basis
    return IllusionResult(
        site=str(site),
        positions=_positions(positions),
        k=basis.shape[1],
        readers=list(named),
        reader_rank=rows.shape[1],
        row_share=float(projected.pow(2).sum() / basis.shape[1]),
        base_iia=_accuracy(unpatched, pairs.labels),
        parts=parts,
        flagged=whole >= min_effect and row < ratio * whole,
        min_effect=min_effect,
        ratio=ratio,
    )

"""Outlier-Safe Pre-Training (OSP; Park et al. 2025, "Outlier-Safe Pre-Training for Robust 4-Bit
Quantization of Large Language Models", arXiv 2506.19697; code: dmis-lab/Outlier-Safe-Pre-Training,
``optimization.py`` and ``example_modeling_flax.py``): its three components on a Hugging Face
causal LM, and the training recipes that combine them.

- **Muon** (``optimization.py``'s ``muon``): for a 2-D weight matrix, the Nesterov momentum of
  the gradient is orthogonalised by five Newton-Schulz steps ``X <- a X + (b A + c A A) X`` with
  ``A = X X^T``, ``(a, b, c) = (3.4445, -4.7750, 2.0315)``, starting from the momentum divided by
  its Frobenius norm, run in bfloat16 on the wide orientation; the result is scaled by
  ``0.2 sqrt(max(rows, cols))`` (an update of AdamW's RMS) and by the learning rate, with
  decoupled weight decay ``w <- w (1 - lr wd)``. This is ``torch.optim.Muon`` with
  ``adjust_lr_fn="match_rms_adamw"``: its momentum buffer is an average (``B <- mu B + (1 - mu) g``)
  where OSP's is a sum (``B <- mu B + g``), which changes the update by the factor ``1 - mu``
  only, removed by the normalisation. The default recipe trains the embedding and unembedding
  matrices and every parameter of fewer than two axes with AdamW; the ablation's "Muon only"
  (``muon-all``) trains every matrix with Muon and the rest with OSP's update for such
  parameters, the normalised Nesterov momentum ``u / |u|`` times ``0.2 sqrt(numel)``
  (:class:`NormalizedMomentum`).
- **Single-scale RMSNorm** (SSNorm; ``rmsnorm_scale="single"``): every RMSNorm, the final one
  included, learns one scalar gain instead of a vector of per-channel gains
  (:class:`SingleScaleRMSNorm`, which runs the norm's own forward with the scalar); on export
  each becomes the standard RMSNorm whose weight vector repeats the scalar.
- **Embedding projection** (EmbProj; ``rotated_embed=True``): a learned square matrix,
  orthogonally initialised, after the token embedding (``rot1``) and another between the final
  norm and the unembedding (``rot2``). Without a bias (the flax example's layers have biases,
  but a bias before the unembedding cannot be merged into a bias-free Llama head), so both merge
  exactly into the embedding (``E P1^T``) and unembedding (``H P2``) matrices on export.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmscope.core.errors import LmscopeError

OPTIMIZERS = ("adam", "muon", "muon-all")
ADAM_BETAS = (0.9, 0.95)
MUON_MOMENTUM = 0.95
MUON_SCALE = 0.2  # OSP's ``optax.scale(0.2)``: Muon's update at AdamW's RMS


@dataclass(frozen=True)
class Recipe:
    """A training recipe: ``optimizer`` (``adam``: AdamW everywhere; ``muon``: Muon for the
    hidden matrices, AdamW for the embedding and unembedding matrices and parameters of fewer
    than two axes; ``muon-all``: Muon for every matrix, :class:`NormalizedMomentum` for the
    rest), and whether SSNorm and EmbProj are on."""

    name: str
    optimizer: str
    ssnorm: bool = False
    embproj: bool = False
    description: str = ""


RECIPES = {
    r.name: r
    for r in (
        Recipe("adam", "adam", description="AdamW everywhere, per-channel RMSNorm (the baseline)"),
        Recipe("muon", "muon", description="Muon for hidden matrices, AdamW for embeddings and vectors"),
        Recipe("muon-all", "muon-all", description="Muon for every matrix, normalised momentum for vectors"),
        Recipe("osp", "muon", True, True, "Muon + single-scale RMSNorm + embedding projection (OSP)"),
        Recipe("osp-ssnorm", "muon", ssnorm=True, description="Muon + single-scale RMSNorm"),
        Recipe("osp-embproj", "muon", embproj=True, description="Muon + embedding projection"),
    )
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a one-line error naming the known ones otherwise."""
    if name not in RECIPES:
        raise LmscopeError(f"unknown recipe {name!r} (choose from {', '.join(RECIPES)})")
    return RECIPES[name]


# -- single-scale RMSNorm -------------------------------------------------------------------


class SingleScaleRMSNorm(nn.Module):
    """An RMSNorm with one learned scalar gain ``weight`` (a 0-dim parameter) in place of the
    per-channel vector: the wrapped norm class's own forward runs with the scalar, so the output
    equals that norm's with the weight vector repeating the scalar. ``plain()`` is that norm."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.base, self.d = type(norm), norm.weight.shape[-1]
        self.variance_epsilon = norm.variance_epsilon
        self.weight = nn.Parameter(norm.weight.detach().mean())  # 1 for a fresh RMSNorm

    def forward(self, x: Tensor) -> Tensor:
        return self.base.forward(self, x)

    def plain(self) -> nn.Module:
        """The standard norm (``base(d, eps)``) whose weight vector repeats the scalar."""
        norm = self.base(self.d, eps=self.variance_epsilon).to(self.weight)
        with torch.no_grad():
            norm.weight.copy_(self.weight.expand(self.d))
        return norm

    def extra_repr(self) -> str:
        return f"{self.base.__name__}, single scale over {self.d} channels, eps={self.variance_epsilon}"


def rms_norms(model: nn.Module) -> dict[str, nn.Module]:
    """The model's Llama-style RMSNorms by name (class name ending in ``RMSNorm``, a weight
    vector and ``variance_epsilon``)."""
    return {
        name: module
        for name, module in model.named_modules()
        if type(module).__name__.endswith("RMSNorm")
        and getattr(module, "weight", None) is not None
        and hasattr(module, "variance_epsilon")
    }


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def single_scale_norms_(model: nn.Module) -> int:
    """Make every RMSNorm of ``model`` single-scale (in place); returns how many."""
    norms = rms_norms(model)
    if not norms:
        raise LmscopeError("single-scale RMSNorm needs a model with Llama-style RMSNorms")
    for name, norm in norms.items():
        _replace(model, name, SingleScaleRMSNorm(norm))
    return len(norms)


def _fold_norms_(model: nn.Module) -> None:
    """Replace each single-scale norm by the standard norm it computes."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SingleScaleRMSNorm):
            _replace(model, name, module.plain())


# -- embedding projection -------------------------------------------------------------------


def _orthogonal(d: int, like: Tensor) -> nn.Linear:
    proj = nn.Linear(d, d, bias=False, device=like.device, dtype=like.dtype)
    nn.init.orthogonal_(proj.weight)
    return proj


class ProjectedEmbedding(nn.Module):
    """The token embedding followed by a learned square projection (OSP's ``rot1``):
    ids [batch, pos] -> ``embedding(ids) @ proj.weight^T`` [batch, pos, d]."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding
        self.proj = _orthogonal(embedding.embedding_dim, embedding.weight)

    def forward(self, ids: Tensor) -> Tensor:
        return self.proj(self.embedding(ids))

    def merged(self) -> nn.Embedding:
        """One embedding whose rows are the projected rows: ``E P^T`` [vocab, d]."""
        e = self.embedding
        out = nn.Embedding(
            e.num_embeddings, e.embedding_dim, e.padding_idx, device=e.weight.device, dtype=e.weight.dtype
        )
        with torch.no_grad():
            out.weight.copy_(e.weight @ self.proj.weight.T)
        return out


class ProjectedHead(nn.Module):
    """A learned square projection before the unembedding (OSP's ``rot2``, after the final
    norm): h [..., d] -> ``head(h @ proj.weight^T)`` [..., vocab]."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.proj = _orthogonal(head.in_features, head.weight)
        self.head = head

    def forward(self, h: Tensor) -> Tensor:
        return self.head(self.proj(h))

    def merged(self) -> nn.Linear:
        """One unembedding ``H P`` [vocab, d]: ``(h P^T) H^T = h (H P)^T``."""
        h = self.head
        out = nn.Linear(h.in_features, h.out_features, bias=False, device=h.weight.device, dtype=h.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(h.weight @ self.proj.weight)
        return out


def project_embeddings_(model: nn.Module) -> None:
    """Insert EmbProj's two projections into a model with untied embeddings (in place)."""
    head = model.get_output_embeddings()
    if head is None or head.weight is model.get_input_embeddings().weight:
        raise LmscopeError("the embedding projection needs untied embedding and unembedding matrices")
    if getattr(head, "bias", None) is not None:
        raise LmscopeError("the embedding projection needs an unembedding without bias")
    model.set_input_embeddings(ProjectedEmbedding(model.get_input_embeddings()))
    model.set_output_embeddings(ProjectedHead(head))


def _fold_projections_(model: nn.Module) -> None:
    if isinstance(model.get_input_embeddings(), ProjectedEmbedding):
        model.set_input_embeddings(model.get_input_embeddings().merged())
    if isinstance(model.get_output_embeddings(), ProjectedHead):
        model.set_output_embeddings(model.get_output_embeddings().merged())


# -- recipes on a model ---------------------------------------------------------------------


def apply_recipe_(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Give ``model`` the recipe's architecture (SSNorm, EmbProj) in place; returns it. The
    projections' orthogonal initialisation draws from torch's global generator."""
    if recipe.ssnorm:
        single_scale_norms_(model)
    if recipe.embproj:
        project_embeddings_(model)
    return model


def fold_(model: nn.Module) -> nn.Module:
    """Turn a model trained with SSNorm and/or EmbProj into the plain architecture computing the
    same function (in place; returns it): single-scale norms become weight vectors repeating
    their scalar, the projections are merged into the embedding and unembedding matrices."""
    _fold_norms_(model)
    _fold_projections_(model)
    return model


def exported(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` (:func:`fold_` on a deep copy), in eval mode; ``model`` is unchanged."""
    return fold_(copy.deepcopy(model)).eval()


# -- optimizers -----------------------------------------------------------------------------


def _embedding_weights(model: nn.Module) -> set[int]:
    """ids of the embedding and unembedding matrices (inside EmbProj's wrappers, if any)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    emb = emb.embedding if isinstance(emb, ProjectedEmbedding) else emb
    head = head.head if isinstance(head, ProjectedHead) else head
    return {id(emb.weight), id(head.weight)}


def assign_parameters(model: nn.Module, optimizer: str) -> dict[str, list[str]]:
    """Which optimizer trains each parameter (by name): ``{"muon": [...], "adamw": [...],
    "normalized": [...]}`` for ``optimizer`` ``adam``, ``muon`` or ``muon-all`` (see :class:`Recipe`)."""
    if optimizer not in OPTIMIZERS:
        raise LmscopeError(f"unknown optimizer {optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    embeddings = _embedding_weights(model)
    groups: dict[str, list[str]] = {"muon": [], "adamw": [], "normalized": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if optimizer == "adam":
            groups["adamw"].append(name)
        elif p.ndim == 2 and (optimizer == "muon-all" or id(p) not in embeddings):
            groups["muon"].append(name)
        else:
            groups["adamw" if optimizer == "muon" else "normalized"].append(name)
    return groups


class NormalizedMomentum(torch.optim.Optimizer):
    """OSP's Muon update for parameters of fewer than two axes (``scale_by_muon``'s ``ndim <= 1``
    branch): ``B <- mu B + g``, ``u = g + mu B`` (Nesterov), ``w <- w (1 - lr wd) - lr 0.2
    sqrt(max(numel, 1)) u / (|u| + eps)``; a scalar moves by ``0.2 lr`` times the sign of ``u``."""

    def __init__(self, params: Iterable, lr: float, momentum: float = MUON_MOMENTUM, weight_decay=0.0, eps=1e-8):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(mu).add_(p.grad)
                u = p.grad + mu * buf
                scale = MUON_SCALE * math.sqrt(max(p.numel(), 1)) / (u.norm() + group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(u * scale, alpha=-group["lr"])


class Optimizers:
    """The optimizers of one recipe, stepped together. Each param group keeps its peak learning
    rate as ``base_lr``; :meth:`scale_lr` sets ``lr = base_lr * factor`` (the schedule)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers
        for opt in optimizers.values():
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers.values())

    def scale_lr(self, factor: float) -> None:
        for opt in self:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor

    def step(self) -> None:
        for opt in self:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise LmscopeError(f"checkpoint has optimizers {sorted(state)}, this recipe {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def build_optimizers(
    model: nn.Module,
    optimizer: str,
    *,
    lr: float,
    muon_lr: float | None = None,
    weight_decay: float = 0.1,
) -> Optimizers:
    """The optimizers of :func:`assign_parameters`: AdamW (betas 0.9, 0.95; weight decay on
    matrices only), ``torch.optim.Muon`` (``match_rms_adamw``, Nesterov momentum 0.95, weight
    decay) and :class:`NormalizedMomentum` (no weight decay), each over its parameters.
    ``muon_lr`` defaults to ``lr``: with the RMS matching, Muon reuses AdamW's rate."""
    params = dict(model.named_parameters())
    groups = assign_parameters(model, optimizer)
    optimizers: dict[str, torch.optim.Optimizer] = {}
    if groups["adamw"]:
        decay = [params[n] for n in groups["adamw"] if params[n].ndim >= 2]
        rest = [params[n] for n in groups["adamw"] if params[n].ndim < 2]
        param_groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, weight_decay), (rest, 0.0)) if ps]
        optimizers["adamw"] = torch.optim.AdamW(param_groups, lr=lr, betas=ADAM_BETAS, eps=1e-8)
    if groups["muon"]:
        optimizers["muon"] = torch.optim.Muon(
            [params[n] for n in groups["muon"]],
            lr=lr if muon_lr is None else muon_lr,
            weight_decay=weight_decay,
            momentum=MUON_MOMENTUM,
            nesterov=True,
            adjust_lr_fn="match_rms_adamw",
        )
    if groups["normalized"]:
        optimizers["normalized"] = NormalizedMomentum(
            [params[n] for n in groups["normalized"]], lr=lr if muon_lr is None else muon_lr
        )
    return Optimizers(optimizers)

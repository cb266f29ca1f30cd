"""Training sparse autoencoders and transcoders on streamed activations, with SAELens's or
sparsify's recipe.

:func:`train` trains one dictionary per input name of a :class:`TrainSettings` (``site``; a
transcoder reads ``site`` and writes ``out_site``) on the batches of a source
(:mod:`lmscope.features.harvest`): every dictionary sees the same tokens at each step, so several
sites train from one pass over the corpus. The two recipes, as their libraries implement them
(SAELens 6.x ``SAETrainer`` and ``saes/*``; sparsify 1.3 ``Trainer`` and ``SparseCoder``):

**saelens** (``TrainSettings.recipe``)
  - initialisation: decoder rows drawn Kaiming-uniform and rescaled to norm ``decoder_init_norm``
    (0.1, Anthropic's heuristic; None keeps Kaiming's norms), the encoder their transpose (a
    transcoder's encoder drawn on its own), biases zero; JumpReLU thresholds
    ``jumprelu_init_threshold``;
  - input normalisation (``normalize``): activations times ``c = sqrt(d) / E||x||`` (the mean
    norm over the first block of the stream; a transcoder's output by its own ``c``), folded
    into the weights when training ends (``W_enc * c_in``, ``W_dec / c_out``, ``b_dec / c_out``);
  - loss: ``||y - y_hat||^2`` summed over the vector, averaged over tokens, plus by architecture
    ``standard``: ``l1_coefficient * sum_i f_i ||W_dec[i]||`` (the coefficient warmed up
    linearly over ``l1_warmup`` steps); ``topk`` / ``batchtopk``: ``aux_coefficient`` (1) times the
    AuxK loss below; ``jumprelu``: ``l0_coefficient * L0`` with the L0 through the step
    function's straight-through estimator (bandwidth ``jumprelu_bandwidth``; thresholds kept
    non-negative), warmed up over ``l0_warmup`` steps; ``gated``: the L1 of
    ``relu(pi_gate)`` weighted by the decoder norms plus the reconstruction from the gate path
    alone;
  - Adam (betas 0.9, 0.999), learning rate ``lr`` (3e-4) with a linear warm-up over
    ``lr_warmup`` steps and a linear decay to 0 over the last ``lr_decay`` steps; gradients
    clipped to global norm ``clip`` (1);
  - top-k pre-activations times the decoder row norms (``rescale``, SAELens's training default),
    the norms folded into the encoder when training ends.

**sparsify**
  - initialisation: the encoder drawn as ``torch.nn.Linear`` draws its weight (uniform in
    ``+-1/sqrt(d_in)``), the decoder its transpose scaled to unit rows (a transcoder's decoder
    zero); ``b_dec`` is the mean of the first batch's targets (sparsify 1.3 takes the mean, not
    the geometric median of earlier versions); a transcoder's ``b_enc`` centres the first
    batch's pre-activations (``-mean(x) @ W_enc``);
  - loss: the fraction of variance unexplained ``sum ||y - y_hat||^2 / sum ||y - mean y||^2``
    over the batch, plus ``aux_coefficient`` (1/32, Gao et al.'s value; sparsify 1.3's
    ``auxk_alpha`` defaults to 0, AuxK off) times the AuxK loss over the same variance;
  - autoencoders keep unit-norm decoder rows: the gradient's component parallel to each row is
    removed before the step and the rows renormalised before each forward;
  - Adam, learning rate ``2e-4 / sqrt(d_sae / 2^14)`` unless ``lr``, linear warm-up over
    ``lr_warmup`` steps (sparsify's 1000, at most a tenth of the run) then linear decay to 0;
    no clipping. Top-k and group-max only.

**AuxK** (Gao et al. 2024, appendix B.1, as both libraries compute it): with ``n`` dead latents
(not fired in the last ``dead_tokens`` tokens), the ``k_aux = min(d_out / 2, n)`` largest
pre-activations among them reconstruct the residual ``y - y_hat`` (detached) through the decoder
without bias, the loss scaled by ``min(n / (d_out / 2), 1)``. Its gradient reaches the encoder,
as in SAELens (sparsify's fused encoder drops the gradient of the pre-activations it returns).

**Batch top-k** (Bussmann et al. 2024, SAELens's ``BatchTopKTrainingSAE``): trained with the top
``k * tokens`` pre-activations of the whole batch; a running threshold follows the smallest
active value, ``t <- (1 - topk_threshold_lr) t + topk_threshold_lr * min``, from 0, and is the
saved JumpReLU threshold of every feature.

Top-k dictionaries train through a fused encoder: the dense pre-activations forward, then the
gradient of only the ``k`` active latents per token backward (sparse products instead of dense
ones), and a sparse decoder (``torch.nn.functional.embedding_bag`` over the ``k`` decoder rows).

Checkpoints (``checkpoint.pt`` in ``out``, every ``checkpoint_every`` steps and at the end, written
atomically) hold the dictionaries, optimizer states, dead-latent counters, normalisation
factors, running thresholds, the RNG state, the step and the data position, so that a resumed run continues with the
batch the interrupted one would have taken next and ends with the same weights bit for bit (same
machine, same number of threads).
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmscope.core import distributed
from lmscope.core.errors import LmscopeError
from lmscope.core.progress import note, status_bar
from lmscope.features.activations import batch_topk, jumprelu, step
from lmscope.features.dictionary import ARCHS, Dictionary
from lmscope.features.harvest import Position, Remembered, Source, batches
from lmscope.reports.command import option
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table

RECIPES = ("saelens", "sparsify")
CHECKPOINT = "checkpoint.pt"
_SPARSE_ARCHS = ("topk", "groupmax")  # trained through the fused encoder and sparse decoder


@dataclass(frozen=True)
class TrainSettings:
    """What a training run depends on (module docstring); None means the recipe's default."""

    site: tuple[str, ...] = option(
        ("blocks.12.resid_post",), "site a dictionary reads (repeatable: one pass, one dictionary each)"
    )
    out_site: tuple[str, ...] = option((), "transcoders: the site each --site's dictionary writes (one per --site)")
    arch: str = option("topk", "standard, topk, batchtopk, jumprelu, gated or groupmax (sparsify)")
    k: float = option(32, "top-k, group-max, batch top-k: active features per token")
    width: str = option("8x", "features: a number, or a multiple of the input width (8x)")
    tokens: int | None = option(None, "training tokens (default: the training corpus once)")
    recipe: str = option("saelens", "saelens or sparsify (see lmscope.features.training)")
    batch_size: int = option(4096, "tokens per step")
    lr: float | None = option(None, "Adam's learning rate (saelens 3e-4, sparsify 2e-4 / sqrt(width / 16384))")
    lr_warmup: int | None = option(None, "learning-rate warm-up steps (saelens 0, sparsify min(1000, steps / 10))")
    lr_decay: int = option(0, "saelens: steps of linear decay to 0 at the end")
    l1_coefficient: float = option(5.0, "standard and gated: L1 coefficient")
    l1_warmup: int | None = option(None, "standard and gated: L1 warm-up steps (default 5% of the steps)")
    l0_coefficient: float = option(1.0, "jumprelu: L0 coefficient")
    l0_warmup: int = option(0, "jumprelu: L0 warm-up steps")
    jumprelu_bandwidth: float = option(0.05, "jumprelu: bandwidth of the straight-through estimator")
    jumprelu_init_threshold: float = option(0.01, "jumprelu: initial threshold")
    topk_threshold_lr: float = option(0.01, "batchtopk: rate of the running threshold")
    aux_coefficient: float | None = option(None, "topk, batchtopk: AuxK coefficient (saelens 1, sparsify 1/32)")
    dead_tokens: int | None = option(
        None, "a latent not fired in this many tokens is dead (default: a quarter of the run, at most the recipe's)"
    )
    decoder_init_norm: float | None = option(0.1, "saelens: initial decoder row norm (unit: 1)")
    normalize: bool = option(True, "saelens: scale inputs to expected norm sqrt(d) (folded back when saved)")
    rescale: bool = option(True, "topk, batchtopk (saelens): pre-activations times the decoder row norms")
    clip: float | None = option(None, "gradient-norm clipping (saelens 1, sparsify none; 0: none)")
    skip: bool = option(False, "transcoders: a linear skip connection")
    seed: int = option(0, "seed of the initialisation and the data order")
    log_every: int = option(10, "log the loss, FVU, L0 and dead fraction every N steps")
    checkpoint_every: int = option(200, "write a checkpoint every N steps")

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise LmscopeError(f"unknown architecture '{self.arch}' (known: {', '.join(ARCHS)})")
        if self.recipe not in RECIPES:
            raise LmscopeError(f"unknown recipe '{self.recipe}' (known: {', '.join(RECIPES)})")
        if self.recipe == "sparsify" and self.arch not in _SPARSE_ARCHS:
            raise LmscopeError(f"the sparsify recipe trains topk and groupmax dictionaries, not {self.arch}")
        if self.recipe == "saelens" and self.arch == "groupmax":
            raise LmscopeError("group-max dictionaries train with --recipe sparsify")
        if not self.site or len(set(self.site)) != len(self.site):
            raise LmscopeError("name each --site once")
        if self.out_site and len(self.out_site) != len(self.site):
            raise LmscopeError(f"give one --out-site per --site ({len(self.site)}), got {len(self.out_site)}")
        if self.skip and not self.out_site:
            raise LmscopeError("--skip is a transcoder's: give --out-site")
        if self.arch in ("topk", "groupmax") and self.k != int(self.k):
            raise LmscopeError(f"{self.arch}: k must be a whole number, got {self.k}")
        if self.k <= 0:
            raise LmscopeError(f"k must be positive, got {self.k}")
        for name in ("batch_size", "log_every", "checkpoint_every", "tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LmscopeError(f"{name} must be positive, got {value}")
        for name in ("lr", "jumprelu_bandwidth"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise LmscopeError(f"{name} must be positive, got {value}")
        for name in ("lr_warmup", "lr_decay", "l1_warmup", "l0_warmup", "dead_tokens", "clip", "aux_coefficient"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise LmscopeError(f"{name} must be non-negative, got {value}")
        self.features(1)  # a bad --width fails here

    @property
    def transcoder(self) -> bool:
        return bool(self.out_site)

    def pairs(self) -> list[tuple[str, str]]:
        """(input, target) names of each dictionary."""
        return list(zip(self.site, self.out_site or self.site, strict=True))

    def features(self, d_in: int) -> int:
        """The number of features for inputs of width ``d_in``."""
        text = str(self.width).strip().lower()
        try:
            n = round(float(text[:-1]) * d_in) if text.endswith("x") else int(text)
        except ValueError:
            raise LmscopeError(
                f"--width '{self.width}': expected a number of features or a multiple such as 8x"
            ) from None
        if n < 1:
            raise LmscopeError(f"--width '{self.width}' gives {n} features")
        return n

    def learning_rate(self, d_sae: int) -> float:
        if self.lr is not None:
            return self.lr
        return 3e-4 if self.recipe == "saelens" else 2e-4 / math.sqrt(d_sae / 2**14)

    def warmup_steps(self, steps: int) -> int:
        if self.lr_warmup is not None:
            return self.lr_warmup
        return 0 if self.recipe == "saelens" else min(1000, steps // 10)

    def aux(self) -> float:
        if self.aux_coefficient is not None:
            return self.aux_coefficient
        return 1.0 if self.recipe == "saelens" else 1 / 32

    def clip_norm(self) -> float:
        if self.clip is not None:
            return self.clip
        return 1.0 if self.recipe == "saelens" else 0.0

    def dead_after(self, steps: int) -> int:
        """Tokens without firing after which a latent is dead."""
        if self.dead_tokens is not None:
            return self.dead_tokens
        own = 1000 * self.batch_size if self.recipe == "saelens" else 10_000_000
        return max(self.batch_size, min(own, steps * self.batch_size // 4))

    def to_json(self) -> dict:
        """The training settings alone (a subclass's extra fields left out)."""
        return {f.name: getattr(self, f.name) for f in fields(TrainSettings)}


def lr_factor(settings: TrainSettings, step: int, steps: int) -> float:
    """The learning-rate multiplier at step ``step`` (from 0), as each recipe's scheduler gives
    it: SAELens's ``LinearLR`` warm-up ``(step + 1) / warmup``, constant, linear decay to 0 over
    the last ``lr_decay`` steps; sparsify's ``get_linear_schedule_with_warmup``, ``step / warmup``
    then ``(steps - step) / (steps - warmup)``."""
    warmup = settings.warmup_steps(steps)
    if settings.recipe == "sparsify":
        if step < warmup:
            return step / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))
    if step < warmup:
        return (step + 1) / warmup
    decay = settings.lr_decay
    if decay and step >= steps - decay:
        return 1 - (step - (steps - decay)) / decay
    return 1.0


def warmed(value: float, step: int, warmup: int) -> float:
    """A coefficient warmed up linearly from 0 over ``warmup`` steps (SAELens's ``CoefficientScheduler``)."""
    return value if warmup <= 0 else value * min(1.0, step / warmup)


# -- sparse encoding and decoding -----------------------------------------------------------------


def _by_latent(indices: Tensor, values: Tensor, d_sae: int) -> Tensor:
    """The sparse [d_sae, n] matrix with ``values[t, j]`` at ``(indices[t, j], t)``."""
    n, k = indices.shape
    tokens = torch.arange(n, device=indices.device).repeat_interleave(k)
    return torch.sparse_coo_tensor(
        torch.stack([indices.flatten(), tokens]), values.flatten(), (d_sae, n), check_invariants=False
    )


class _Gathered(torch.autograd.Function):
    """``(x - b_dec) @ W + b`` at ``indices`` [n, k] (``b_dec`` None: no shift), given as the
    shifted inputs ``shifted = x - b_dec`` and the values ``at`` computed beforehand without
    autograd (a top-k over the dense pre-activations), with the gradient of exactly that product:
    sparse products over the selected latents instead of dense ones (``b_dec``'s is ``-W @ g_b``)."""

    @staticmethod
    def forward(
        ctx: Any, shifted: Tensor, W: Tensor, b: Tensor, b_dec: Tensor | None, indices: Tensor, at: Tensor
    ) -> Tensor:
        ctx.save_for_backward(shifted, W, indices)
        return at.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        shifted, W, indices = ctx.saved_tensors
        g_x = g_W = g_b = g_b_dec = None
        if ctx.needs_input_grad[0]:
            g_x = F.embedding_bag(indices, W.T.contiguous(), per_sample_weights=g, mode="sum")
        if ctx.needs_input_grad[1]:
            g_W = torch.sparse.mm(_by_latent(indices, g, W.shape[1]), shifted).T
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            g_b = torch.zeros(W.shape[1], dtype=g.dtype, device=g.device).index_add_(0, indices.flatten(), g.flatten())
            if ctx.needs_input_grad[3]:
                g_b_dec = -(W @ g_b)
        return g_x, g_W, g_b, g_b_dec, None, None


class _SparseDecode(torch.autograd.Function):
    """``sum_j weights[:, j] * W_dec[indices[:, j]]`` [n, d_out] (``embedding_bag``); backward: the
    weights' gradient sampled at the selected latents (``torch.sparse.sampled_addmm``), the
    decoder's a sparse product."""

    @staticmethod
    def forward(ctx: Any, indices: Tensor, weights: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(indices, weights, W_dec)
        return F.embedding_bag(indices, W_dec, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        indices, weights, W_dec = ctx.saved_tensors
        g_weights = g_W = None
        if ctx.needs_input_grad[1]:
            n, k = indices.shape
            order = indices.argsort(dim=1)
            columns = indices.gather(1, order)
            rows = torch.arange(0, n * k + 1, k, device=g.device)
            with warnings.catch_warnings():  # "sparse CSR tensor support is in beta"
                warnings.simplefilter("ignore")
                values = torch.zeros(n * k, dtype=g.dtype, device=g.device)
                mask = torch.sparse_csr_tensor(
                    rows, columns.flatten(), values, (n, W_dec.shape[0]), check_invariants=False
                )
            sampled = torch.sparse.sampled_addmm(mask, g, W_dec.T, beta=0.0).values().view(n, k)
            g_weights = torch.empty_like(sampled).scatter_(1, order, sampled)
        if ctx.needs_input_grad[2]:
            g_W = torch.sparse.mm(_by_latent(indices, weights, W_dec.shape[0]), g)
        return None, g_weights, g_W


def sparse_decode(indices: Tensor, weights: Tensor, W_dec: Tensor) -> Tensor:
    """``sum_j weights[:, j] * W_dec[indices[:, j]]`` [n, d_out]: decoding ``k`` latents per token
    (distinct per token)."""
    return _SparseDecode.apply(indices, weights.to(W_dec.dtype), W_dec)


# -- one dictionary's training state -----------------------------------------------------------


@dataclass
class StepStats:
    """One step's numbers for one dictionary (detached floats)."""

    loss: float
    fvu: float
    l0: float


class Learner:
    """One dictionary with its optimizer, dead-latent counters, normalisation factors and (batch
    top-k) running threshold."""

    def __init__(self, settings: TrainSettings, name: str, target: str, d_in: int, d_out: int, steps: int, device):
        self.settings, self.name, self.target, self.steps = settings, name, target, steps
        s = settings
        transcoder = s.transcoder
        arch = s.arch
        self.dictionary = Dictionary(
            d_in,
            s.features(d_in),
            arch,
            d_out=d_out,
            k=s.k if arch in ("topk", "groupmax", "batchtopk") else None,
            transcoder=transcoder,
            skip=s.skip,
            rescale_by_decoder_norm=s.rescale and arch in ("topk", "batchtopk") and s.recipe == "saelens",
            site=name,
            out_site=target if transcoder else None,
        )
        self._init_weights()
        self.dictionary.to(device)
        self.device = torch.device(device)
        d = self.dictionary
        fused = self.device.type in ("cpu", "cuda")  # one kernel for the whole update
        self.optimizer = torch.optim.Adam(d.parameters(), lr=s.learning_rate(d.d_sae), betas=(0.9, 0.999), fused=fused)
        self.since_fired = torch.zeros(d.d_sae, dtype=torch.long, device=self.device)
        self.scale_in = self.scale_out = 1.0
        self.running_threshold = torch.zeros((), dtype=torch.float64, device=self.device)
        self.dead_after = s.dead_after(steps)

    # -- initialisation ------------------------------------------------------------------------

    @torch.no_grad()
    def _init_weights(self) -> None:
        s, d = self.settings, self.dictionary
        seed = s.seed * 7919 + sum(map(ord, self.name))
        if s.recipe == "sparsify":  # torch.nn.Linear(d_in, d_sae): U(-1/sqrt(d_in), 1/sqrt(d_in)), bias 0
            bound = 1 / math.sqrt(d.d_in)
            weight = (torch.rand(d.d_sae, d.d_in, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * bound
            d.W_enc.copy_(weight.T)
            if d.transcoder:
                d.W_dec.zero_()
            else:
                d.W_dec.copy_(weight / (weight.norm(dim=1, keepdim=True) + torch.finfo(weight.dtype).eps))
            return
        d.init_(seed)  # SAELens's: Kaiming-uniform decoder rows, the encoder their transpose
        if s.decoder_init_norm is not None:
            d.W_dec.mul_(s.decoder_init_norm / d.W_dec.norm(dim=1, keepdim=True))
            if not d.transcoder:
                d.W_enc.copy_(d.W_dec.T)
        if d.arch == "jumprelu":
            d.threshold.fill_(s.jumprelu_init_threshold)

    @torch.no_grad()
    def estimate_scales(self, block: Mapping[str, Tensor]) -> None:
        """SAELens's ``expected_average_only_in``: ``c = sqrt(d) / E||x||`` over ``block``'s tokens."""
        x = block[self.name].float()
        self.scale_in = math.sqrt(x.shape[1]) / float(x.norm(dim=1).mean())
        y = block[self.target].float()
        self.scale_out = math.sqrt(y.shape[1]) / float(y.norm(dim=1).mean())

    @torch.no_grad()
    def first_batch(self, x: Tensor, y: Tensor) -> None:
        """sparsify's start: ``b_dec`` the targets' mean, a transcoder's ``b_enc`` centring the pre-activations."""
        d = self.dictionary
        if d.transcoder:
            d.b_enc.copy_(-x.mean(0) @ d.W_enc)
        d.b_dec.copy_(y.mean(0))

    # -- a step --------------------------------------------------------------------------------

    def inputs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The batch's input and target for this dictionary, float32, times the input scales."""
        x = batch[self.name].to(self.device, torch.float32)
        x = x * self.scale_in if self.scale_in != 1.0 else x
        if self.target == self.name:
            return x, x
        y = batch[self.target].to(self.device, torch.float32)
        return x, y * self.scale_out if self.scale_out != 1.0 else y

    def dead(self) -> Tensor:
        return self.since_fired > self.dead_after

    def _aux_indices(self, scaled: Tensor, dead: Tensor) -> Tensor | None:
        """The AuxK latents of each token [n, k_aux]: the largest (scaled) pre-activations among
        dead latents (None without dead latents or an AuxK loss)."""
        if self.settings.aux() <= 0 or not bool(dead.any()):
            return None
        k_aux = min(self.dictionary.d_out // 2, int(dead.sum()))
        with torch.no_grad():
            return torch.where(dead[None], scaled, -torch.inf).topk(k_aux, dim=-1, sorted=False).indices

    def _aux_weights(self, values: Tensor, indices: Tensor, scale: Tensor | None) -> Tensor:
        """What the AuxK latents' decoder rows are weighted by: their (scaled) pre-activations,
        ReLU'd as sparsify's are, divided by the scale as the decoder reads them."""
        if self.settings.recipe == "sparsify":
            values = torch.relu(values)
        return values / scale[indices] if scale is not None else values

    def _forward(self, x: Tensor, dead: Tensor) -> tuple[Tensor, Tensor, dict[str, Any], Tensor]:
        """Reconstruction [n, d_out], fired latents [d_sae] (bool), extra losses per token (and
        the AuxK latents with their weights, ``_aux``), L0 per token."""
        d, s = self.dictionary, self.settings
        extra: dict[str, Any] = {}
        if d.arch in _SPARSE_ARCHS:
            b_dec = d.b_dec if d.apply_b_dec_to_input else None
            shifted = (x - b_dec).detach() if b_dec is not None else x
            scale = d.W_dec.norm(dim=-1) if d.rescale_by_decoder_norm else None
            with torch.no_grad():
                pre = torch.addmm(d.b_enc, shifted, d.W_enc)
                scaled = pre * scale if scale is not None else pre
                if d.arch == "groupmax":
                    indices = scaled.unflatten(-1, (int(d.k), -1)).argmax(dim=-1)
                    indices = indices + torch.arange(0, d.d_sae, d.d_sae // int(d.k), device=x.device)
                else:
                    indices = scaled.topk(int(d.k), dim=-1, sorted=False).indices
                aux = self._aux_indices(scaled, dead)
            at = _Gathered.apply(shifted, d.W_enc, d.b_enc, b_dec, indices, pre.gather(1, indices))
            values = torch.relu(at * scale[indices] if scale is not None else at)
            weights = values / scale[indices] if scale is not None else values
            recon = sparse_decode(indices, weights, d.W_dec) + d.b_dec
            if aux is not None:
                aux_at = _Gathered.apply(shifted, d.W_enc, d.b_enc, b_dec, aux, pre.gather(1, aux))
                extra["_aux"] = (
                    aux,
                    self._aux_weights(aux_at * scale[aux] if scale is not None else aux_at, aux, scale),
                )
            active = values > 0
            fired = torch.zeros(d.d_sae, dtype=torch.bool, device=x.device)
            fired[indices[active]] = True
            l0 = active.sum(-1).float()
        else:
            x_enc = x - d.b_dec if d.apply_b_dec_to_input else x
            if d.arch == "gated":
                gate_pre = x_enc @ d.W_enc + d.b_gate
                f = (gate_pre > 0).to(x.dtype) * torch.relu(x_enc @ (d.W_enc * d.r_mag.exp()) + d.b_mag)
                pi = torch.relu(gate_pre)
                extra["l1"] = (pi * d.W_dec.norm(dim=-1)).sum(-1)
                extra["_gate"] = pi @ d.W_dec + d.b_dec  # the reconstruction from the gate path alone
            else:
                scale = d.W_dec.norm(dim=-1) if d.rescale_by_decoder_norm else None
                pre = x_enc @ d.W_enc + d.b_enc
                pre = pre * scale if scale is not None else pre
                if d.arch == "standard":
                    f = torch.relu(pre)
                    extra["l1"] = d.l1_penalty(f)
                elif d.arch == "jumprelu":
                    f = jumprelu(pre, d.threshold, s.jumprelu_bandwidth)
                    extra["l0"] = step(pre, d.threshold, s.jumprelu_bandwidth).sum(-1)
                else:  # batchtopk
                    f = batch_topk(pre, d.k)
                    self._update_threshold(f)
                    aux = self._aux_indices(pre.detach(), dead)
                    if aux is not None:
                        extra["_aux"] = (aux, self._aux_weights(pre.gather(1, aux), aux, scale))
            recon = d._times_decoder(f) + d.b_dec
            fired = (f > 0).any(0)
            l0 = (f > 0).sum(-1).float()
        if d.skip:
            recon = recon + x @ d.W_skip.T
        return recon, fired, extra, l0

    @torch.no_grad()
    def _update_threshold(self, f: Tensor) -> None:
        positive = f[f > 0]
        if positive.numel():
            lr = self.settings.topk_threshold_lr
            self.running_threshold.mul_(1 - lr).add_(lr * positive.min().double())

    def loss(self, x: Tensor, y: Tensor, step_index: int) -> tuple[Tensor, Tensor, StepStats]:
        """The recipe's loss of a batch, the latents that fired, the step's numbers."""
        s, d = self.settings, self.dictionary
        dead = self.dead()
        recon, fired, extra, l0 = self._forward(x, dead)
        err = (y - recon).pow(2).sum(-1)  # [n]
        total_variance = (y - y.mean(0)).pow(2).sum()
        fvu = err.sum() / total_variance
        aux = None
        if "_aux" in extra:  # AuxK: the top dead latents reconstruct the residual, scaled by min(n_dead / k_aux, 1)
            indices, weights = extra.pop("_aux")
            factor = min(int(dead.sum()) / (d.d_out // 2), 1.0)
            aux = factor * (sparse_decode(indices, weights, d.W_dec) - (y - recon).detach()).pow(2).sum(-1)
        if s.recipe == "sparsify":
            loss = fvu + (s.aux() * aux.sum() / total_variance if aux is not None else 0)
        else:
            loss = err.mean()
            if aux is not None:
                loss = loss + s.aux() * aux.mean()
            l1_warmup = s.l1_warmup if s.l1_warmup is not None else self.steps // 20
            if "l1" in extra:
                loss = loss + warmed(s.l1_coefficient, step_index, l1_warmup) * extra["l1"].mean()
            if "_gate" in extra:
                loss = loss + (extra["_gate"] - y).pow(2).sum(-1).mean()
            if "l0" in extra:
                loss = loss + warmed(s.l0_coefficient, step_index, s.l0_warmup) * extra["l0"].mean()
        stats = StepStats(float(loss.detach()), float(fvu.detach()), float(l0.mean()))
        return loss, fired, stats

    def step(self, batch: Mapping[str, Tensor], step_index: int) -> StepStats:
        """One optimizer step on ``batch`` (step ``step_index`` from 0)."""
        s, d = self.settings, self.dictionary
        x, y = self.inputs(batch)
        sparsify = s.recipe == "sparsify"
        if sparsify and step_index == 0:
            self.first_batch(x, y)
        if sparsify and not d.transcoder:
            with torch.no_grad():
                d.W_dec.div_(d.W_dec.norm(dim=1, keepdim=True) + torch.finfo(d.W_dec.dtype).eps)
        if d.arch == "jumprelu":
            with torch.no_grad():
                d.threshold.clamp_(min=0.0)
        for group in self.optimizer.param_groups:
            group["lr"] = s.learning_rate(d.d_sae) * lr_factor(s, step_index, self.steps)
        loss, fired, stats = self.loss(x, y, step_index)
        loss.backward()
        if sparsify and not d.transcoder:
            with torch.no_grad():  # remove the gradient parallel to each (unit) decoder row
                parallel = (d.W_dec.grad * d.W_dec).sum(-1, keepdim=True)
                d.W_dec.grad.sub_(parallel * d.W_dec)
        if s.clip_norm() > 0:
            torch.nn.utils.clip_grad_norm_(d.parameters(), s.clip_norm())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.since_fired += x.shape[0]
            self.since_fired[fired] = 0
        return stats

    # -- the trained dictionary ------------------------------------------------------------------

    @torch.no_grad()
    def final(self) -> Dictionary:
        """A copy of the dictionary for use: a batch top-k one's running threshold as every
        feature's JumpReLU threshold, the input scales folded into the weights, the decoder norms
        folded into the encoder where the pre-activations were scaled by them, unit decoder rows
        for sparsify's autoencoders."""
        d = copy.deepcopy(self.dictionary).cpu().eval()
        for p in d.parameters():
            p.requires_grad_(False)
        if d.arch == "batchtopk":
            d.threshold.fill_(float(self.running_threshold))
        if d.arch == "jumprelu":
            d.threshold.clamp_(min=0.0)
        fold_scales_(d, self.scale_in, self.scale_out)
        if d.rescale_by_decoder_norm:
            fold_decoder_norms_(d)
        d.info.update({"trained_by": "lmscope", "recipe": self.settings.recipe, "training_arch": self.settings.arch})
        return d

    def state(self) -> dict:
        return {
            "dictionary": self.dictionary.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "since_fired": self.since_fired,
            "scales": (self.scale_in, self.scale_out),
            "running_threshold": self.running_threshold,
        }

    def load(self, state: Mapping) -> None:
        self.dictionary.load_state_dict(state["dictionary"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.since_fired.copy_(state["since_fired"])
        self.scale_in, self.scale_out = state["scales"]
        self.running_threshold.copy_(state["running_threshold"])


@torch.no_grad()
def fold_scales_(d: Dictionary, c_in: float, c_out: float) -> Dictionary:
    """Fold a training-time input scaling (inputs times ``c_in``, targets times ``c_out``) into
    ``d``'s weights, so that it reads and writes unscaled activations (SAELens's
    ``fold_activation_norm_scaling_factor``): ``W_enc * c_in``, ``W_dec / c_out``, ``b_dec /
    c_out``, ``W_skip * c_in / c_out``; with decoder-norm rescaled pre-activations the threshold
    follows them (``/ c_out``). Returns ``d``."""
    if c_in == 1.0 and c_out == 1.0:
        return d
    d.W_enc.mul_(c_in)
    d.W_dec.div_(c_out)
    d.b_dec.div_(c_out)
    if d.skip:
        d.W_skip.mul_(c_in / c_out)
    if d.rescale_by_decoder_norm and hasattr(d, "threshold"):
        d.threshold.div_(c_out)
    return d


@torch.no_grad()
def fold_decoder_norms_(d: Dictionary) -> Dictionary:
    """Make the decoder rows unit-norm without changing what ``d`` computes: the norms move into
    the encoder (and ``b_enc``), and a dictionary whose pre-activations were scaled by them stops
    scaling (SAELens's ``fold_W_dec_norm``; its thresholds then stay as they are). Returns ``d``."""
    norms = d.W_dec.norm(dim=-1).clamp_min(torch.finfo(d.W_dec.dtype).tiny)
    d.W_dec.div_(norms[:, None])
    if d.arch == "gated":
        d.W_enc.mul_(norms)
        d.b_gate.mul_(norms)
        d.b_mag.mul_(norms)
    else:
        d.W_enc.mul_(norms)
        d.b_enc.mul_(norms)
        if hasattr(d, "threshold") and not d.rescale_by_decoder_norm:
            d.threshold.mul_(norms)
    d.rescale_by_decoder_norm = False
    return d


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Training(Result):
    """A training run: per dictionary (by input site) its log (``{"step", "tokens", "loss", "fvu",
    "l0", "dead"}`` every ``log_every`` steps: means since the last row, dead fraction at the
    row's step), and the trained dictionaries (not in the JSON; saved by the command)."""

    recipe: str
    arch: str
    steps: int
    batch_size: int
    logs: dict[str, list[dict]] = field(default_factory=dict)
    shapes: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    dictionaries: dict[str, Dictionary] = field(default_factory=dict, repr=False)
    saved: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "dictionaries"}
        return {**data, "tokens_per_second": self.tokens_per_second}

    @property
    def done(self) -> int:
        logs = next(iter(self.logs.values()), [])
        return logs[-1]["step"] if logs else 0

    @property
    def tokens_per_second(self) -> float | None:
        return self.done * self.batch_size / self.seconds if self.seconds else None

    def summary(self) -> list[dict]:
        rows = []
        for name, log in self.logs.items():
            last = log[-1] if log else {}
            rows.append({"site": name, **self.shapes.get(name, {}), "steps": last.get("step"),
                         "tokens": last.get("tokens"), "FVU": last.get("fvu"), "L0": last.get("l0"),
                         "dead": last.get("dead")})  # fmt: skip
        return rows

    def text(self) -> str:
        rows = self.summary()
        if not rows or rows[0]["steps"] is None:
            return "no training step done yet."
        speed = f", {self.tokens_per_second:,.0f} tokens/s" if self.tokens_per_second else ""
        parts = [f"{r['site']}: FVU {r['FVU']:.3f}, L0 {r['L0']:.1f}, dead {100 * r['dead']:.1f}%" for r in rows]
        return (
            f"{self.arch} ({self.recipe}), {rows[0]['steps']} steps of {self.batch_size} tokens{speed}. "
            + "; ".join(parts)
            + "."
        )

    def tables(self) -> list[Table]:
        out = [Table("Trained dictionaries (last logged step: means over the last logging interval)", self.summary())]
        for name, log in self.logs.items():
            out.append(Table(f"{name}: training log", log))
        return out

    def figures(self) -> list[Figure]:
        if not self.logs or not any(self.logs.values()):
            return []
        steps = [row["step"] for row in next(iter(self.logs.values()))]
        figs = []
        for key, label in (("fvu", "FVU"), ("l0", "L0")):
            series = {name: [row[key] for row in log] for name, log in self.logs.items()}
            figs.append(
                Figure(
                    f"training_{key}",
                    "lines",
                    f"Training {label}",
                    "step",
                    label,
                    x=steps,
                    series=series,
                    log=key == "fvu",
                )
            )
        return figs


def _save_checkpoint(
    path: Path, settings: TrainSettings, step_done: int, position: Position, learners: list[Learner], run: Training
) -> None:
    if not distributed.is_main():
        return
    state = {
        "format": 1,
        "settings": settings.to_json(),
        "step": step_done,
        "position": list(position),
        "threads": torch.get_num_threads(),
        "learners": {learner.name: learner.state() for learner in learners},
        "rng": torch.get_rng_state(),
        "logs": run.logs,
        "seconds": run.seconds,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(
    path: Path, settings: TrainSettings, learners: list[Learner], run: Training
) -> tuple[int, Position]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a corrupt file
        raise LmscopeError(f"cannot read checkpoint {path}: {' '.join(str(e).split())[:200]}") from e
    if state.get("settings") != settings.to_json():
        raise LmscopeError(f"checkpoint {path} was written with other settings; delete it or use another --out")
    for learner in learners:
        learner.load(state["learners"][learner.name])
    torch.set_rng_state(state["rng"])
    run.logs, run.seconds = state["logs"], state["seconds"]
    if state["threads"] != torch.get_num_threads():
        note(
            f"checkpoint written with {state['threads']} threads, resumed with {torch.get_num_threads()}: not bit-identical"
        )
    return int(state["step"]), tuple(state["position"])


def train(
    source: Source,
    settings: TrainSettings,
    out: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    resume: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> Training:
    """Train one dictionary per (site, out_site) of ``settings`` on ``source``'s activations
    (module docstring) for ``settings.tokens`` tokens (default: the source once), in steps of
    ``batch_size`` tokens. With ``out``, checkpoints go to ``out/checkpoint.pt`` and, with
    ``resume``, a checkpoint there continues. ``on_step(step)`` runs after each step (from 1;
    an exception there interrupts the run as Ctrl-C does). Returns the :class:`Training` with
    the dictionaries ready to use (:meth:`Learner.final`)."""
    s = settings
    widths = source.widths()
    for name in {n for pair in s.pairs() for n in pair}:
        if name not in widths:
            raise LmscopeError(f"no activations for '{name}' (the source has {', '.join(widths)})")
    source = Remembered(source)
    tokens = s.tokens if s.tokens is not None else source.tokens()
    steps = tokens // s.batch_size
    if steps < 1:
        raise LmscopeError(
            f"{tokens} training tokens make no step of {s.batch_size}: lower --batch-size or raise --tokens"
        )
    learners = [Learner(s, name, target, widths[name], widths[target], steps, device) for name, target in s.pairs()]
    run = Training(s.recipe, s.arch, steps, s.batch_size, logs={name: [] for name in s.site})
    for learner in learners:
        d = learner.dictionary
        run.shapes[learner.name] = {
            "out_site": learner.target if d.transcoder else None,
            "d_in": d.d_in,
            "d_sae": d.d_sae,
        }
    checkpoint = Path(out) / CHECKPOINT if out is not None else None
    start, position = 0, (0, 0, 0)
    if checkpoint is not None and resume and checkpoint.is_file():
        start, position = _load_checkpoint(checkpoint, s, learners, run)
        note(f"features train: resumed from {checkpoint} at step {start}")
    elif s.recipe == "saelens" and s.normalize:
        first = source.block(0)
        for learner in learners:
            learner.estimate_scales(first)
    if checkpoint is not None and distributed.is_main():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    sums: dict[str, list[float]] = {name: [0.0, 0.0, 0.0, 0] for name in s.site}
    stream: Iterator = batches(source, s.batch_size, s.seed, position)
    with status_bar("features train", steps, initial=start) as update:
        for index in range(start, steps):
            batch, position = next(stream)
            began = time.perf_counter()
            for learner in learners:
                stats = learner.step(batch, index)
                acc = sums[learner.name]
                acc[0] += stats.loss
                acc[1] += stats.fvu
                acc[2] += stats.l0
                acc[3] += 1
            run.seconds += time.perf_counter() - began
            done = index + 1
            first = learners[0]
            update(
                1,
                f"FVU {sums[first.name][1] / sums[first.name][3]:.3f} L0 {sums[first.name][2] / sums[first.name][3]:.1f}",
            )
            if done % s.log_every == 0 or done == steps:
                for learner in learners:
                    acc = sums[learner.name]
                    run.logs[learner.name].append({
                        "step": done, "tokens": done * s.batch_size, "loss": acc[0] / acc[3], "fvu": acc[1] / acc[3],
                        "l0": acc[2] / acc[3], "dead": float(learner.dead().float().mean()),
                    })  # fmt: skip
                    sums[learner.name] = [0.0, 0.0, 0.0, 0]
            if checkpoint is not None and (done % s.checkpoint_every == 0 or done == steps):
                _save_checkpoint(checkpoint, s, done, position, learners, run)
            if on_step is not None:
                on_step(done)
    run.dictionaries = {learner.name: learner.final() for learner in learners}
    return run

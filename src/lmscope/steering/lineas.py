"""LinEAS: end-to-end learned activation steering with a distributional loss.

Rodriguez et al. 2025, "LinEAS: End-to-end Learning of Activation Steering with a Distributional
Loss" (arXiv 2503.10679). For every chosen layer L an affine map per channel,

    T_L(a) = omega_L * a + beta_L          (omega_L, beta_L: [d]; start at 1 and 0)

is applied to the site ``blocks.L.{site}``. The maps are learned **jointly**: the source prompts
run through the model with every map in place, so layer L sees what the maps below it did, and
the loss sums over layers a one-dimensional optimal-transport distance between the transported
source activations and the target activations (which run unsteered):

    loss = sum_L mean_j  W2^2( {T_L(a)_j over source samples}, {b_j over target samples} )

with the 1-D squared Wasserstein-2 distance computed from sorted samples (the target's quantile
function is interpolated at the source's sample levels ``(i + 0.5) / n`` when the counts differ).
Samples are the prompts' activations pooled over positions (as :func:`~lmscope.steering.directions.features`).
A **group-sparsity** penalty ``lambda * sum_L ||(omega_L - 1, beta_L)||_2`` switches whole layers
off: after each Adam step the proximal operator of the group lasso (block soft-thresholding,
``g <- g * max(0, 1 - lr * lambda / ||g||)``) sets a layer's map exactly to the identity.

At use, a **strength** ``s`` interpolates: ``a + s * (T_L(a) - a)`` (s = 1: the learned map), the
coefficient the steering sweep varies (:meth:`Transport.steerer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.interventions import Intervention, apply
from lmscope.core.model import Model
from lmscope.core.progress import progress_bar
from lmscope.core.tensorfile import metadata_value
from lmscope.steering.directions import features, pooling_weights
from lmscope.steering.steer import Setting, Steerer, first_rows
from lmscope.steering.store import load, save

METHOD = "LinEAS"


def wasserstein_1d(x: Tensor, y: Tensor) -> Tensor:
    """Mean over channels of the squared 1-D Wasserstein-2 distance between the samples of ``x``
    [n, d] and ``y`` [m, d]: ``mean_j mean_i (sort(x)_ij - Q_y,j((i + 0.5) / n))^2`` with
    ``Q_y`` the linear interpolation of ``y``'s sorted samples at levels ``(k + 0.5) / m``."""
    xs = x.sort(0).values
    ys = y.sort(0).values
    n, m = len(x), len(y)
    if n != m:
        levels = (torch.arange(n, dtype=x.dtype, device=x.device) + 0.5) / n * m - 0.5  # in y's index units
        lo = levels.floor().clamp(0, m - 1).long()
        hi = (lo + 1).clamp(max=m - 1)
        frac = (levels - lo.to(x.dtype)).clamp(0, 1)[:, None]
        ys = ys[lo] * (1 - frac) + ys[hi] * frac
    return ((xs - ys) ** 2).mean()


@dataclass
class Transport:
    """Learned LinEAS maps: ``scale`` (omega) and ``shift`` (beta), [n_layers, d], for ``layers``."""

    layers: list[int]
    site: str
    scale: Tensor
    shift: Tensor
    info: dict = field(default_factory=dict)

    def active(self) -> list[int]:
        """The layers whose map is not the identity (the rest were switched off by the penalty)."""
        delta = torch.cat([self.scale - 1, self.shift], dim=1).norm(dim=1)
        return [layer for layer, norm in zip(self.layers, delta.tolist(), strict=True) if norm > 0]

    def interventions(self, strengths: Sequence[float]) -> list[Intervention]:
        """Apply ``a + s_r (T_L(a) - a)`` at every active layer, batch row r with strength
        ``strengths[r]`` (one strength: broadcast over the batch)."""
        s = torch.tensor([float(v) for v in strengths])
        out = []
        for layer in self.active():
            i = self.layers.index(layer)
            out.append(apply(f"blocks.{layer}.{self.site}", _map(self.scale[i], self.shift[i], s)))
        return out

    def steerer(self) -> Steerer:
        """The sweep's view: a setting's ``coeff`` is the strength (its layers are ignored)."""
        return lambda settings: self.interventions([st.coeff if st else 0.0 for st in settings])

    def setting(self, strength: float) -> Setting:
        """The sweep setting of this transport at ``strength``."""
        return Setting(tuple(self.active()), strength, METHOD)

    def save(self, path: str | Path, **metadata) -> Path:
        tensors = {"scale": self.scale, "shift": self.shift}
        return save(path, tensors, method="lineas", site=self.site, layers=self.layers, info=self.info, **metadata)


def _map(scale: Tensor, shift: Tensor, strengths: Tensor):
    def fn(x: Tensor) -> Tensor:
        s = strengths[0].to(x.device, x.dtype) if len(strengths) == 1 else first_rows(strengths, x)
        s = s if s.ndim == 0 else s.view(-1, *([1] * (x.ndim - 1)))
        return x + s * ((scale.to(x.dtype) - 1) * x + shift.to(x.dtype))

    return fn


def load_transport(path: str | Path) -> Transport:
    """A :class:`Transport` saved by :meth:`Transport.save`."""
    tensors, meta = load(path)
    if meta.get("method") != "lineas" or not {"scale", "shift"} <= tensors.keys() or "site" not in meta:
        raise LmscopeError(f"{path} is not a LinEAS transport")
    layers, info = metadata_value(meta, "layers", path), metadata_value(meta, "info", path)
    return Transport(layers, meta["site"], tensors["scale"], tensors["shift"], info)


def train_lineas(
    model: Model,
    source: Sequence[str],
    target: Sequence[str],
    layers: Sequence[int] | None = None,
    *,
    site: str = "resid_post",
    position: str = "mean",
    steps: int = 100,
    lr: float = 1e-2,
    sparsity: float = 1e-3,
    seed: int = 0,
) -> Transport:
    """Learn the maps of the module docstring from unpaired ``source`` and ``target`` texts."""
    if len(source) < 2 or len(target) < 2:
        raise LmscopeError("LinEAS needs at least 2 source and 2 target texts")
    layers = list(range(model.n_layers)) if layers is None else sorted({int(layer) for layer in layers})
    torch.manual_seed(seed)
    with torch.no_grad():
        goal = features(model, target, layers, site=site, position=position)  # [m, L, d]
    d = goal.shape[-1]
    delta = torch.zeros(len(layers), d, requires_grad=True)  # omega - 1
    shift = torch.zeros(len(layers), d, requires_grad=True)
    opt = torch.optim.Adam([delta, shift], lr=lr)
    ids, mask, weights = pooling_weights(model, source, position)
    names = [f"blocks.{layer}.{site}" for layer in layers]
    losses = []
    with model.frozen(), progress_bar("LinEAS", steps) as advance:
        for _ in range(steps):
            ivs = [apply(name, _map(1 + delta[i], shift[i], torch.ones(1))) for i, name in enumerate(names)]
            cache = model.run(
                {"input_ids": ids, "attention_mask": mask}, names, ivs, logits=False, stop_after=max(layers), grad=True
            ).cache
            loss = sum(
                wasserstein_1d(
                    torch.einsum("bpd,bp->bd", cache[name].float(), weights.to(cache[name].device)), goal[:, i]
                )
                for i, name in enumerate(names)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            _group_soft_threshold(delta, shift, lr * sparsity)
            losses.append(float(loss.detach()))
            advance(1)
    info = {"steps": steps, "lr": lr, "sparsity": sparsity, "position": position, "loss": losses,
            "n_source": len(source), "n_target": len(target)}  # fmt: skip
    return Transport(layers, site, (1 + delta).detach(), shift.detach(), info)


@torch.no_grad()
def _group_soft_threshold(delta: Tensor, shift: Tensor, threshold: float) -> None:
    """Proximal step of ``threshold * sum_L ||(delta_L, shift_L)||_2`` (block soft-thresholding)."""
    if threshold <= 0:
        return
    norm = torch.cat([delta, shift], dim=1).norm(dim=1, keepdim=True)
    factor = (1 - threshold / norm.clamp_min(1e-12)).clamp_min(0)
    delta.mul_(factor)
    shift.mul_(factor)

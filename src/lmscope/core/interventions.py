"""Interventions: change a site's activation during a forward pass or generation.

An :class:`Intervention` selects part of a site's tensor (optionally one head, optionally
some positions) and replaces it. The constructors cover the standard edits of the
interpretability literature:

- :func:`zero` -- zero ablation;
- :func:`mean` -- mean ablation from supplied statistics;
- :func:`patch` -- activation patching / interchange intervention (Vig et al. 2020;
  Geiger et al. 2021; Meng et al. 2022): take the value from another run's cache;
- :func:`subspace_patch` -- interchange intervention on a subspace (Geiger et al. 2023, DAS):
  ``x + (s - x) B B^T``, the part of ``x`` in span(B) taken from another run;
- :func:`add` -- activation addition / steering (Turner et al. 2023): ``x + coeff * vector``;
- :func:`apply` -- any function of the selected values.

Interventions compose: several on one site apply in the order given.

Positions are absolute indices into the (padded) sequence; during generation that is
prompt plus tokens generated so far, so ``positions=None`` steers every new token too.
Negative positions count from the end of the sequence processed so far.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.sites import Site, parse_site

# (selected values, absolute positions as a slice or LongTensor) -> new values
Replace = Callable[[Tensor, "slice | Tensor"], Tensor]


@dataclass(frozen=True)
class Intervention:
    """Replace ``site`` (head ``site.head``, ``positions``) by ``replace(selected, abs_positions)``."""

    site: Site
    replace: Replace
    positions: tuple[int, ...] | None = None

    def __call__(self, x: Tensor, offset: int = 0) -> Tensor:
        """Apply to a whole-site tensor ``x`` whose position axis starts at absolute ``offset``."""
        axis = self.site.pos_axis
        n = x.shape[axis]
        if self.positions is None:
            local: slice | Tensor = slice(None)
            absolute: slice | Tensor = slice(offset, offset + n)
        else:
            end = offset + n
            keep = [p + end if p < 0 else p for p in self.positions]
            keep = [p for p in keep if offset <= p < end]
            if not keep:
                return x
            absolute = torch.tensor(keep, device=x.device)
            local = absolute - offset
        idx = _index(self.site, x.ndim, local)
        if (self.site.head is None or self.site.head_axis is None) and self.positions is None:
            return self.replace(x, absolute).to(x.dtype)
        out = x.clone()
        out[idx] = self.replace(out[idx], absolute).to(x.dtype)
        return out


def _index(site: Site, ndim: int, positions: slice | Tensor) -> tuple:
    """Index tuple selecting ``positions`` (and ``site.head``) of a whole-site tensor."""
    idx: list = [slice(None)] * ndim
    idx[site.pos_axis] = positions
    if site.head is not None and site.head_axis is not None:
        idx[site.head_axis] = site.head
    return tuple(idx)


def _site(site: str | Site, head: int | None) -> Site:
    if isinstance(site, Site):
        return site if head is None else Site(site.kind, site.layer, head)
    return parse_site(site, head)


def _positions(positions: int | Sequence[int] | None) -> tuple[int, ...] | None:
    if positions is None:
        return None
    if isinstance(positions, int):
        return (positions,)
    return tuple(int(p) for p in positions)


def _take(source: Tensor, site: Site, absolute: slice | Tensor, like: Tensor) -> Tensor:
    """Select from a whole-site ``source`` what the intervention selected from the target.

    ``source`` may have batch size 1 (broadcast) and position size 1 (broadcast).
    """
    if source.shape[0] not in (1, like.shape[0]):
        raise LmscopeError(f"{site}: source batch {source.shape[0]} does not match the run's batch {like.shape[0]}")
    n = source.shape[site.pos_axis]
    if n == 1:
        pos: slice | Tensor = slice(None)
    else:
        stop = absolute.stop if isinstance(absolute, slice) else int(absolute.max()) + 1
        if stop > n:
            raise LmscopeError(f"{site}: source has {n} positions, the run needs position {stop - 1}")
        pos = absolute if isinstance(absolute, slice) else absolute.to(source.device)
    return source[_index(site, source.ndim, pos)].to(like.device)


def zero(site: str | Site, positions: int | Sequence[int] | None = None, head: int | None = None) -> Intervention:
    """Zero ablation: set the selected activations to 0."""
    return Intervention(_site(site, head), lambda x, _: torch.zeros_like(x), _positions(positions))


def mean(
    site: str | Site,
    value: Tensor,
    positions: int | Sequence[int] | None = None,
    head: int | None = None,
) -> Intervention:
    """Mean ablation: set the selected activations to supplied mean statistics.

    ``value`` is the whole site's mean without the batch axis: either per position
    (e.g. ``[pos, d_model]``, ``[pos, n_heads, d_head]``) or per feature, averaged over
    positions too (``[d_model]``, ``[n_heads, d_head]``). It is indexed like the target.
    """
    s = _site(site, head)
    full = value.unsqueeze(0)
    if s.pos_axis == 1 and full.ndim == (4 if s.head_axis else 3) - 1:
        full = full.unsqueeze(1)  # per-feature statistics: broadcast over positions
    return Intervention(s, lambda x, pos: _take(full, s, pos, x), _positions(positions))


def patch(
    site: str | Site,
    source: Tensor | Mapping[str, Tensor],
    positions: int | Sequence[int] | None = None,
    head: int | None = None,
) -> Intervention:
    """Activation patching: take the selected activations from another run.

    ``source`` is that run's cache (looked up by site name) or the whole-site tensor
    ``[batch or 1, pos, ...]``.
    """
    s = _site(site, head)
    if isinstance(source, Mapping):
        key = str(s) if s.kind == "moe.expert" else s.name  # an expert's output is a whole site
        if key not in source:
            raise LmscopeError(f"patch source has no '{key}' (captured: {', '.join(source) or 'none'})")
        source = source[key]
    src = source
    return Intervention(s, lambda x, pos: _take(src, s, pos, x), _positions(positions))


def subspace_patch(
    site: str | Site,
    source: Tensor | Mapping[str, Tensor],
    basis: Tensor,
    positions: int | Sequence[int] | None = None,
    head: int | None = None,
) -> Intervention:
    """Interchange intervention on a subspace (distributed interchange intervention, Geiger et al.
    2023 "Finding alignments between interpretable causal variables and distributed neural
    representations"; pyvene's ``LowRankRotatedSpaceIntervention``): the selected activations
    ``x`` keep their part orthogonal to span(B) and take their part in span(B) from the source
    run's ``s``::

        x' = x + (s - x) B B^T        (x, s: [..., features]; B: [features, k])

    ``basis`` B is ``[features]`` (one direction) or ``[features, k]`` with orthonormal columns
    (not re-orthonormalised here, so gradients reach a parametrised basis); ``features`` is the
    product of the site's axes after the position axis (``d_model``; ``n_heads * d_head`` for a
    whole ``attn.z``, heads concatenated as ``o_proj`` reads them; ``d_head`` for one head).
    ``source`` is as for :func:`patch`. With ``B`` the identity this is :func:`patch`.
    """
    full = patch(site, source, positions, head)  # selects the source's values like the target's
    if full.site.pos_axis != 1:
        raise LmscopeError(f"{full.site}: a subspace patch needs a site whose features follow the position axis")
    directions = basis if basis.ndim == 2 else basis.unsqueeze(-1)

    def replace(x: Tensor, pos: slice | Tensor) -> Tensor:
        diff = (full.replace(x, pos) - x).flatten(2)  # [batch, pos, features]
        if diff.shape[-1] != directions.shape[0]:
            raise LmscopeError(
                f"{full.site}: basis has {directions.shape[0]} rows, the site has {diff.shape[-1]} features"
            )
        b = directions.to(x.device, x.dtype)
        return x + ((diff @ b) @ b.T).view_as(x)

    return Intervention(full.site, replace, full.positions)


def add(
    site: str | Site,
    vector: Tensor,
    coeff: float = 1.0,
    positions: int | Sequence[int] | None = None,
    head: int | None = None,
) -> Intervention:
    """Activation addition (steering, Turner et al. 2023): ``x + coeff * vector``.

    ``vector`` broadcasts against the selected values, e.g. ``[d_model]`` for a residual
    site, ``[d_head]`` for one head of ``attn.z``.
    """
    return Intervention(
        _site(site, head),
        lambda x, _: x + coeff * vector.to(x.device, x.dtype),
        _positions(positions),
    )


def apply(
    site: str | Site,
    fn: Callable[[Tensor], Tensor],
    positions: int | Sequence[int] | None = None,
    head: int | None = None,
) -> Intervention:
    """Replace the selected activations ``x`` by ``fn(x)`` (``fn`` must not modify ``x`` in place)."""
    return Intervention(_site(site, head), lambda x, _: fn(x), _positions(positions))

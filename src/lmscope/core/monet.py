"""Monet layers: the two routing distributions, their product, and masking product experts.

Monet (Park et al., "Monet: Mixture of Monosemantic Experts for Transformers", ICLR 2025, arXiv
2412.04139) replaces the MLP by a mixture of E**2 experts per layer (262,144 for E = 512): product
expert (i, j) pairs half-expert i of a first group of E with half-expert j of a second. A router
(``Family.monet_router``: two linear maps to [heads, E], then per routing head a batch-norm-based
top-k and a softmax over the kept logits) gives the distributions g1, g2 [batch, pos, heads, E]; it
sits on the first layer of each group of ``moe_groups`` layers and the others reuse its routing
(:func:`owner`). The experts module (``Family.monet_experts``) is called as ``experts(x, g1, g2)``
and returns (the paper's §3, for both its vertical and horizontal decompositions)::

    out = sum_h sum_i sum_j g1[h, i] g2[h, j] E_ij(x)                                     (1)

Sites (:mod:`lmscope.core.sites`), per layer of experts: the routing *this* layer's experts
receive, whichever layer's router computed it.

- ``blocks.{L}.monet.g1`` / ``.g2`` [batch, pos, heads, E]: read from, and written into, the
  experts call; an edit changes layer L alone (the layers sharing the router keep theirs);
- ``blocks.{L}.monet.product`` [batch, pos, heads, E, E]: ``g1[..., :, None] * g2[..., None, :]``,
  the weight of product expert (i, j) at ``[..., i, j]`` (flat expert index ``i * E + j``).

Editing the product (:func:`mask` zeroes entries; any intervention may write other values) uses
that (1) is bilinear in (g1, g2): a product P edited to P' gives::

    out' = out + sum_{h,i,j} (P' - P)[h, i, j] E_ij(x),    E_ij(x) = experts(x, e_i, e_j)

where ``e_i, e_j`` route every token to half-experts i and j on one routing head (one-hot). So
lmscope computes only the experts whose entry changed somewhere in the batch, by calling the
model's own experts module with one-hot routing (batched over pairs), with no Monet-specific
weight math. Monet computes (1) using that each head's g1 and g2 sum to 1 (a half-expert's own
terms are weighted by ``sum_h g1[h, i]``); the expansion is exact for the router's distributions
and for g1/g2 edits that keep them normalised. The product is computed from g1 and g2 for the
site and is not on the forward's path: gradients reach the g1 and g2 sites, not the product.

Cost: a captured product holds heads * E**2 values per token (2M for Monet's 8 heads over
512 x 512 experts: capture it for a few tokens or layers); an edit costs one evaluation of the
experts module per changed expert and token, batched (:data:`_TOKENS_PER_CALL` per call).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscope.core.errors import LmscopeError
from lmscope.core.hooks import Hook, HookSession
from lmscope.core.interventions import Intervention, _positions
from lmscope.core.sites import MONET_KINDS, Site, SiteKind, SiteProvider, register_site_kind

_TOKENS_PER_CALL = 4096  # (pairs x tokens) per call of the experts module when expanding an edit


def dims(model) -> tuple[int, int]:
    """``(heads, experts)``: Monet's routing heads and half-experts per group (config ``moe_heads``,
    ``moe_experts``)."""
    config = model.hf.config
    heads, experts = getattr(config, "moe_heads", None), getattr(config, "moe_experts", None)
    if not heads or not experts:
        raise LmscopeError("cannot tell Monet's routing heads and experts (config moe_heads, moe_experts)")
    return int(heads), int(experts)


def owner(model, layer: int) -> int:
    """The layer whose router computes the routing ``layer``'s experts use: the nearest layer at or
    before it that has a router (routers are shared by groups of consecutive layers)."""
    for candidate in range(layer, -1, -1):
        if model.has_module(candidate, model.family.monet_router):
            return candidate
    raise LmscopeError(f"no Monet router at or before layer {layer}")


def check_site(model, site: Site) -> None:
    """A clear error for a Monet site of a layer without Monet experts."""
    if site.layer not in model.layers_with("monet_experts"):
        raise LmscopeError(f"site '{site}': layer {site.layer} has no Monet experts block")


# -- interventions -----------------------------------------------------------------------------


def mask(layer: int, experts: Sequence[tuple[int, int] | int], positions=None) -> Intervention:
    """Remove product experts from layer ``layer`` (at ``positions``): their entries of the product
    are zeroed on every routing head, so the layer's experts output becomes the sum of
    ``g1[h, i] g2[h, j] E_ij(x)`` over the other (h, i, j); the other entries keep their values.
    ``experts``: (i, j) pairs (half-expert i of the first group, j of the second) or flat indices
    ``i * E + j``. Masking nothing leaves the forward bitwise unchanged."""
    chosen = list(experts)

    def fn(product: Tensor, _) -> Tensor:
        n = product.shape[-1]
        pairs = [divmod(int(e), n) if isinstance(e, int) else (int(e[0]), int(e[1])) for e in chosen]
        bad = [p for p in pairs if not (0 <= p[0] < n and 0 <= p[1] < n)]
        if bad:
            raise LmscopeError(f"Monet expert(s) {bad} out of range ({n} x {n} product experts)")
        if not pairs:
            return product
        rows, cols = zip(*pairs, strict=True)
        product = product.clone()
        product[..., list(rows), list(cols)] = 0
        return product

    return Intervention(Site("monet.product", layer), fn, _positions(positions))


# -- the session's callbacks -------------------------------------------------------------------


def _split_call(args: tuple, kwargs: dict) -> list[Tensor]:
    """[x, g1, g2] of an experts call, positional or by keyword."""
    values = list(args[:3])
    for names in (("x", "hidden_states"), ("g1",), ("g2",))[len(values) :]:
        key = next((n for n in names if n in kwargs), None)
        if key is None:
            raise LmscopeError("unexpected call of the Monet experts module (expected hidden, g1, g2)")
        values.append(kwargs[key])
    return values


def _join_call(args: tuple, kwargs: dict, g1: Tensor, g2: Tensor) -> tuple[tuple, dict]:
    args, kwargs = list(args), dict(kwargs)
    for index, name, value in ((1, "g1", g1), (2, "g2", g2)):
        if len(args) > index:
            args[index] = value
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def expert_outputs(experts: nn.Module, x: Tensor, pairs: Tensor, heads: int, n: int) -> Tensor:
    """``E_ij(x)`` for each row (i, j) of ``pairs`` [k, 2]: [k, batch, pos, d_model], from one call of
    the experts module with every token routed to (i, j) alone, on routing head 0, over a batch of
    k copies of ``x`` [batch, pos, d_model]."""
    k, (b, p) = pairs.shape[0], x.shape[:2]
    one_hot = [torch.zeros(k, b, p, heads, n, dtype=x.dtype, device=x.device) for _ in range(2)]
    for group, g in enumerate(one_hot):
        g[:, :, :, 0] = F.one_hot(pairs[:, group], n).to(x.dtype)[:, None, None]
    copies = x.expand(k, *x.shape).reshape(k * b, *x.shape[1:])
    out = experts.forward(copies, *(g.view(k * b, p, heads, n) for g in one_hot))
    return out.view(k, b, p, -1)


def _expanded(experts: nn.Module, x: Tensor, delta: Tensor, heads: int) -> Tensor | None:
    """``sum_ij delta[..., i, j] E_ij(x)`` [batch, pos, d_model] over the pairs where ``delta``
    [batch, pos, E, E] is not 0 somewhere (None when it is 0 everywhere)."""
    pairs = delta.ne(0).flatten(0, 1).any(0).nonzero()  # [k, 2]
    if pairs.shape[0] == 0:
        return None
    n, chunk = delta.shape[-1], max(1, _TOKENS_PER_CALL // max(1, x.shape[0] * x.shape[1]))
    total = None
    for start in range(0, pairs.shape[0], chunk):
        part = pairs[start : start + chunk]
        outs = expert_outputs(experts, x, part, heads, n)  # [k, batch, pos, d_model]
        weights = delta[:, :, part[:, 0], part[:, 1]].to(outs.dtype)  # [batch, pos, k]
        term = torch.einsum("bpk,kbpd->bpd", weights, outs)
        total = term if total is None else total + term
    return total


def session_hooks(session: HookSession, layer: int | None, keys: set[str]) -> list[Hook]:
    """The hooks that serve a hook session's ``monet.*`` sites ``keys`` of ``layer`` (the
    provider's ``hooks``; ``session.sites`` is its :class:`lmscope.core.hooks.SessionSites`)."""
    model, sites = session.model, session.sites

    def offset() -> int:
        return session.offset

    heads, _ = dims(model)

    def experts_in(module, args, kwargs):
        _, g1, g2 = _split_call(args, kwargs)
        new = []
        for kind, g in (("monet.g1", g1), ("monet.g2", g2)):
            if sites.wants(kind, layer):  # with grad, a view of its own: its .grad is this layer's
                g = sites.process(kind, layer, g.view_as(g) if sites.grad else g, offset())
            new.append(g)
        if new[0] is g1 and new[1] is g2:
            return None
        return _join_call(args, kwargs, *new)

    def experts_out(module, args, kwargs, out):
        x, g1, g2 = _split_call(args, kwargs)  # as the module received them (after experts_in)
        product = g1[..., :, None] * g2[..., None, :]  # [batch, pos, heads, E, E]
        new = sites.process("monet.product", layer, product, offset())
        if new is product:
            return None
        extra = _expanded(module, x, (new - product).sum(2), heads)
        return None if extra is None else out + extra.to(out.dtype)

    hooks = [Hook("monet.experts", layer, experts_in)]
    if sites.wants("monet.product", layer):
        hooks.append(Hook("monet.experts.out", layer, experts_out))
    return hooks


# -- the provider ------------------------------------------------------------------------------


def has(model, kind: str, layer: int | None = None) -> bool:
    """Whether ``model`` has Monet site ``kind`` at ``layer``: a layer with a Monet experts module."""
    return layer is not None and model.has_module(layer, model.family.monet_experts)


def shape(model, site: Site, batch: int, pos: int) -> tuple[int, ...]:
    """[batch, pos, heads, E] for g1 and g2, [batch, pos, heads, E, E] for the product."""
    heads, n = dims(model)
    return (batch, pos, heads, n, n) if site.kind == "monet.product" else (batch, pos, heads, n)


MONET = register_site_kind(
    SiteProvider(
        "monet",
        tuple(SiteKind(k) for k in MONET_KINDS),
        has=has,
        shape=shape,
        hooks=session_hooks,
        check=check_site,
        # before the dense sites' hooks: Monet's experts module is the MLP, whose output mlp.out
        # must read after a product edit
        order=-10,
    )
)

"""The dense sites' provider: residual stream, attention, MLP, embedding, final norm, logits.

Every kind of :mod:`lmscope.core.sites` that every architecture has (as far as its layers have the
modules): module inputs and outputs are the hook points of the same names
(:mod:`lmscope.core.hookpoints`); ``attn.q/k/v/pattern`` are read inside the attention interface
by the hook session itself (:class:`lmscope.core.hooks.HookSession`); ``resid_mid`` is
``resid_pre`` plus the layer's attention contribution (exactly the sum the layer computes), and an
intervention on it rewrites the contribution. Registered as provider ``"dense"`` when
:mod:`lmscope.core` is imported.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.hooks import Hook, HookSession
from lmscope.core.sites import (
    ATTN_INTERFACE_KINDS,
    GLOBAL_KINDS,
    HEAD_KINDS,
    LAYER_KINDS,
    MOE_KINDS,
    MONET_KINDS,
    Site,
    SiteKind,
    SiteProvider,
    all_sites,
    parse_site,
    register_site_kind,
)

# Sites read from their own hook point after the residual hooks, in forward order.
_POINT_KINDS = ("attn.z", "attn.out", "mlp.in", "mlp.post", "mlp.out", "resid_post")


def _kind(name: str) -> SiteKind:
    if name in GLOBAL_KINDS:
        return SiteKind(name, layered=False)
    if name == "attn.pattern":  # [batch, heads, q_pos, k_pos]; the latest step during generation
        return SiteKind(name, suffix="head", head_axis=1, pos_axis=2, grows=False)
    if name in HEAD_KINDS:  # keys and values already hold every position
        return SiteKind(name, suffix="head", head_axis=2, grows=name not in ("attn.k", "attn.v"))
    return SiteKind(name)


def has(model, kind: str, layer: int | None = None) -> bool:
    """Whether ``model`` has dense site ``kind`` at ``layer``: a hybrid's layer without attention
    has no head sites, a model computing attention inline no ``attn.q/k/v/pattern``, a layer
    without an MLP down-projection no ``mlp.post``, a parallel-residual model no ``resid_mid``."""
    if kind in HEAD_KINDS and layer is not None and model.family.mixer and layer not in model.layers_with("attn"):
        return False  # a hybrid's layer without attention (its mixer has no heads)
    if kind in ATTN_INTERFACE_KINDS:
        return model.family.attn_interface
    if kind == "mlp.post":
        return layer is None or model.has_module(layer, model.family.mlp_down)
    return kind != "resid_mid" or not model.parallel_residual


def check(model, site: Site) -> None:
    """A one-line error for a dense site ``model`` lacks, or a head out of range."""
    if site.kind in ATTN_INTERFACE_KINDS and not model.family.attn_interface:
        raise LmscopeError(
            f"site '{site}': {model.hf.config.model_type} computes attention inline, so attn.q/k/v/pattern "
            "cannot be read (every other site can)"
        )
    if site.kind in HEAD_KINDS and site.layer is not None and not has(model, site.kind, site.layer):
        heads = model.layers_with("attn")
        where = f"{site.kind} exists on layers {heads}" if heads else "no layer has head sites"
        raise LmscopeError(
            f"site '{site}': layer {site.layer} has no attention heads (its token mixer "
            f"{model.family.mixer} is read as a whole: attn.out, resid_mid); {where}"
        )
    if site.head is not None:
        kv = site.kind in ("attn.k", "attn.v")
        n = model.n_kv_heads_of(site.layer) if kv else model.n_heads
        if not 0 <= site.head < n:
            raise LmscopeError(f"site '{site}': head {site.head} out of range ({n} {'KV heads' if kv else 'heads'})")


def shape(model, site: Site, batch: int, pos: int) -> tuple[int, ...]:
    """The shape of dense site ``site``'s whole tensor (heads sized as its layer's)."""
    kind, layer = site.kind, site.layer
    if kind == "attn.pattern":
        return (batch, model.n_heads, pos, pos)
    if kind in HEAD_KINDS and layer is not None:
        heads = model.n_kv_heads_of(layer) if kind in ("attn.k", "attn.v") else model.n_heads
        return (batch, pos, heads, model.d_head_of(layer))
    width = {"mlp.post": model.d_mlp, "logits": model.d_vocab}.get(kind, model.d_model)
    return (batch, pos, width)


def names(model) -> list[Site]:
    """Every dense site ``model`` has, in forward order (``embed`` first, ``logits`` last)."""
    sites = [parse_site(name) for name in all_sites(model.n_layers)]
    return [s for s in sites if has(model, s.kind, s.layer)]


def hooks(session: HookSession, layer: int | None, keys: set[str]) -> list[Hook]:
    """The hooks serving the dense sites ``keys`` of ``layer`` (``attn.q/k/v/pattern`` need none:
    the session reads them inside the attention interface)."""
    if layer is None:
        return [Hook(kind, None, session.point_hook(kind, None)) for kind in GLOBAL_KINDS if kind in keys]
    out = []
    if "resid_pre" in keys or "resid_mid" in keys:
        resid_pre: dict[str, Tensor] = {}  # this forward's resid_pre (after its edits), for resid_mid
        out.append(Hook("resid_pre", layer, _resid_pre_hook(session, layer, resid_pre)))
        if "resid_mid" in keys:
            if session.model.parallel_residual:
                raise LmscopeError("resid_mid does not exist in this model: attention and MLP run in parallel")
            out.append(Hook("attn.contrib", layer, _resid_mid_hook(session, layer, resid_pre)))
    out += [Hook(kind, layer, session.point_hook(kind, layer)) for kind in _POINT_KINDS if kind in keys]
    return out


def _resid_pre_hook(session: HookSession, layer: int, memory: dict[str, Tensor]) -> Callable:
    def fn(x: Tensor) -> Tensor | None:
        new = session.sites.process("resid_pre", layer, x, session.offset)
        memory["x"] = new
        return new if new is not x else None

    return fn


def _resid_mid_hook(session: HookSession, layer: int, memory: dict[str, Tensor]) -> Callable:
    scale = session.model.residual_scale

    def fn(contrib: Tensor) -> Tensor | None:
        pre = memory["x"]
        mid = pre + contrib * scale if scale != 1 else pre + contrib
        new = session.sites.process("resid_mid", layer, mid, session.offset)
        return None if new is mid else (new - pre) / scale

    return fn


DENSE = register_site_kind(
    SiteProvider(
        "dense",
        tuple(
            _kind(k)
            for k in ("embed", *(k for k in LAYER_KINDS if k not in MOE_KINDS + MONET_KINDS), "final_norm", "logits")
        ),
        has=has,
        shape=shape,
        hooks=hooks,
        check=check,
        names=names,
        order=0,
    )
)

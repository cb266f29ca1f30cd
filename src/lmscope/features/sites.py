"""Dictionaries attached to a model: their features and error terms as sites of their own.

``attach(model, dictionary, name="sae")`` registers a site provider
(:func:`lmscope.core.sites.register_site_kind`) whose kinds live under the dictionary's site: a
sparse autoencoder at ``blocks.12.resid_post`` adds

- ``blocks.12.resid_post.sae.features`` [batch, pos, d_sae]: ``encode(x)``; a suffix selects one
  feature (``...features.7``: [batch, pos]), as a head suffix does;
- ``blocks.12.resid_post.sae.error`` [batch, pos, d_out]: ``x - decode(encode(x))``, in the
  dictionary's own space (heads of ``attn.z`` flattened, a folded norm's gain divided out).

A transcoder reads its input site and writes its output site; its features are named under the
input site, its error under the output site (``blocks.3.mlp.in.tc.features``,
``blocks.3.mlp.out.tc.error``). Sites are captured and intervened on like any other
(``model.run(capture=..., interventions=...)``, ``model.generate``, :mod:`lmscope.core.interventions`
and :func:`clamp` / :func:`scale` here). The site the dictionary writes becomes::

    out' = decode(f') + error'        (f', error': the features and error after interventions)

which is ``out`` itself while nothing is edited (the forward is then bitwise the model's own); an
edit of the features alone adds ``decode_delta(f' - f)``, so zeroing feature i of an autoencoder
gives ``x - f_i W_dec[i]``. With ``grad`` the splice is always made, the error being computed from
its own copy of the features, so that a captured feature's gradient is the model's gradient
through the decoder (the error held fixed) while gradients upstream are unchanged.

The provider reuses the hooks of the site's own provider (the dense provider's for
``resid_post``, ``mlp.in``, ...) through a view of the session whose ``process`` runs the
dictionary, so the dictionary sees exactly what a capture of that site would. Its hooks run before
the dense provider's (``order``), so a capture of the base site holds the spliced value.

A dictionary marked ``norm_folded`` (TransformerLens's ``fold_ln`` convention) reads ``mlp.in``
(or ``final_norm``) with the norm's gain divided out and bias subtracted, and its reconstruction
is mapped back through them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import torch
from torch import Tensor, nn

from lmscope.core.errors import LmscopeError
from lmscope.core.hooks import Hook, HookSession
from lmscope.core.interventions import Intervention, apply
from lmscope.core.sites import Site, SiteKind, SiteProvider, provider_of, register_site_kind, unregister_site_kind
from lmscope.core.weights import parameter
from lmscope.features.dictionary import Dictionary

_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
_ATTACHED: dict[str, Attachment] = {}


# -- adapting a site's tensor to the dictionary's space ----------------------------------------


@dataclass
class _Space:
    """How a site's tensor maps to the vectors a dictionary reads or writes: heads flattened
    (``attn.z``), and a folded norm's gain and bias (``x_dict = (x - bias) / gain``)."""

    heads: tuple[int, int] | None = None
    gain: Tensor | None = None
    bias: Tensor | None = None

    def to_dict(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        x = x.flatten(-2) if self.heads else x
        x = x.to(dtype)
        if self.gain is not None:
            x = (x - self.bias) / self.gain
        return x

    def from_dict(self, y: Tensor, like: Tensor, delta: bool = False) -> Tensor:
        """``y`` in the site's space (``delta``: a difference, so without the bias), as ``like``'s dtype."""
        if self.gain is not None:
            y = y * self.gain if delta else y * self.gain + self.bias
        y = y.unflatten(-1, self.heads) if self.heads else y
        return y.to(like.dtype)


def _norm_affine(norm: nn.Module, width: int) -> tuple[Tensor, Tensor]:
    """(gain, bias) [width] of a norm: a LayerNorm's weight and bias, an RMS norm's effective gain
    (``norm(1) * sqrt(1 + eps)``, whatever the family's formula) and no bias."""
    if isinstance(norm, nn.LayerNorm):
        weight, bias = parameter(norm), parameter(norm, "bias")
        gain = weight.detach().float() if weight is not None else torch.ones(width)
        return gain, bias.detach().float() if bias is not None else torch.zeros_like(gain)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-6
    ref = next(norm.parameters(), torch.empty(0))
    with torch.no_grad():
        gain = norm(torch.ones(width, dtype=ref.dtype if ref.is_floating_point() else torch.float32, device=ref.device))
    gain = gain.float() * (1 + eps) ** 0.5
    return gain, torch.zeros_like(gain)


def _space(model, site: Site, folded: bool) -> _Space:
    heads = None
    if site.kind == "attn.z":
        heads = (model.n_heads, model.d_head_of(site.layer))
    if not folded:
        return _Space(heads)
    if site.kind == "mlp.in":
        norm = model.layer_module(site.layer, model.family.mlp_norm) if model.family.mlp_norm else None
    elif site.kind == "final_norm":
        norm = model.module(model.family.final_norm)
    else:
        raise LmscopeError(f"a folded norm applies to mlp.in or final_norm, not {site}")
    if norm is None:
        raise LmscopeError(f"site '{site}': this model has no MLP norm to unfold")
    gain, bias = _norm_affine(norm, model.d_model)
    return _Space(heads, gain.to(model.device), bias.to(model.device))


def _width(model, site: Site) -> int:
    shape = provider_of(site.kind).shape(model, site, 1, 1)
    return int(torch.Size(shape[2:]).numel())


# -- the attachment ------------------------------------------------------------------------------


@dataclass
class _Entry:
    """One dictionary at one place: its input and output sites, its sites' keys and layers."""

    dictionary: Dictionary
    site: Site
    out_site: Site
    features: Site
    error: Site
    space_in: _Space
    space_out: _Space


@dataclass
class Attachment:
    """Dictionaries attached to ``model`` under ``name`` (:func:`attach`): their sites are
    :attr:`sites`; :meth:`detach` (or leaving a ``with`` block) removes them."""

    model: Any
    name: str
    entries: list[_Entry] = field(default_factory=list)

    @property
    def sites(self) -> list[str]:
        """The feature and error sites, per dictionary in the order attached."""
        return [str(s) for e in self.entries for s in (e.features, e.error)]

    def dictionary(self, site: str) -> Dictionary:
        """The dictionary whose features or error site is ``site`` (or that reads ``site``)."""
        for e in self.entries:
            if site in (str(e.features), str(e.error), str(e.site)):
                return e.dictionary
        raise LmscopeError(f"no dictionary of '{self.name}' at {site} (sites: {', '.join(self.sites)})")

    def detach(self) -> None:
        """Remove the dictionaries' sites (their kinds no longer parse)."""
        if _ATTACHED.get(self.name) is self:
            del _ATTACHED[self.name]
            unregister_site_kind(_provider_name(self.name))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def _provider_name(name: str) -> str:
    return f"features.{name}"


def _entry(model, d: Dictionary, name: str, site: str | None, out_site: str | None) -> _Entry:
    site = site or d.site
    if site is None:
        raise LmscopeError(f"dictionary '{name}' does not say which site it reads: pass site=")
    s_in = model.site(site)
    s_out = model.site(out_site or d.out_site or site) if d.transcoder else s_in
    if d.transcoder and (out_site or d.out_site) is None:
        raise LmscopeError(f"transcoder '{name}' does not say which site it writes: pass out_site=")
    for s in (s_in, s_out):
        if s.head is not None or s.layer is None or s.kind.endswith((".features", ".error")):
            raise LmscopeError(f"a dictionary attaches to a whole layer site, not '{s}'")
    if s_out.layer < s_in.layer:
        raise LmscopeError(f"transcoder '{name}' writes {s_out} before it reads {s_in}")
    for s, width, what in ((s_in, d.d_in, "reads"), (s_out, d.d_out, "writes")):
        if _width(model, s) != width:
            raise LmscopeError(f"dictionary '{name}' {what} vectors of {width}; {s} has {_width(model, s)}")
    features = Site(f"{s_in.kind}.{name}.features", s_in.layer)
    error = Site(f"{s_out.kind}.{name}.error", s_out.layer)
    folded_out = d.norm_folded and not d.transcoder
    return _Entry(d, s_in, s_out, features, error, _space(model, s_in, d.norm_folded), _space(model, s_out, folded_out))


def attach(
    model,
    dictionaries: Dictionary | Mapping[str, Dictionary] | Sequence[Dictionary],
    name: str = "sae",
    *,
    site: str | None = None,
    out_site: str | None = None,
) -> Attachment:
    """Attach one dictionary (or several, e.g. one per layer from :func:`load_dictionaries`) to
    ``model`` under ``name``: each adds the sites ``<site>.<name>.features`` and
    ``<out site>.<name>.error`` (module docstring). ``site`` / ``out_site`` override where a single
    dictionary reads and writes (default: its own :attr:`Dictionary.site` / ``out_site``). Returns
    the :class:`Attachment`; a name already attached is an error (detach it first)."""
    if not _NAME_RE.match(name):
        raise LmscopeError(f"dictionary name '{name}': expected a lower-case word, e.g. 'sae12'")
    if name in _ATTACHED:
        raise LmscopeError(f"a dictionary named '{name}' is already attached: detach it first")
    if isinstance(dictionaries, Dictionary):
        dictionaries = [dictionaries]
    elif isinstance(dictionaries, Mapping):
        dictionaries = list(dictionaries.values())
    dictionaries = list(dictionaries)
    if not dictionaries or not all(isinstance(d, Dictionary) for d in dictionaries):
        raise LmscopeError("attach takes a Dictionary, or a list or mapping of them")
    if (site or out_site) and len(dictionaries) > 1:
        raise LmscopeError("site= and out_site= name one dictionary's sites; these are several")
    device = model.device
    attachment = Attachment(model, name)
    for d in dictionaries:
        d.to(device)
        attachment.entries.append(_entry(model, d, name, site, out_site))
    keys = [(s.kind, s.layer) for e in attachment.entries for s in (e.features, e.error)]
    if len(set(keys)) != len(keys):
        raise LmscopeError(f"two dictionaries of '{name}' read or write the same site")
    register_site_kind(_provider(attachment))
    _ATTACHED[name] = attachment
    return attachment


def detach(name: str) -> None:
    """Detach the dictionaries attached as ``name``."""
    if name not in _ATTACHED:
        raise LmscopeError(f"no dictionary named '{name}' is attached")
    _ATTACHED[name].detach()


def attachments() -> dict[str, Attachment]:
    """The attached dictionaries, by name."""
    return dict(_ATTACHED)


# -- the provider --------------------------------------------------------------------------------


class _SiteView:
    """A hook session's capture and intervention work, as seen by the base site's provider: the
    base site's tensor goes through ``fn`` instead, every other site passes unchanged."""

    def __init__(self, key: str, layer: int, fn: Callable[[Tensor], Tensor], grad: bool):
        self.key, self.layer, self.fn, self.grad = key, layer, fn, grad

    def process(self, key: str, layer: int | None, x: Tensor, offset: int) -> Tensor:
        return self.fn(x) if (key, layer) == (self.key, self.layer) else x

    def wants(self, key: str, layer: int | None) -> bool:
        return (key, layer) == (self.key, self.layer)

    def edited(self, key: str, layer: int | None) -> bool:
        return False


class _SessionView:
    """A hook session whose :attr:`sites` is a :class:`_SiteView` (everything else is the session's)."""

    point_hook = HookSession.point_hook

    def __init__(self, session: HookSession, sites: _SiteView):
        self._session, self.sites = session, sites

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def _base_hooks(session: HookSession, site: Site, fn: Callable[[Tensor], Tensor]) -> list[Hook]:
    """The hooks of ``site``'s own provider, with its tensor going through ``fn``."""
    view = _SessionView(session, _SiteView(site.key, site.layer, fn, session.sites.grad))
    return provider_of(site.kind).hooks(view, site.layer, {site.key})


def _splice(session: HookSession, e: _Entry, x_in: Tensor, x_out: Tensor) -> Tensor:
    """The output site's new value: ``decode(f') + error'`` (module docstring)."""
    sites, d, offset = session.sites, e.dictionary, session.offset
    xi = e.space_in.to_dict(x_in, d.dtype)
    target = e.space_out.to_dict(x_out, d.dtype)
    f = d.encode(xi)
    err = target - d.decode(f, xi)
    f_node = f.view_as(f) if sites.grad else f  # with grad, the features feed the decoder alone
    f_new = sites.process(e.features.key, e.features.layer, f_node, offset)
    err_new = sites.process(e.error.key, e.error.layer, err, offset)
    if sites.grad:
        return e.space_out.from_dict(d.decode(f_new, xi) + err_new, x_out)
    if f_new is f and err_new is err:
        return x_out
    if err_new is err:
        return x_out + e.space_out.from_dict(d.decode_delta(f_new - f, xi), x_out, delta=True)
    return e.space_out.from_dict(d.decode(f_new, xi) + err_new, x_out)


def _entry_hooks(session: HookSession, e: _Entry) -> list[Hook]:
    if e.site == e.out_site:
        return _base_hooks(session, e.site, lambda x: _splice(session, e, x, x))
    held: dict[str, Tensor] = {}

    def read(x: Tensor) -> Tensor:
        held["x"] = x
        return x

    def write(out: Tensor) -> Tensor:
        if "x" not in held:
            raise LmscopeError(f"{e.out_site} ran before {e.site}: cannot splice the transcoder")
        return _splice(session, e, held.pop("x"), out)

    return _base_hooks(session, e.site, read) + _base_hooks(session, e.out_site, write)


def _provider(attachment: Attachment) -> SiteProvider:
    entries = attachment.entries
    by_key = {(s.kind, s.layer): (e, s) for e in entries for s in (e.features, e.error)}
    kinds: dict[str, SiteKind] = {}
    for e in entries:
        kinds[e.features.kind] = SiteKind(e.features.kind, suffix="head", head_axis=2)
        kinds[e.error.kind] = SiteKind(e.error.kind)

    def has(model, kind: str, layer: int | None = None) -> bool:
        return model is attachment.model and (kind, layer) in by_key

    def check(model, site: Site) -> None:
        if not has(model, site.kind, site.layer):
            raise LmscopeError(f"site '{site}': no dictionary '{attachment.name}' there on this model")
        d = by_key[site.kind, site.layer][0].dictionary
        if site.head is not None and not 0 <= site.head < d.d_sae:
            raise LmscopeError(f"site '{site}': feature {site.head} out of range ({d.d_sae} features)")

    def shape(model, site: Site, batch: int, pos: int) -> tuple[int, ...]:
        e, s = by_key[site.kind, site.layer]
        return (batch, pos, e.dictionary.d_sae if s is e.features else e.dictionary.d_out)

    def names(model) -> list[Site]:
        return [s for e in entries for s in (e.features, e.error)] if model is attachment.model else []

    def hooks(session: HookSession, layer: int | None, keys: set[str]) -> list[Hook]:
        # a transcoder whose features and error are on two layers is hooked once: by the features' layer if wanted
        wanted = {id(by_key[key, layer][0]): by_key[key, layer][0] for key in keys}.values()
        return [
            h
            for e in wanted
            if layer == (e.features.layer if session.sites.wants(e.features.key, e.features.layer) else e.error.layer)
            for h in _entry_hooks(session, e)
        ]

    return SiteProvider(
        _provider_name(attachment.name),
        tuple(kinds.values()),
        has=has,
        shape=shape,
        hooks=hooks,
        check=check,
        names=names,
        order=-20,  # before the dense sites' hooks: a capture of the base site holds the spliced value
    )


# -- interventions on features -------------------------------------------------------------------


def clamp(site: str | Site, value: float, feature: int | None = None, positions=None) -> Intervention:
    """Set features (all of the site, or ``feature``) to ``value`` at ``positions`` (all by
    default): clamping a feature, as in Templeton et al. 2024's feature steering."""
    return apply(site, lambda f: torch.full_like(f, value), positions, head=feature)


def scale(site: str | Site, factor: float, feature: int | None = None, positions=None) -> Intervention:
    """Multiply features (all of the site, or ``feature``) by ``factor`` at ``positions``."""
    return apply(site, lambda f: f * factor, positions, head=feature)

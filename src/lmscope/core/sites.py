"""The site grammar: one name for each internal activation, on every architecture.

::

    embed                          token embedding output            [batch, pos, d_model]
    blocks.{L}.resid_pre           residual stream entering layer L  [batch, pos, d_model]
    blocks.{L}.resid_mid           ... after attention was added     [batch, pos, d_model]
    blocks.{L}.resid_post          ... leaving layer L               [batch, pos, d_model]
    blocks.{L}.attn.q              queries after rotary embedding    [batch, pos, n_heads, d_head]
    blocks.{L}.attn.k / .v         keys (after rotary) / values      [batch, pos, n_kv_heads, d_head]
    blocks.{L}.attn.z              per-head output before o_proj     [batch, pos, n_heads, d_head]
    blocks.{L}.attn.pattern        attention probabilities           [batch, n_heads, q_pos, k_pos]
    blocks.{L}.attn.out            attention output (after o_proj)   [batch, pos, d_model]
    blocks.{L}.mlp.in              MLP input (after its norm)        [batch, pos, d_model]
    blocks.{L}.mlp.post            neuron activations                [batch, pos, d_mlp]
    blocks.{L}.mlp.out             MLP output                        [batch, pos, d_model]
    blocks.{L}.moe.router          router logits (MoE layers)        [batch, pos, n_experts]
    blocks.{L}.moe.weights         routing weights used (0: not chosen) [batch, pos, n_experts]
    blocks.{L}.moe.expert.{E}      expert E's output where chosen (0 elsewhere), before its
                                   routing weight                    [batch, pos, d_model]
    blocks.{L}.monet.g1 / .g2      Monet layers: the two routing distributions the layer's experts
                                   use (softmax over each group's kept half-experts, per routing
                                   head)                             [batch, pos, heads, experts]
    blocks.{L}.monet.product       their product, the weight of product expert (i, j):
                                   g1[h, i] * g2[h, j]  [batch, pos, heads, experts, experts]
    final_norm                     final norm output                 [batch, pos, d_model]
    logits                         the model's logits                [batch, pos, vocab]

Per-head sites (q, k, v, z, pattern) take a head suffix: ``blocks.5.attn.z.3`` is head 3,
with the head axis removed. ``d_head`` and ``n_kv_heads`` are the layer's own where layers differ
(Gemma 4: :meth:`lmscope.core.model.Model.d_head_of`); a layer that reuses an earlier layer's keys
and values (``Family.kv_reuse``) has those as its ``attn.k`` / ``attn.v``. The naming follows TransformerLens's hook names
(``hook_resid_pre``, ``attn.hook_z``, ...), without the ``hook_`` prefix.

Site kinds are open: each is declared by a :class:`SiteKind` (its name and grammar) inside a
:class:`SiteProvider` (how to check one against a model, its shape, and its hooks), registered with
:func:`register_site_kind`. The dense sites above (:mod:`lmscope.core.dense`), the
mixture-of-experts sites (:mod:`lmscope.core.moe`) and the Monet sites (:mod:`lmscope.core.monet`)
are three providers, registered when :mod:`lmscope.core` is imported; another (a dictionary's
features at a site, a fixed projection of the residual stream) is one more provider, registered
from anywhere, with no change to core.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lmscope.core.errors import LmscopeError

# The built-in kinds (the dense, mixture-of-experts and Monet providers declare them).
GLOBAL_KINDS = ("embed", "final_norm", "logits")
LAYER_KINDS = (
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.z",
    "attn.pattern",
    "attn.out",
    "mlp.in",
    "mlp.post",
    "mlp.out",
    "moe.router",
    "moe.weights",
    "moe.expert",
    "monet.g1",
    "monet.g2",
    "monet.product",
)
HEAD_KINDS = ("attn.q", "attn.k", "attn.v", "attn.z", "attn.pattern")
# Sites of mixture-of-experts layers (lmscope.core.moe); ``moe.expert`` takes the expert's index.
MOE_KINDS = ("moe.router", "moe.weights", "moe.expert")
# Sites of Monet layers (lmscope.core.monet).
MONET_KINDS = ("monet.g1", "monet.g2", "monet.product")
# Sites whose values are computed inside the attention interface.
ATTN_INTERFACE_KINDS = ("attn.q", "attn.k", "attn.v", "attn.pattern")

_KIND_RE = re.compile(r"^[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*$")
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*?)(?:\.(\d+))?$")


# -- kinds and providers ------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteKind:
    """One kind of site and its grammar: ``name`` (``"attn.z"``; ``blocks.{L}.<name>`` when
    ``layered``, else the bare name), and what a numeric suffix means: ``suffix=None`` takes none,
    ``"head"`` selects one index of axis ``head_axis`` of the site's tensor (``attn.z.3``), and
    ``"index"`` is required and names a tensor of its own (``moe.expert.3``: the session files it
    under ``<name>.<index>``; ``index_name`` is what the index counts, for messages). ``pos_axis``: the (query) position axis. ``grows``: whether during
    generation a later forward's positions are appended to what was captured (False: the tensor
    already holds every position, like keys and values, or keeps the latest step, like patterns)."""

    name: str
    layered: bool = True
    suffix: str | None = None
    head_axis: int | None = None
    pos_axis: int = 1
    grows: bool = True
    index_name: str = "index"

    def __post_init__(self) -> None:
        if self.suffix not in (None, "head", "index"):
            raise LmscopeError(f"site kind '{self.name}': suffix must be None, 'head' or 'index'")
        if not _KIND_RE.match(self.name) and self.name:
            raise LmscopeError(f"site kind '{self.name}': expected dotted lower-case words, e.g. 'sae.features'")
        if (self.suffix == "head") != (self.head_axis is not None):
            raise LmscopeError(f"site kind '{self.name}': a head suffix needs a head_axis, and only it")


@dataclass(frozen=True)
class SiteProvider:
    """A family of site kinds and everything core needs to serve them; ``model`` below is a
    :class:`lmscope.core.model.Model`, ``session`` a :class:`lmscope.core.hooks.HookSession`.

    - ``name``: the provider's name (``"dense"``, ``"moe"``, ...), the key it is registered under;
    - ``kinds``: the :class:`SiteKind` s it provides (names unique across providers);
    - ``has(model, kind, layer)``: whether the model has the whole site ``kind`` at ``layer``
      (None for global kinds);
    - ``shape(model, site, batch, pos)``: the shape of the site's whole tensor;
    - ``hooks(session, layer, keys)``: the :class:`lmscope.core.hooks.Hook` s that serve the
      session's captures and interventions on ``keys`` (:attr:`Site.key` s of this provider's
      kinds) at ``layer``; their callbacks hand each site's tensor to
      ``session.sites.process(key, layer, x, session.offset)`` and write back what it returns;
    - ``check(model, site)``: a one-line :class:`LmscopeError` where the model lacks ``site``
      (the layer is already known to be in range); default: an error where ``has`` is False;
    - ``names(model)``: the model's whole sites of this provider, in forward order (for
      :meth:`lmscope.core.model.Model.site_shapes`); default: per layer, each layered kind
      without an index suffix that ``has``;
    - ``order``: where its hooks go among other providers' at one layer (lower first; this
      matters where two providers hook one module).
    """

    name: str
    kinds: tuple[SiteKind, ...]
    has: Callable[[Any, str, int | None], bool]
    shape: Callable[[Any, Site, int, int], tuple[int, ...]]
    hooks: Callable[[Any, int | None, set[str]], list]
    check: Callable[[Any, Site], None] | None = None
    names: Callable[[Any], Iterable[Site]] | None = None
    order: int = 100

    def check_site(self, model, site: Site) -> None:
        """Raise a one-line :class:`LmscopeError` if ``model`` lacks ``site``."""
        if self.check is not None:
            self.check(model, site)
        elif not self.has(model, site.kind, site.layer):
            where = f"layer {site.layer} has" if site.layer is not None else "this model has"
            raise LmscopeError(f"site '{site}': {where} no {site.kind}")

    def sites_of(self, model) -> list[Site]:
        """The model's whole sites of this provider, in forward order."""
        if self.names is not None:
            return list(self.names(model))
        return [
            Site(k.name, layer)
            for layer in range(model.n_layers)
            for k in self.kinds
            if k.layered and k.suffix != "index" and self.has(model, k.name, layer)
        ]


@dataclass
class _Registry:
    providers: dict[str, SiteProvider] = field(default_factory=dict)
    kinds: dict[str, tuple[SiteKind, SiteProvider]] = field(default_factory=dict)


_REGISTRY = _Registry()


def register_site_kind(provider: SiteProvider, *, replace: bool = False) -> SiteProvider:
    """Register ``provider``: its kinds parse, validate, capture and intervene like the built-in
    ones. A name or kind already taken by another provider is an error unless ``replace``."""
    old = _REGISTRY.providers.get(provider.name)
    if old is not None and not replace:
        raise LmscopeError(f"site provider '{provider.name}' is already registered")
    for kind in provider.kinds:
        taken = _REGISTRY.kinds.get(kind.name)
        if taken is not None and taken[1].name != provider.name:
            raise LmscopeError(f"site kind '{kind.name}' is already provided by '{taken[1].name}'")
    if old is not None:
        unregister_site_kind(old.name)
    _REGISTRY.providers[provider.name] = provider
    for kind in provider.kinds:
        _REGISTRY.kinds[kind.name] = (kind, provider)
    return provider


def unregister_site_kind(name: str) -> None:
    """Remove the provider registered as ``name`` (its kinds no longer parse)."""
    provider = _REGISTRY.providers.pop(name, None)
    if provider is None:
        raise LmscopeError(f"no site provider '{name}' is registered")
    for kind in provider.kinds:
        _REGISTRY.kinds.pop(kind.name, None)


def site_providers() -> Iterator[SiteProvider]:
    """The registered providers, in registration order."""
    return iter(list(_REGISTRY.providers.values()))


def site_kind(kind: str) -> SiteKind | None:
    """The registered :class:`SiteKind` named ``kind`` (None if none is)."""
    entry = _REGISTRY.kinds.get(kind)
    return None if entry is None else entry[0]


def provider_of(kind: str) -> SiteProvider:
    """The provider of site kind ``kind``; a one-line error if none is registered."""
    entry = _REGISTRY.kinds.get(kind)
    if entry is None:
        raise LmscopeError(f"unknown site kind '{kind}' (known: {', '.join(_REGISTRY.kinds)})")
    return entry[1]


_DEFAULT = SiteKind("")


def _spec(kind: str) -> SiteKind:
    entry = _REGISTRY.kinds.get(kind)
    return _DEFAULT if entry is None else entry[0]


# -- sites --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """A parsed site name: ``kind`` (e.g. ``"attn.z"``), ``layer`` and optional ``head`` (for a
    kind with an index suffix, the index: ``moe.expert``'s expert)."""

    kind: str
    layer: int | None = None
    head: int | None = None

    @property
    def name(self) -> str:
        """The site without its head suffix (the key of a whole-site cache entry)."""
        return self.kind if self.layer is None else f"blocks.{self.layer}.{self.kind}"

    def __str__(self) -> str:
        return self.name if self.head is None else f"{self.name}.{self.head}"

    @property
    def key(self) -> str:
        """What a hook session files the site under: its kind, with the index for a kind with an
        index suffix (each expert's output is a tensor of its own; a head is a slice of one)."""
        return f"{self.kind}.{self.head}" if _spec(self.kind).suffix == "index" else self.kind

    @property
    def head_axis(self) -> int | None:
        """Axis of the head dimension in the site's tensor, if it has one."""
        return _spec(self.kind).head_axis

    @property
    def pos_axis(self) -> int:
        """Axis of the (query) position dimension."""
        return _spec(self.kind).pos_axis


def _unknown(text: str) -> LmscopeError:
    kinds = [spec for spec, _ in _REGISTRY.kinds.values()]
    glob = [k.name for k in kinds if not k.layered]
    layered = [k.name for k in kinds if k.layered]
    return LmscopeError(
        f"unknown site '{text}': expected one of {', '.join(glob)} or blocks.<layer>.<{'|'.join(layered)}>[.<head>]"
    )


def parse_site(text: str, head: int | None = None) -> Site:
    """Parse a site name of any registered kind; ``head`` may be given here instead of as a suffix."""
    text = text.strip()
    spec = site_kind(text)
    if spec is not None and not spec.layered:
        if head is not None:
            raise LmscopeError(f"site '{text}' has no heads")
        return Site(text)
    m = _LAYER_RE.match(text)
    spec = site_kind(m.group(2)) if m else None
    if spec is None or not spec.layered:
        raise _unknown(text)
    layer, kind, suffix = int(m.group(1)), m.group(2), m.group(3)
    if spec.suffix == "index":
        if suffix is None and head is None:
            raise LmscopeError(f"site '{text}': name the {spec.index_name}, e.g. blocks.{layer}.{kind}.0")
        return Site(kind, layer, int(suffix) if suffix is not None else head)
    if suffix is not None:
        if spec.suffix != "head":
            raise LmscopeError(f"site '{text}': {kind} has no heads")
        if head is not None and head != int(suffix):
            raise LmscopeError(f"site '{text}' names head {suffix} but head={head} was given")
        head = int(suffix)
    if head is not None and spec.suffix != "head":
        raise LmscopeError(f"site '{text}': {kind} has no heads")
    return Site(kind, layer, head)


def layer_sites(layer: int) -> list[str]:
    """All dense site names of one layer, in forward order (mixture-of-experts and Monet sites not included)."""
    return [f"blocks.{layer}.{k}" for k in LAYER_KINDS if k not in MOE_KINDS + MONET_KINDS]


def all_sites(n_layers: int) -> list[str]:
    """Every dense site name of a model with ``n_layers`` layers, in forward order."""
    names = ["embed"]
    for layer in range(n_layers):
        names += layer_sites(layer)
    return names + ["final_norm", "logits"]

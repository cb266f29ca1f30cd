"""Hooks: the one primitive that registers PyTorch hooks, and hook sessions built on it.

:func:`hooked` registers callbacks on hook points (:mod:`lmscope.core.hookpoints`) and removes
every one of them on exit, also when the forward raised. It is the only place in lmscope that
calls ``register_forward_hook`` / ``register_forward_pre_hook``; every algorithm hooks through it.

A :class:`HookSession` captures and intervenes on canonical sites (:mod:`lmscope.core.sites`)
through the hooks their kinds' providers give (:class:`lmscope.core.sites.SiteProvider`); for the
dense sites (:mod:`lmscope.core.dense`):

- module inputs/outputs (residual stream, ``attn.z``/``out``, MLP, norms, logits) are the hook
  points of the same names;
- ``attn.q/k/v/pattern`` are read inside the attention interface: while such a site is
  requested, :func:`attention_wrapper` puts an lmscope wrapper of the model's attention
  implementation in place (``lmscope_sdpa`` wraps SDPA), and the eager implementation only while
  a pattern is requested (SDPA never materialises it); the model's setting is restored on exit;
- ``resid_mid`` is ``resid_pre`` plus the layer's attention contribution (exactly the sum
  the layer computes); an intervention on it rewrites the contribution.

Tensor layouts follow :mod:`lmscope.core.sites` (positions on axis 1, heads on axis 2).
"""

from __future__ import annotations

import contextlib
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Self

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lmscope.core.cache import ActivationCache
from lmscope.core.errors import LmscopeError
from lmscope.core.hookpoints import hook_point, point_modules
from lmscope.core.interventions import Intervention
from lmscope.core.sites import ATTN_INTERFACE_KINDS, Site, provider_of, site_kind, site_providers

# -- the primitive ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hook:
    """A callback on hook point ``point`` of ``layer`` (None for global points).

    For ``main``/``logits`` points, ``fn(x)`` gets the tensor (split into heads for ``heads``
    points) and returns None to leave it, or the tensor to use instead (returning ``x`` itself
    writes it back, which keeps a split-heads view in the autograd graph). For ``call`` points,
    ``fn(args, kwargs)`` observes the call. ``modules`` overrides where the point lives (e.g. one
    module of a ``linears`` point)."""

    point: str
    layer: int | None
    fn: Callable
    modules: tuple[nn.Module, ...] | None = None


@contextlib.contextmanager
def hooked(model, hooks: Iterable[Hook]) -> Iterator[None]:
    """Register ``hooks`` on ``model`` (a :class:`lmscope.core.model.Model`) for the duration of
    the block; all are removed on exit, also on error."""
    handles: list = []
    try:
        for hook in hooks:
            point = hook_point(hook.point)
            modules = hook.modules if hook.modules is not None else point_modules(model, hook.point, hook.layer)
            if not modules:
                raise LmscopeError(f"this model has no hook point '{hook.point}'")
            d_head = model.d_head if hook.layer is None else model.d_head_of(hook.layer)
            wrapped = _wrap(point, hook.fn, (model.n_heads, d_head))
            for module in modules:
                if point.when == "pre":
                    handles.append(module.register_forward_pre_hook(wrapped, with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(wrapped, with_kwargs=point.tensor == "io"))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def traced(modules: Mapping[str, nn.Module], record: Callable) -> Iterator[None]:
    """Observe calls of arbitrary ``modules`` (before any family is known, e.g. to derive one):
    ``record(name, args, kwargs, output)`` after each call. Removed on exit, also on error."""
    handles: list = []
    try:
        for name, module in modules.items():

            def post(module, args, kwargs, out, name=name):
                record(name, args, kwargs, out)

            handles.append(module.register_forward_hook(post, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _wrap(point, fn: Callable, heads: tuple[int, int]) -> Callable:
    """The PyTorch hook that reads the point's tensor, calls ``fn`` and writes its result."""
    if point.tensor == "call":

        def observe(module, args, kwargs):
            fn(args, kwargs)

        return observe
    if point.tensor == "io":
        return fn
    if point.when == "pre":

        def pre(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            new = fn(x.unflatten(-1, heads) if point.heads else x)
            if new is None:
                return None
            new = new.flatten(-2) if point.heads else new
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return pre
    if point.tensor == "logits":

        def logits(module, args, out):
            new = fn(out.logits)
            if new is not None:
                out.logits = new
            return out

        return logits

    def post(module, args, out):
        x = out[0] if isinstance(out, tuple) else out
        new = fn(x.unflatten(-1, heads) if point.heads else x)
        if new is None:
            return None
        new = new.flatten(-2) if point.heads else new
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return post


# -- the attention interface -------------------------------------------------------------------


def _base_attention(module: nn.Module, impl: str):
    if impl == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def _wrapped_impl(impl: str) -> str:
    """Register (once) and return the name of the lmscope wrapper of attention ``impl``."""
    name = f"lmscope_{impl}"
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():

        def attention(module, query, key, value, attention_mask, **kwargs):
            base = _base_attention(module, impl)
            replace = module.__dict__.get("_lmscope_attention")
            if replace is None:
                return base(module, query, key, value, attention_mask, **kwargs)
            return replace(module, base, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(name, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name


@contextlib.contextmanager
def attention_wrapper(model, modules: Sequence[nn.Module], replace: Callable, eager: bool) -> Iterator[None]:
    """While the block runs, the attention of ``modules`` calls ``replace(module, base, query, key,
    value, attention_mask, **kwargs)`` (``base``: the model's own attention function; tensors
    [batch, heads, pos, d_head]); ``eager`` switches to eager attention (for patterns). The
    model's attention setting is restored on exit."""
    config = model.hf.config
    saved = config._attn_implementation
    if saved.startswith("lmscope_"):
        raise LmscopeError("hook sessions on one model cannot be nested")
    try:
        config._attn_implementation = _wrapped_impl("eager" if eager else saved)
        for m in modules:
            m._lmscope_attention = replace
        yield
    finally:
        for m in modules:
            m.__dict__.pop("_lmscope_attention", None)
        config._attn_implementation = saved


# -- hook sessions ------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the hook after ``stop_after``'s layer to end the forward early."""


class SessionSites:
    """The capture and intervention work of one hook session, per (key, layer): interventions in
    order, then captures into ``cache``. Site providers' hook callbacks hand it each site's tensor
    (:meth:`process`); ``key`` is a :attr:`lmscope.core.sites.Site.key` (the kind, with the index
    for an indexed kind such as ``moe.expert.3``), ``layer`` None for global sites. ``grad``: the
    session keeps captures in the autograd graph; ``to_cpu``: it moves them to the CPU."""

    def __init__(self, capture: Sequence[Site], interventions: Sequence[Intervention], to_cpu: bool, grad: bool):
        self.cache = ActivationCache()
        self.to_cpu, self.grad = to_cpu, grad
        self._captures: dict[tuple[str, int | None], list[Site]] = defaultdict(list)
        self._edits: dict[tuple[str, int | None], list[Intervention]] = defaultdict(list)
        self._kinds: dict[tuple[str, int | None], str] = {}
        for site in capture:
            self._captures[site.key, site.layer].append(site)
            self._kinds[site.key, site.layer] = site.kind
        for iv in interventions:
            self._edits[iv.site.key, iv.site.layer].append(iv)
            self._kinds[iv.site.key, iv.site.layer] = iv.site.kind

    def keys(self) -> set[tuple[str, int | None]]:
        """Every (key, layer) the session captures or edits."""
        return set(self._captures) | set(self._edits)

    def kind_of(self, key: str, layer: int | None) -> str:
        """The site kind of a (key, layer) the session serves."""
        return self._kinds[key, layer]

    def wants(self, key: str, layer: int | None) -> bool:
        """Whether the session captures or edits (key, layer)."""
        return (key, layer) in self._captures or (key, layer) in self._edits

    def edited(self, key: str, layer: int | None) -> bool:
        """Whether the session has an intervention on (key, layer)."""
        return bool(self._edits.get((key, layer)))

    def process(self, key: str, layer: int | None, x: Tensor, offset: int) -> Tensor:
        """Apply the interventions on (key, layer) to the site's whole tensor ``x`` (positions
        starting at absolute ``offset``), in order, then capture the result; returns it (``x``
        itself where nothing was edited)."""
        for iv in self._edits.get((key, layer), ()):
            x = iv(x, offset)
        for site in self._captures.get((key, layer), ()):
            self._store(site, x, offset)
        return x

    def _store(self, site: Site, x: Tensor, offset: int) -> None:
        value = x if site.head_axis is None or site.head is None else x.select(site.head_axis, site.head)
        if not self.grad:  # a copy: some models later modify a module's output in place (Falcon)
            value = value.detach().clone()
        elif value.requires_grad:
            value.retain_grad()
        elif value.is_leaf:  # e.g. an input replaced by an intervention: make it a leaf of the graph
            value.requires_grad_(True)
        if self.to_cpu:
            value = value.to("cpu")
        key = str(site)
        previous = self.cache.get(key)
        # During generation, later forwards append their new positions; keys and values
        # already hold every position, and the pattern keeps the latest step.
        spec = site_kind(site.kind)
        if previous is not None and offset > 0 and (spec is None or spec.grows):
            value = torch.cat([previous, value], dim=site.pos_axis)
        self.cache[key] = value


class HookSession:
    """Capture ``capture`` sites and apply ``interventions`` during forwards of ``model``.

    Use as a context manager around any forward or ``generate`` call of ``model.hf``;
    the captured tensors are in :attr:`cache` (keys are site names, with a head suffix
    for single-head captures). Options: ``to_cpu`` moves captures to the CPU as they are
    produced; ``grad`` keeps them in the autograd graph (with ``retain_grad``) for attribution
    methods; ``stop_after`` ends the forward after that layer; ``attention``, if given, replaces
    every layer's attention computation: it is called as ``attention(module, base, query, key,
    value, attention_mask, **kwargs)`` with ``base`` the model's own attention function (e.g. to
    attend to quantised keys, :func:`lmscope.quant.apply.kv_attention`).
    """

    def __init__(
        self,
        model,
        capture: Sequence[Site] = (),
        interventions: Sequence[Intervention] = (),
        *,
        to_cpu: bool = False,
        grad: bool = False,
        stop_after: int | None = None,
        attention: Callable | None = None,
    ):
        self.model = model
        self.attention = attention
        self.stop_after = stop_after
        self.sites = SessionSites(capture, interventions, to_cpu, grad)
        self._stack: contextlib.ExitStack | None = None
        self._offset = 0
        self._batch_pos: tuple[int, int] | None = None

    @property
    def cache(self) -> ActivationCache:
        return self.sites.cache

    def __enter__(self) -> Self:
        with contextlib.ExitStack() as stack:
            stack.enter_context(hooked(self.model, self._hooks()))
            stack.enter_context(self._attention_context())
            self._stack = stack.pop_all()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        return exc_type is _StopForward

    # -- which hooks ----------------------------------------------------------------------

    def _hooks(self) -> list[Hook]:
        """The session's hooks: its model-call observer, then per layer (global sites first) each
        provider's hooks for its sites there, providers in their ``order``."""
        by_layer: dict[int | None, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for key, layer in self.sites.keys():  # noqa: SIM118
            by_layer[layer][provider_of(self.sites.kind_of(key, layer)).name].add(key)
        providers = sorted(site_providers(), key=lambda p: p.order)  # stable: registration order breaks ties
        hooks = [Hook("model.call", None, self._on_call)]
        for layer in sorted(by_layer, key=lambda lay: -1 if lay is None else lay):
            for provider in providers:
                keys = by_layer[layer].get(provider.name)
                if keys:
                    hooks += provider.hooks(self, layer, keys)
        if self.stop_after is not None:
            hooks.append(Hook("resid_post", self.stop_after, _stop))
        return hooks

    def _attention_context(self) -> contextlib.AbstractContextManager:
        keys = self.sites.keys()
        layers = {layer for kind, layer in keys if kind in ATTN_INTERFACE_KINDS}
        if self.attention is not None:
            layers = set(self.model.layers_with("attn"))  # a hybrid's linear-attention layers have none
        if not layers:
            return contextlib.nullcontext()
        modules = [self.model.layer_module(layer, self.model.family.attn) for layer in sorted(layers)]
        eager = any(kind == "attn.pattern" for kind, _ in keys)
        return attention_wrapper(self.model, modules, self._attention, eager)

    # -- callbacks ------------------------------------------------------------------------

    def _on_call(self, args, kwargs) -> None:
        past = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed in transformers 5.24
        self._offset = past.get_seq_length() if past is not None else 0
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = ids if ids is not None else kwargs.get("inputs_embeds")
        self._batch_pos = tuple(ids.shape[:2]) if ids is not None else None

    @property
    def offset(self) -> int:
        """The absolute position of the current forward's first token (the KV cache's length
        during generation, else 0)."""
        return self._offset

    @property
    def batch_pos(self) -> tuple[int, int] | None:
        """(batch, pos) of the current forward's input ids, when it was called with some."""
        return self._batch_pos

    def point_hook(self, kind: str, layer: int | None, point: str | None = None) -> Callable:
        """The callback for a :class:`Hook` on hook point ``point`` (default: the point named
        ``kind``) that serves site ``kind`` of ``layer``: the point's tensor ([batch, pos, ...];
        split into heads for a heads point; tokens flattened as OPT's MLP has them are viewed as
        [batch, pos, ...]) goes through :meth:`SessionSites.process` and what comes back is
        written back."""
        heads = hook_point(point or kind).heads

        def fn(x: Tensor) -> Tensor | None:
            flat = x.ndim == 2 and self._batch_pos is not None  # tokens flattened (OPT's MLP)
            site_x = x.view(*self._batch_pos, -1) if flat else x
            new = self.sites.process(kind, layer, site_x, self._offset)
            if flat:  # with grad, the view is written back so its captured .grad fills
                return None if new is site_x and not self.sites.grad else new.reshape(x.shape)
            # with grad, a split-heads view is written back so its captured .grad fills
            return new if new is not x or (heads and self.sites.grad) else None

        return fn

    def _attention(self, module, base, query, key, value, attention_mask, **kwargs):
        """Attention interface wrapper: q/k/v/pattern of one layer, shapes [batch, heads, pos, d_head]."""
        layer, sites, q_offset = module.layer_idx, self.sites, self._offset
        if sites.wants("attn.q", layer):
            query = sites.process("attn.q", layer, query.transpose(1, 2), q_offset).transpose(1, 2)
        if sites.wants("attn.k", layer):
            key = sites.process("attn.k", layer, key.transpose(1, 2), 0).transpose(1, 2)
        if sites.wants("attn.v", layer):
            value = sites.process("attn.v", layer, value.transpose(1, 2), 0).transpose(1, 2)
        if self.attention is not None:
            out, weights = self.attention(module, base, query, key, value, attention_mask, **kwargs)
        else:
            out, weights = base(module, query, key, value, attention_mask, **kwargs)
        if sites.wants("attn.pattern", layer):
            new = sites.process("attn.pattern", layer, weights, q_offset)
            if new is not weights:
                groups = query.shape[1] // value.shape[1]
                values = value.repeat_interleave(groups, dim=1)
                out = torch.matmul(new, values).transpose(1, 2).contiguous()
                weights = new
        return out, weights


def _stop(x: Tensor) -> None:
    raise _StopForward

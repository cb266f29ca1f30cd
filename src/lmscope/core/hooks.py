"""Hooks: the one primitive that registers PyTorch hooks, and hook sessions built on it.

:func:`hooked` registers callbacks on hook points (:mod:`lmscope.core.hookpoints`) and removes
every one of them on exit, also when the forward raised. It is the only place in lmscope that
calls ``register_forward_hook`` / ``register_forward_pre_hook``; every algorithm hooks through it.

A :class:`HookSession` captures and intervenes on canonical sites (:mod:`lmscope.core.sites`):

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
from typing import TYPE_CHECKING, Self

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lmscope.core.cache import ActivationCache
from lmscope.core.errors import LmscopeError
from lmscope.core.hookpoints import hook_point, point_modules
from lmscope.core.interventions import Intervention
from lmscope.core.sites import ATTN_INTERFACE_KINDS, Site

if TYPE_CHECKING:
    from lmscope.core.model import Model

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
def hooked(model: Model, hooks: Iterable[Hook]) -> Iterator[None]:
    """Register ``hooks`` for the duration of the block; all are removed on exit, also on error."""
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
def attention_wrapper(model: Model, modules: Sequence[nn.Module], replace: Callable, eager: bool) -> Iterator[None]:
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


class _Sites:
    """The capture and intervention work of one session, per (kind, layer): interventions in
    order, then captures into ``cache``."""

    def __init__(self, capture: Sequence[Site], interventions: Sequence[Intervention], to_cpu: bool, grad: bool):
        self.cache = ActivationCache()
        self.to_cpu, self.grad = to_cpu, grad
        self.captures: dict[tuple[str, int | None], list[Site]] = defaultdict(list)
        self.edits: dict[tuple[str, int | None], list[Intervention]] = defaultdict(list)
        for site in capture:
            self.captures[site.key, site.layer].append(site)
        for iv in interventions:
            self.edits[iv.site.key, iv.site.layer].append(iv)

    def keys(self) -> set[tuple[str, int | None]]:
        return set(self.captures) | set(self.edits)

    def wants(self, kind: str, layer: int | None) -> bool:
        return (kind, layer) in self.captures or (kind, layer) in self.edits

    def process(self, kind: str, layer: int | None, x: Tensor, offset: int) -> Tensor:
        for iv in self.edits.get((kind, layer), ()):
            x = iv(x, offset)
        for site in self.captures.get((kind, layer), ()):
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
        if previous is not None and offset > 0 and site.kind not in ("attn.k", "attn.v", "attn.pattern"):
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
        model: Model,
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
        self.sites = _Sites(capture, interventions, to_cpu, grad)
        self._stack: contextlib.ExitStack | None = None
        self._offset = 0
        self._batch_pos: tuple[int, int] | None = None
        self._resid_pre: dict[int, Tensor] = {}

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
        self._resid_pre.clear()
        if stack is not None:
            stack.close()
        return exc_type is _StopForward

    # -- which hooks ----------------------------------------------------------------------

    def _hooks(self) -> list[Hook]:
        keys = self.sites.keys()
        hooks = [Hook("model.call", None, self._on_call)]
        for kind in ("embed", "final_norm", "logits"):
            if (kind, None) in keys:
                hooks.append(Hook(kind, None, self._site_hook(kind, None)))
        for layer in sorted({layer for _, layer in keys if layer is not None}):
            hooks += self._layer_hooks(layer, {k for k, lay in keys if lay == layer})
        if self.stop_after is not None:
            hooks.append(Hook("resid_post", self.stop_after, _stop))
        return hooks

    def _layer_hooks(self, layer: int, kinds: set[str]) -> list[Hook]:
        hooks = []
        if "resid_pre" in kinds or "resid_mid" in kinds:
            hooks.append(Hook("resid_pre", layer, self._resid_pre_hook(layer)))
        if "resid_mid" in kinds:
            if self.model.parallel_residual:
                raise LmscopeError("resid_mid does not exist in this model: attention and MLP run in parallel")
            hooks.append(Hook("attn.contrib", layer, self._resid_mid_hook(layer)))
        if any(k.startswith("monet.") for k in kinds):
            from lmscope.core.monet import session_hooks as monet_hooks

            # before the site hooks: Monet's experts module is the MLP, whose output mlp.out must
            # read after a product edit
            hooks += monet_hooks(self.model, layer, self.sites, lambda: self._offset)
        for kind in ("attn.z", "attn.out", "mlp.in", "mlp.post", "mlp.out", "resid_post"):
            if kind in kinds:
                hooks.append(Hook(kind, layer, self._site_hook(kind, layer)))
        if any(k.startswith("moe.") for k in kinds):
            from lmscope.core.moe import session_hooks  # the MoE sites' callbacks

            hooks += session_hooks(self.model, layer, self.sites, lambda: self._offset)
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
        self._resid_pre.clear()
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = ids if ids is not None else kwargs.get("inputs_embeds")
        self._batch_pos = tuple(ids.shape[:2]) if ids is not None else None

    def _site_hook(self, kind: str, layer: int | None) -> Callable:
        heads = hook_point(kind).heads

        def fn(x: Tensor) -> Tensor | None:
            flat = x.ndim == 2 and self._batch_pos is not None  # tokens flattened (OPT's MLP)
            site_x = x.view(*self._batch_pos, -1) if flat else x
            new = self.sites.process(kind, layer, site_x, self._offset)
            if flat:  # with grad, the view is written back so its captured .grad fills
                return None if new is site_x and not self.sites.grad else new.reshape(x.shape)
            # with grad, a split-heads view is written back so its captured .grad fills
            return new if new is not x or (heads and self.sites.grad) else None

        return fn

    def _resid_pre_hook(self, layer: int) -> Callable:
        def fn(x: Tensor) -> Tensor | None:
            new = self.sites.process("resid_pre", layer, x, self._offset)
            self._resid_pre[layer] = new
            return new if new is not x else None

        return fn

    def _resid_mid_hook(self, layer: int) -> Callable:
        scale = self.model.residual_scale

        def fn(contrib: Tensor) -> Tensor | None:
            pre = self._resid_pre[layer]
            mid = pre + contrib * scale if scale != 1 else pre + contrib
            new = self.sites.process("resid_mid", layer, mid, self._offset)
            return None if new is mid else (new - pre) / scale

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

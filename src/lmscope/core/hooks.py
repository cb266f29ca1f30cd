"""Hook sessions: capture and intervene on canonical sites of a Hugging Face model.

A :class:`HookSession` is a context manager that installs the fewest PyTorch hooks
needed for the requested sites, and removes every one of them on exit, also when
the forward raised. Sites map to modules through the family table
(:mod:`lmscope.core.families`):

- module inputs/outputs (residual stream, ``attn.z``/``out``, MLP, norms, logits) use
  forward hooks and pre-hooks;
- ``attn.q/k/v/pattern`` are read inside the attention interface: while such a site is
  requested, the model's ``config._attn_implementation`` is switched to an lmscope
  wrapper of the same implementation (``lmscope_sdpa`` wraps SDPA), and to the eager
  implementation only while a pattern is requested (SDPA never materialises it);
- ``resid_mid`` is ``resid_pre`` plus the layer's attention contribution (exactly the sum
  the layer computes); an intervention on it rewrites the contribution.

Tensor layouts follow :mod:`lmscope.core.sites` (positions on axis 1, heads on axis 2).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Self

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lmscope.core.cache import ActivationCache
from lmscope.core.errors import LmscopeError
from lmscope.core.interventions import Intervention
from lmscope.core.sites import ATTN_INTERFACE_KINDS, Site


class _StopForward(Exception):
    """Raised by the hook after ``stop_after``'s layer to end the forward early."""


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
            session = getattr(module, "_lmscope_session", None)
            if session is None:
                return base(module, query, key, value, attention_mask, **kwargs)
            return session._attention(module, base, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(name, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name


def _first_tensor(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_first_tensor(args: tuple, kwargs: dict, x: Tensor) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def _main_output(out):
    return out[0] if isinstance(out, tuple) else out


def _with_main_output(out, x: Tensor):
    return (x, *out[1:]) if isinstance(out, tuple) else x


class HookSession:
    """Capture ``capture`` sites and apply ``interventions`` during forwards of ``model``.

    Use as a context manager around any forward or ``generate`` call of ``model.hf``;
    the captured tensors are in :attr:`cache` (keys are site names, with a head suffix
    for single-head captures). ``to_cpu`` moves them to the CPU as they are produced,
    ``grad`` keeps them in the autograd graph (with ``retain_grad``) for attribution
    methods, and ``stop_after`` ends the forward after that layer. ``attention``, if given,
    replaces every layer's attention computation: it is called as
    ``attention(module, base, query, key, value, attention_mask, **kwargs)`` with ``base``
    the model's own attention function (e.g. to attend to quantised keys, :mod:`lmscope.quant`).
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
        attention=None,
    ):
        self.model = model
        self.attention = attention
        self.cache = ActivationCache()
        self.to_cpu = to_cpu
        self.grad = grad
        self.stop_after = stop_after
        self._captures: dict[tuple[str, int | None], list[Site]] = defaultdict(list)
        self._edits: dict[tuple[str, int | None], list[Intervention]] = defaultdict(list)
        for site in capture:
            self._captures[site.kind, site.layer].append(site)
        for iv in interventions:
            self._edits[iv.site.kind, iv.site.layer].append(iv)
        self._handles: list = []
        self._attn_modules: list[nn.Module] = []
        self._saved_impl: str | None = None
        self._offset = 0
        self._resid_pre: dict[int, Tensor] = {}

    # -- processing ---------------------------------------------------------------

    def _wants(self, kind: str, layer: int | None) -> bool:
        return (kind, layer) in self._captures or (kind, layer) in self._edits

    def _process(self, kind: str, layer: int | None, x: Tensor, offset: int) -> Tensor:
        for iv in self._edits.get((kind, layer), ()):
            x = iv(x, offset)
        for site in self._captures.get((kind, layer), ()):
            self._store(site, x, offset)
        return x

    def _store(self, site: Site, x: Tensor, offset: int) -> None:
        value = x if site.head is None else x.select(site.head_axis, site.head)
        if not self.grad:
            value = value.detach()
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

    # -- hooks ------------------------------------------------------------------------

    def _pre_hook(self, module: nn.Module, kind: str, layer: int | None, reshape=None) -> None:
        def hook(mod, args, kwargs):
            x = _first_tensor(args, kwargs)
            view = x if reshape is None else x.unflatten(-1, reshape)
            new = self._process(kind, layer, view, self._offset)
            if kind == "resid_pre":
                self._resid_pre[layer] = new
            if new is view and not (self.grad and reshape is not None):
                return None  # with grad, the model must use the captured view so its .grad fills
            return _with_first_tensor(args, kwargs, new if reshape is None else new.flatten(-2))

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _post_hook(self, module: nn.Module, kind: str, layer: int | None) -> None:
        def hook(mod, args, out):
            x = _main_output(out)
            new = self._process(kind, layer, x, self._offset)
            return None if new is x else _with_main_output(out, new)

        self._handles.append(module.register_forward_hook(hook))

    def _mid_hook(self, module: nn.Module, layer: int) -> None:
        def hook(mod, args, out):
            contrib = _main_output(out)
            pre = self._resid_pre[layer]
            mid = pre + contrib
            new = self._process("resid_mid", layer, mid, self._offset)
            return None if new is mid else _with_main_output(out, new - pre)

        self._handles.append(module.register_forward_hook(hook))

    def _logits_hook(self) -> None:
        def hook(mod, args, out):
            new = self._process("logits", None, out.logits, self._offset)
            if new is not out.logits:
                out.logits = new
            return out

        self._handles.append(self.model.hf.register_forward_hook(hook))

    def _offset_hook(self) -> None:
        def hook(mod, args, kwargs):
            past = kwargs.get("past_key_values")
            self._offset = past.get_seq_length() if past is not None else 0
            self._resid_pre.clear()

        self._handles.append(self.model.hf.register_forward_pre_hook(hook, with_kwargs=True))

    def _stop_hook(self, layer_module: nn.Module) -> None:
        def hook(mod, args, out):
            raise _StopForward

        self._handles.append(layer_module.register_forward_hook(hook))

    def _attention(self, module, base, query, key, value, attention_mask, **kwargs):
        """Attention interface wrapper: q/k/v/pattern of one layer, shapes [batch, heads, pos, d_head]."""
        layer = module.layer_idx
        q_offset = self._offset
        if self._wants("attn.q", layer):
            query = self._process("attn.q", layer, query.transpose(1, 2), q_offset).transpose(1, 2)
        if self._wants("attn.k", layer):
            key = self._process("attn.k", layer, key.transpose(1, 2), 0).transpose(1, 2)
        if self._wants("attn.v", layer):
            value = self._process("attn.v", layer, value.transpose(1, 2), 0).transpose(1, 2)
        if self.attention is not None:
            out, weights = self.attention(module, base, query, key, value, attention_mask, **kwargs)
        else:
            out, weights = base(module, query, key, value, attention_mask, **kwargs)
        if self._wants("attn.pattern", layer):
            new = self._process("attn.pattern", layer, weights, q_offset)
            if new is not weights:
                groups = query.shape[1] // value.shape[1]
                values = value.repeat_interleave(groups, dim=1)
                out = torch.matmul(new, values).transpose(1, 2).contiguous()
                weights = new
        return out, weights

    # -- install / remove -------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove()
        return exc_type is _StopForward

    def _install(self) -> None:
        m = self.model
        fam = m.family
        kinds = set(self._captures) | set(self._edits)
        self._offset_hook()
        if ("embed", None) in kinds:
            self._post_hook(m.module(fam.embed), "embed", None)
        if ("final_norm", None) in kinds:
            self._post_hook(m.module(fam.final_norm), "final_norm", None)
        if ("logits", None) in kinds:
            self._logits_hook()
        layers = {lay for _, lay in kinds if lay is not None}
        if self.attention is not None:
            layers = range(m.n_layers)
        for layer in sorted(layers):
            self._install_layer(layer, {k for k, lay in kinds if lay == layer})
        if self.stop_after is not None:
            self._stop_hook(m.layer_module(self.stop_after, ""))

    def _install_layer(self, layer: int, kinds: set[str]) -> None:
        m = self.model
        fam = m.family
        at = lambda path: m.layer_module(layer, path)
        if "resid_pre" in kinds or "resid_mid" in kinds:
            self._pre_hook(at(""), "resid_pre", layer)
        if "resid_mid" in kinds:
            if fam.parallel_residual and getattr(m.hf.config, fam.parallel_residual, False):
                raise LmscopeError("resid_mid does not exist in this model: attention and MLP run in parallel")
            self._mid_hook(at(fam.attn_contrib), layer)
        if kinds & set(ATTN_INTERFACE_KINDS) or self.attention is not None:
            attn = at(fam.attn)
            attn._lmscope_session = self
            self._attn_modules.append(attn)
            self._use_attention_wrapper(eager="attn.pattern" in kinds)
        if "attn.z" in kinds:
            self._pre_hook(at(fam.o_proj), "attn.z", layer, reshape=(m.n_heads, m.d_head))
        if "attn.out" in kinds:
            self._post_hook(at(fam.o_proj), "attn.out", layer)
        if "mlp.in" in kinds:
            self._pre_hook(at(fam.mlp), "mlp.in", layer)
        if "mlp.post" in kinds:
            self._pre_hook(at(fam.mlp_down), "mlp.post", layer)
        if "mlp.out" in kinds:
            self._post_hook(at(fam.mlp), "mlp.out", layer)
        if "resid_post" in kinds:
            self._post_hook(at(""), "resid_post", layer)

    def _use_attention_wrapper(self, eager: bool) -> None:
        config = self.model.hf.config
        if self._saved_impl is None:
            self._saved_impl = config._attn_implementation
        impl = "eager" if eager else self._saved_impl
        if impl.startswith("lmscope_"):
            raise LmscopeError("hook sessions on one model cannot be nested")
        if eager or not config._attn_implementation.startswith("lmscope_eager"):
            config._attn_implementation = _wrapped_impl(impl)

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for attn in self._attn_modules:
            attn.__dict__.pop("_lmscope_session", None)
        self._attn_modules.clear()
        if self._saved_impl is not None:
            self.model.hf.config._attn_implementation = self._saved_impl
            self._saved_impl = None
        self._resid_pre.clear()

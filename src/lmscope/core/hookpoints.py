"""The hook-point table: every place lmscope reads or writes a tensor during a forward, as data.

As :mod:`lmscope.core.families` maps roles to module paths per family, :data:`HOOK_POINTS` maps
each hook point to (module role, before or after the module runs, which tensor). A point is
either a site kind (``resid_pre``, ``attn.z``, ...) or an internal point an algorithm needs
(a layer's whole call, the q/k/v projection outputs, the residual a norm reads, what attention
or the MLP adds to the residual stream, the final norm's input). Adding a hook point is adding
an entry; :func:`lmscope.core.hooks.hooked` is the one primitive that registers hooks on them.

Roles are :class:`~lmscope.core.families.Family` field names (the module at that path; global
for ``embed``, ``final_norm`` and ``unembed``, else relative to decoder layer ``layer``), or:

- ``block``: the decoder layer itself; ``root``: the whole ``*ForCausalLM`` module;
- ``linears``: every linear layer inside the decoder layer (``nn.Linear`` or GPT-2's ``Conv1D``).

A point lists roles in order of preference: the first one the family (and that layer) has is used
(e.g. the residual the attention reads enters its norm, or the attention itself where there is
none; a hybrid layer's linear-attention ``mixer`` where it has no attention).

Tensors: ``main`` is the first input (``args[0]`` or ``hidden_states``) of a ``pre`` point and
the main output (the first element of a tuple) of a ``post`` point; ``logits`` is the output's
``.logits``; ``call`` hands the callback the whole ``(args, kwargs)`` of the call, read-only.
``io`` hands the callback the module and its whole call: ``fn(module, args, kwargs)`` before it
runs (returning None, or new ``(args, kwargs)``), ``fn(module, args, kwargs, output)`` after it
(returning None, or a new output); mixture-of-experts routing is edited this way.
``heads`` splits the last axis into ``[n_heads, d_head]`` (and joins it again on write).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmscope.core.errors import LmscopeError
from lmscope.core.modules import is_linear

GLOBAL_ROLES = ("embed", "pos_embed", "final_norm", "unembed", "root")


@dataclass(frozen=True)
class HookPoint:
    roles: tuple[str, ...]
    when: str  # "pre": before the module runs; "post": after
    tensor: str = "main"  # "main", "logits", "call" or "io"
    heads: bool = False

    @property
    def is_global(self) -> bool:
        return self.roles[0] in GLOBAL_ROLES


def _point(role: str | tuple[str, ...], when: str, **kw) -> HookPoint:
    return HookPoint(role if isinstance(role, tuple) else (role,), when, **kw)


HOOK_POINTS: dict[str, HookPoint] = {
    # -- sites (see lmscope.core.sites) -----------------------------------------------------
    "embed": _point("embed", "post"),
    "resid_pre": _point("block", "pre"),
    "resid_post": _point("block", "post"),
    "attn.z": _point("o_proj", "pre", heads=True),
    "attn.out": _point(("o_proj", "mixer"), "post"),  # a hybrid's other token mixer where no attention
    "mlp.in": _point(("mlp", "mlp_up"), "pre"),
    "mlp.post": _point("mlp_down", "pre"),
    "mlp.out": _point(("mlp", "mlp_down"), "post"),
    "final_norm": _point("final_norm", "post"),
    "logits": _point("root", "post", tensor="logits"),
    # -- internal points ----------------------------------------------------------------------
    "model.call": _point("root", "pre", tensor="call"),  # the model's call (e.g. its KV cache)
    "block.call": _point("block", "pre", tensor="call"),  # a decoder layer's call arguments
    "attn.resid_in": _point(("attn_norm", "attn"), "pre"),  # the residual stream attention reads
    "attn.in": _point("attn", "pre"),  # the attention module's input (after its norm)
    "attn.q_proj": _point("q_proj", "post"),  # projection outputs [..., heads * d_head]
    "attn.k_proj": _point("k_proj", "post"),
    "attn.v_proj": _point("v_proj", "post"),
    "attn.qkv_proj": _point("qkv_proj", "post"),  # fused q|k|v (see Family.qkv_layout)
    "attn.k_norm.in": _point("k_norm", "pre"),  # a key norm's input and output (Qwen 3, OLMo 2)
    "attn.k_norm": _point("k_norm", "post"),
    "attn.contrib": _point(("attn_contrib", "mixer"), "post"),  # what attention (or the mixer) adds
    "mlp.resid_in": _point(("mlp_norm", "mlp", "mlp_up"), "pre"),  # the residual stream the MLP reads
    "mlp.contrib": _point("mlp_contrib", "post"),  # what the MLP adds to the residual stream
    "extra.contrib": _point("extra_contrib", "post"),  # what a third branch adds (Gemma 4's per-layer inputs)
    "final_norm.in": _point("final_norm", "pre"),  # the residual stream the unembedding reads
    "pos_embed": _point("pos_embed", "post"),  # learned position embeddings (GPT-2, OPT)
    "linears.in": _point("linears", "pre"),  # inputs of every linear layer of a block
    # mixture-of-experts blocks (see lmscope.core.moe)
    "moe.router": _point("router", "post", tensor="io"),  # router: logits (and its routing)
    "moe.experts": _point("experts", "pre", tensor="io"),  # experts(hidden, top_k_index, top_k_weights)
    "moe.experts.out": _point("experts", "post", tensor="io"),  # the routed experts' summed output
    # Monet layers (see lmscope.core.monet)
    "monet.experts": _point("monet_experts", "pre", tensor="io"),  # experts(hidden, g1, g2)
    "monet.experts.out": _point("monet_experts", "post", tensor="io"),  # sum_hij g1_hi g2_hj E_ij(hidden)
}


def hook_point(name: str) -> HookPoint:
    """The table entry of a hook point; a clear error if there is none."""
    if name not in HOOK_POINTS:
        raise LmscopeError(f"unknown hook point '{name}' (known: {', '.join(HOOK_POINTS)})")
    return HOOK_POINTS[name]


def point_modules(model, name: str, layer: int | None = None) -> list[nn.Module]:
    """The modules hook point ``name`` of ``layer`` lives on (empty if the family has none).

    ``model`` is a :class:`lmscope.core.model.Model`."""
    point = hook_point(name)
    if point.is_global != (layer is None):
        raise LmscopeError(f"hook point '{name}' {'takes no' if point.is_global else 'needs a'} layer")
    for role in point.roles:
        if role == "root":
            return [model.hf]
        if role == "block":
            return [model.layer_module(layer, "")]
        if role == "linears":
            return [m for m in model.layer_module(layer, "").modules() if is_linear(m)]
        path = getattr(model.family, role)
        if path is None:
            continue
        try:
            return [model.module(path) if point.is_global else model.layer_module(layer, path)]
        except AttributeError:  # the family names a module this model does not have (e.g. k_norm)
            continue
    return []

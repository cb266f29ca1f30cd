"""Hadamard rotation of a model, fused into its weights (QuaRot, Ashkboos et al. 2024; the
rotation of Outlier-Safe Pre-Training's 4-bit evaluation, Park et al. 2025).

An orthogonal ``R`` (``R R^T = I``) changes nothing a linear map computes when it is applied to
its input and undone in its weights, ``(x R)(W R)^T = x W^T``; rotated activations spread an
outlier channel over all channels, so per-token quantisation of them loses less. Two modes:

``"quarot"`` (QuaRot's ``--rotate``, as OSP's repository runs it: ``fuse_layer_norms`` then
``rotate_model``, dmis-lab/Outlier-Safe-Pre-Training ``eval_utils/main.py``):

1. *norms folded*: each RMS norm's per-channel scale ``s`` moves into the linear layers that read
   its output (``W <- W diag(s)``; the final norm's into the unembedding) and the norm's scale
   becomes 1 (``fuse_layer_norms``). An RMS norm without scale commutes with any orthogonal map,
   ``rmsnorm(x R) = rmsnorm(x) R``;
2. *residual stream rotated* by ``R1 = diag(s) H / sqrt(d_model)``, random signs ``s``
   (``random_hadamard_matrix``): the embedding and every reader of the residual stream
   (q/k/v, the MLP's input projections, the unembedding) ``W <- W R1``, every writer (the
   attention output and MLP down projections, with biases) ``W <- R1^T W``;
3. *values and attention outputs* rotated per head by a random Hadamard ``R2`` of order d_head,
   drawn per layer (``rotate_ov_proj``): the value projection's rows of each KV head
   ``W_v,h <- R2^T W_v,h``, the output projection's columns of each head ``W_o,h <- W_o,h R2``;
4. *the down projection's input* rotated by the Hadamard matrix ``H`` of order d_mlp: its weight
   offline ``W_down <- W_down H`` (``apply_exact_had_to_linear``), its input online ``x <- x H``
   (``online_full_had``), a hook that stays on the :class:`Model` until :func:`unrotate`.

``"ffn"`` (OSP's ``--rotate_down_proj``, the "+ FFN Had" rows of its tables): step 4 only.

The queries and keys are rotated per head by the Hadamard matrix of order d_head after the rotary
embedding (QuaRot's ``QKRotationWrapper``) where keys are quantised, since in full precision it
changes nothing (``q H (k H)^T = q k^T``): :func:`lmscope.quant.osp.osp_kv_attention`.

Every step is exact in real arithmetic: a rotated full-precision model computes the same logits
(up to floating-point rounding; the weights are transformed in float64). The residual rotation
needs RMS norms before attention and MLP and nothing between a branch and the residual stream:
LayerNorm (which subtracts the mean), post-branch norms (Gemma 2/3, OLMo 2), mixture-of-experts
and hybrid layers are refused with an :class:`~lmscope.core.errors.LmscopeError`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lmscope.core.errors import LmscopeError
from lmscope.core.hookpoints import point_modules
from lmscope.core.hooks import Hook, hooked
from lmscope.core.model import Model
from lmscope.quant.hadamard import hadamard, random_hadamard

MODES = ("quarot", "ffn")

_ROTATIONS: weakref.WeakKeyDictionary[Model, Rotation] = weakref.WeakKeyDictionary()


@dataclass
class Rotation:
    """The rotation fused into a model: ``residual`` (R1 [d_model, d_model]; None in ``ffn``
    mode), ``heads`` (R2 [d_head, d_head] per layer), ``down`` (H [d_mlp, d_mlp]), all float64;
    the online hooks, and the original parameters when they are to be restored."""

    mode: str
    seed: int
    down: Tensor
    residual: Tensor | None = None
    heads: list[Tensor] = field(default_factory=list)
    hooks: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    edits: _Edits | None = None


def rotation_of(model: Model) -> Rotation | None:
    """The rotation fused into ``model`` (None if it is not rotated)."""
    return _ROTATIONS.get(model)


def rotate(model: Model, *, seed: int = 0, mode: str = "quarot") -> None:
    """Fuse the rotation of ``mode`` (module docstring) into ``model``'s weights in place and
    install the online Hadamard on the down projections' inputs, for good (the originals are not
    kept: :func:`rotated` restores them). ``seed`` draws the random signs of R1 and R2. A clear
    error for a model this mode cannot rotate, or one already rotated."""
    _rotate(model, seed, mode, keep=False)


def unrotate(model: Model) -> None:
    """Undo :func:`rotated`'s rotation: the original parameters (and tied embeddings) back, the
    online hooks removed."""
    rotation = _ROTATIONS.get(model)
    if rotation is None:
        raise LmscopeError("the model is not rotated")
    if rotation.edits is None:
        raise LmscopeError("the model was rotated for good (rotate); only rotated() can be undone")
    del _ROTATIONS[model]
    rotation.hooks.close()
    rotation.edits.restore()


@contextlib.contextmanager
def rotated(model: Model, seed: int = 0, mode: str = "quarot") -> Iterator[Rotation]:
    """Inside the block ``model`` is rotated (:func:`rotate`); on exit, also after an error, its
    original parameters are restored exactly and the hooks removed."""
    rotation = _rotate(model, seed, mode, keep=True)
    try:
        yield rotation
    finally:
        unrotate(model)


def check(model: Model, mode: str = "quarot") -> None:
    """Raise the :class:`LmscopeError` :func:`rotate` would raise for ``model`` (nothing changes)."""
    _plan(model, mode)


# -- what is rotated ----------------------------------------------------------------------


@dataclass
class _Layer:
    """One decoder layer's modules: the norms (path, module) with the linears reading them, the
    residual writers, and the value projection's rows ([n_kv_heads * d_head] of its output)."""

    readers: list[tuple[str, nn.Module, list[nn.Module]]]  # (path, norm, linears reading it)
    writers: list[nn.Module]
    down: nn.Module
    value: nn.Module | None = None
    value_rows: slice | None = None  # None: every row


def _plan(model: Model, mode: str) -> list[_Layer]:
    """The modules to rotate per layer; a clear error for what ``mode`` cannot rotate."""
    if mode not in MODES:
        raise LmscopeError(f"unknown rotation {mode!r} (choose from {', '.join(MODES)})")
    if rotation_of(model) is not None:
        raise LmscopeError("the model is already rotated")
    model.require_uniform_heads("rotation")
    if any(p.device.type == "meta" for p in model.hf.parameters()):
        raise LmscopeError("rotation needs every weight in memory (this model is offloaded to the CPU or disk)")
    downs = model.layers_with("mlp_down")
    if len(downs) != model.n_layers:
        raise LmscopeError(
            f"{_name(model)}: rotation needs a dense MLP with a down projection on every layer "
            "(mixture-of-experts layers have none)"
        )
    layers = [_Layer([], [], model.layer_module(i, model.family.mlp_down)) for i in range(model.n_layers)]
    if mode == "quarot":
        _check_residual(model)
        for i, layer in enumerate(layers):
            _residual_modules(model, i, layer)
    return layers


def _name(model: Model) -> str:
    return str(model.hf.config.model_type)


def _check_residual(model: Model) -> None:
    family, name = model.family, _name(model)
    if family.attn_norm is None or family.mlp_norm is None:
        raise LmscopeError(f"{name} cannot be rotated: no norm before attention or the MLP")
    _norm_scale(model.module(family.final_norm), model.d_model, _where(model, family.final_norm))  # LayerNorm?
    reasons = [
        (family.mixer is not None, "hybrid layers"),
        (family.pos_embed is not None, "learned position embeddings"),
        (family.qkv_clip is not None, "queries, keys and values clamped after their projections"),
        (family.q_gate, "an output gate on the attention"),
        (family.qkv_layout != "concat", "a fused q/k/v projection interleaved per head"),
        (family.q_proj is None and family.qkv_proj is None, "no query/key/value projections (latent attention)"),
    ]
    for bad, reason in reasons:
        if bad:
            raise LmscopeError(f"{name} cannot be rotated: {reason}")
    for role, branch in (("attn_contrib", family.attn), ("mlp_contrib", family.mlp)):
        path = getattr(family, role)
        if path not in (branch, family.o_proj, family.mlp_down) and _has_parameters(model.layer_module(0, path)):
            raise LmscopeError(
                f"{name} cannot be rotated: the norm {path} rescales each channel of a branch's output "
                "before the residual stream (a post-branch norm)"
            )


def _where(model: Model, path: str, layer: int | None = None) -> str:
    return f"{_name(model)} cannot be rotated: {path if layer is None else f'layer {layer} {path}'}"


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _residual_modules(model: Model, i: int, layer: _Layer) -> None:
    family = model.family
    attn_norm = model.layer_module(i, family.attn_norm)
    mlp_norm = model.layer_module(i, family.mlp_norm)
    if family.qkv_proj is not None and model.has_module(i, family.qkv_proj):
        qkv = model.layer_module(i, family.qkv_proj)
        attn_in, value = [qkv], qkv
        start = (model.n_heads + model.n_kv_heads) * model.d_head
        layer.value_rows = slice(start, start + model.n_kv_heads * model.d_head)
    else:
        attn_in = [model.layer_module(i, getattr(family, p)) for p in ("q_proj", "k_proj", "v_proj")]
        value = attn_in[2]
    if family.mlp is not None:
        mlp_in = [m for m in point_modules(model, "linears.in", i) if _inside(model, i, family.mlp, m)]
        mlp_in = [m for m in mlp_in if m is not layer.down]
    else:
        mlp_in = [model.layer_module(i, family.mlp_up)]
    if attn_norm is mlp_norm:  # parallel attention and MLP reading one norm
        layer.readers = [(family.attn_norm, attn_norm, attn_in + mlp_in)]
    else:
        layer.readers = [(family.attn_norm, attn_norm, attn_in), (family.mlp_norm, mlp_norm, mlp_in)]
    layer.writers = [model.layer_module(i, family.o_proj), layer.down]
    layer.value = value
    for module in [*attn_in, *mlp_in, *layer.writers]:
        if not isinstance(module, nn.Linear):
            raise LmscopeError(f"{_name(model)} cannot be rotated: {type(module).__name__} is not a linear layer")


def _inside(model: Model, layer: int, path: str, module: nn.Module) -> bool:
    return any(m is module for m in model.layer_module(layer, path).modules())


# -- norms --------------------------------------------------------------------------------


def _norm_scale(norm: nn.Module, d: int, where: str) -> tuple[Tensor, Tensor | None]:
    """``(s, w1)``: the per-channel scale of an RMS norm, ``norm(x) = x / rms(x) * s`` (float64
    [d]), and the weight with which the scale is 1 (None for a norm without weight), both read
    off probes: the scale is affine in the weight (``w`` for Llama's norms, ``1 + w`` for Gemma's),
    and probes of magnitude 1e4 make the norm's epsilon negligible. A clear error for a norm
    that is not an RMS norm (a LayerNorm subtracts the mean)."""
    weight = getattr(norm, "weight", None)
    if getattr(norm, "bias", None) is not None:
        raise LmscopeError(f"{where} is not an RMS norm (it adds a bias): rotation needs RMS norms")
    param = weight if weight is not None else next(norm.parameters(), None)
    like = (
        {"dtype": torch.float32, "device": "cpu"} if param is None else {"dtype": param.dtype, "device": param.device}
    )
    g = torch.Generator().manual_seed(0)
    probe = (torch.randn(8, d, generator=g, dtype=torch.float64) * 1e4).to(**like)
    flat = torch.full((1, d), 1e4, **like)
    with torch.no_grad():
        scale = norm(flat)[0].double()
        out = norm(probe).double()
    x = probe.double()
    expected = x / x.pow(2).mean(-1, keepdim=True).sqrt() * scale
    if not torch.allclose(out, expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max())):
        raise LmscopeError(f"{where} is not an RMS norm (a LayerNorm subtracts the mean): rotation needs RMS norms")
    if weight is None:
        return scale, None
    original = weight.detach().clone()
    with torch.no_grad():
        weight.zero_()
        at0 = norm(flat)[0].double()
        weight.fill_(1.0)
        slope = norm(flat)[0].double() - at0
        weight.copy_(original)
    if bool((slope.abs() < 0.5).any()):
        raise LmscopeError(f"{where}: its weight does not set its scale")
    return scale, (1.0 - at0) / slope


# -- editing parameters ---------------------------------------------------------------------


class _Edits:
    """Parameter edits in float64, with the originals kept (``keep``) for :meth:`restore`:
    ``(module, name, original parameter, its data)`` at first touch."""

    def __init__(self, keep: bool):
        self.keep = keep
        self.saved: list[tuple[nn.Module, str, nn.Parameter, Tensor]] = []
        self._seen: set[tuple[int, str]] = set()

    def _save(self, module: nn.Module, name: str) -> None:
        key = (id(module), name)
        if self.keep and key not in self._seen:
            self._seen.add(key)
            param = getattr(module, name)
            self.saved.append((module, name, param, param.detach().clone()))

    def get(self, module: nn.Module, name: str = "weight") -> Tensor:
        return getattr(module, name).detach().double()

    def set(self, module: nn.Module, value: Tensor, name: str = "weight") -> None:
        self._save(module, name)
        param = getattr(module, name)
        with torch.no_grad():
            param.copy_(value.to(param.dtype))

    def untie(self, module: nn.Module, name: str = "weight") -> None:
        """Give ``module`` its own copy of a parameter it shares (tied embeddings)."""
        self._save(module, name)
        param = getattr(module, name)
        setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))

    def restore(self) -> None:
        with torch.no_grad():
            for module, name, param, data in reversed(self.saved):
                setattr(module, name, param)
                param.copy_(data)


# -- rotating -------------------------------------------------------------------------------


def _rotate(model: Model, seed: int, mode: str, keep: bool) -> Rotation:
    layers = _plan(model, mode)
    edits = _Edits(keep)
    rotation = Rotation(mode, seed, hadamard(model.d_mlp), edits=edits if keep else None)
    try:
        if mode == "quarot":
            _rotate_residual(model, layers, rotation, edits)
        for layer in layers:  # Conv1D stores [in, out]
            w = edits.get(layer.down)
            edits.set(layer.down, rotation.down.T @ w if model.family.conv1d else w @ rotation.down)
        rotation.hooks.enter_context(hooked(model, _online_hooks(model, rotation.down)))
    except BaseException:
        rotation.hooks.close()
        if keep:
            edits.restore()
        raise
    _ROTATIONS[model] = rotation
    return rotation


def _online_hooks(model: Model, h: Tensor) -> list[Hook]:
    """``x <- x H`` on every down projection's input (in x's dtype, at least float32)."""
    cast: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def fn(x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        key = (dtype, x.device)
        if key not in cast:
            cast[key] = h.to(dtype=dtype, device=x.device)
        return (x.to(dtype) @ cast[key]).to(x.dtype)

    return [Hook("mlp.post", layer, fn) for layer in range(model.n_layers)]


def _rotate_residual(model: Model, layers: list[_Layer], rotation: Rotation, edits: _Edits) -> None:
    """Steps 1-3 of the module docstring."""
    family = model.family
    g = torch.Generator().manual_seed(rotation.seed)
    r1 = rotation.residual = random_hadamard(model.d_model, g)
    embed, unembed = model.module(family.embed), model.module(family.unembed)
    final_norm = model.module(family.final_norm)
    final_scale, final_identity = _norm_scale(final_norm, model.d_model, _where(model, family.final_norm))
    norms = [
        [
            (norm, readers, _norm_scale(norm, model.d_model, _where(model, path, i)))
            for path, norm, readers in layer.readers
        ]
        for i, layer in enumerate(layers)
    ]
    if unembed.weight is embed.weight:
        edits.untie(unembed)
    edits.set(embed, edits.get(embed) @ r1)
    edits.set(unembed, (edits.get(unembed) * final_scale) @ r1)
    _reset_norm(edits, final_norm, final_identity)
    for layer, layer_norms in zip(layers, norms):
        for norm, readers, (scale, identity) in layer_norms:
            for linear in readers:
                edits.set(linear, (edits.get(linear) * scale) @ r1)
            _reset_norm(edits, norm, identity)
        for linear in layer.writers:
            edits.set(linear, r1.T @ edits.get(linear))
            if linear.bias is not None:
                edits.set(linear, edits.get(linear, "bias") @ r1, "bias")
        r2 = random_hadamard(model.d_head, g)
        rotation.heads.append(r2)
        _rotate_heads(model, layer, r2, edits)


def _reset_norm(edits: _Edits, norm: nn.Module, identity: Tensor | None) -> None:
    if identity is not None:
        edits.set(norm, identity.expand_as(norm.weight))


def _rotate_heads(model: Model, layer: _Layer, r2: Tensor, edits: _Edits) -> None:
    """Step 3: each KV head's value rows ``W_v,h <- R2^T W_v,h`` (bias ``b_h <- b_h R2``), each
    head's output-projection columns ``W_o,h <- W_o,h R2``."""
    d_head = model.d_head
    for name in ("weight", "bias"):
        if getattr(layer.value, name, None) is None:
            continue
        full = edits.get(layer.value, name)
        where = layer.value_rows or slice(None)
        rows = full[where].unflatten(0, (-1, d_head))  # [n_kv_heads, d_head, (d_in)]
        rotated = torch.einsum("ji,hj...->hi...", r2, rows)  # R2^T per head
        full[where] = rotated.flatten(0, 1)
        edits.set(layer.value, full, name)
    o_proj = layer.writers[0]
    w = edits.get(o_proj).unflatten(1, (-1, d_head))  # [d_model, n_heads, d_head]
    edits.set(o_proj, (w @ r2).flatten(1))

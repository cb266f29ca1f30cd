"""Deriving a family entry for a model whose ``model_type`` has none, by inspecting it.

The decoder layers are the first ``ModuleList`` with ``num_hidden_layers`` entries. One forward
of two short sequences records, for every module of the layers (:func:`lmscope.core.hooks.traced`),
its input and output; the roles follow from the data flow, not from names alone:

- ``attn``: the module owning the attention projections (the last linear it calls is ``o_proj``;
  q/k/v by name, or one fused projection);
- ``attn_norm`` / ``mlp_norm``: the norms whose outputs are the attention / MLP inputs;
  ``attn_contrib`` / ``mlp_contrib``: a norm whose input is the attention / MLP output (Gemma 2,
  OLMo 2), else the module itself;
- parallel residual: the MLP reads the same tensor as the attention;
- ``mlp``: the layer's other child holding linears (none in OPT: then its first and last linears);
  in a mixture-of-experts block, its ``router`` (a child called with the block's input whose output
  has one entry per expert) and ``experts`` (called with three arguments);
- scales the forward applies outside modules, from the config's attributes where it has the
  usual ones (``residual_multiplier``, ``embedding_multiplier``, ``logit_scale``, Granite's
  ``logits_scaling`` as a divisor).

The entry is only a proposal: :func:`lmscope.verify.certify` decides whether it is right. Print it
with :func:`entry_source` to add it to the table (or a ``--families`` file).
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, asdict, fields

import torch
from torch import Tensor, nn

from lmscope.core.errors import LmscopeError
from lmscope.core.families import Family
from lmscope.core.hooks import traced
from lmscope.core.modules import is_conv1d, is_linear

_NORM_NAMES = ("norm", "ln_", "ln", "layernorm")


def _is_norm(name: str, m: nn.Module) -> bool:
    cls = type(m).__name__.lower()
    leaf = name.rsplit(".", 1)[-1].lower()
    return "norm" in cls or any(leaf.startswith(n) for n in _NORM_NAMES)


def _main(x) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return x[0]
    return None


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None or a.shape != b.shape:
        return False
    return a.data_ptr() == b.data_ptr() or torch.equal(a, b)


def _layers_path(hf: nn.Module) -> str:
    n = hf.config.num_hidden_layers
    for name, m in hf.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return name
    raise LmscopeError(f"cannot derive a family for '{hf.config.model_type}': no list of {n} decoder layers")


def _path_of(hf: nn.Module, target: nn.Module) -> str:
    for name, m in hf.named_modules():
        if m is target:
            return name
    raise LmscopeError("module not found")


def _trace(hf: nn.Module, layers_path: str) -> tuple[list, dict, Tensor]:
    """Calls (name, input, output, n_args) of every module under the decoder layers and the
    root's other modules, in call order, for one forward; and the forward's logits."""
    modules = {n: m for n, m in hf.named_modules() if n}
    calls: list = []

    def record(name, args, kwargs, out):
        x = args[0] if args else kwargs.get("hidden_states")
        calls.append((name, _main(x) if x is not None else None, _main(out), len(args) + len(kwargs)))

    vocab = hf.config.vocab_size
    ids = torch.arange(3, 9).remainder(vocab).view(2, 3)
    with torch.no_grad(), traced(modules, record):
        out = hf(input_ids=ids.to(next(hf.parameters()).device), use_cache=False)
    return calls, modules, out.logits


def derive_family(hf: nn.Module, layer: int = 0) -> Family:
    """A proposed :class:`Family` entry for ``hf`` from its module tree and one traced forward."""
    layers = _layers_path(hf)
    calls, modules, logits = _trace(hf, layers)
    prefix = f"{layers}.{layer}."
    local = [(n.removeprefix(prefix), x, y, k) for n, x, y, k in calls if n.startswith(prefix)]
    names = [n for n, *_ in local]
    block = modules[prefix[:-1]]
    children = dict(block.named_children())

    def owned_linears(path: str) -> list[str]:
        sub = block.get_submodule(path)
        own = [f"{path}.{n}" for n, m in sub.named_modules() if n and is_linear(m)]
        return [n for n in names if n in own]  # in call order

    attn = _attention_owner(block)
    attn_linears = owned_linears(attn)
    if not attn_linears:
        raise LmscopeError(f"cannot derive a family for '{hf.config.model_type}': no attention projections")
    o_proj = attn_linears[-1]
    qkv = _qkv(block, attn, [n for n in attn_linears if n != o_proj])
    top_attn = attn.split(".")[0]
    seen = {call[0]: call for call in local}

    def io(name: str) -> tuple[Tensor | None, Tensor | None]:
        _, x, y, _ = seen[name]
        return x, y

    norms = [n for n, m in children.items() if _is_norm(n, m) and n in seen]
    mlp_child = next(
        (
            n
            for n, m in children.items()
            if n != top_attn and n not in norms and n in seen and not is_linear(m) and _holds_compute(m)
        ),
        None,
    )
    router, experts, dense_down = _moe_parts(hf, layers, mlp_child, calls) if mlp_child else (None, None, None)
    if mlp_child is not None:
        mlp, mlp_up = mlp_child, None
        linears = owned_linears(mlp_child)
        mlp_down = dense_down if experts else (linears[-1] if linears else None)
        mlp_in, mlp_out = io(mlp)
    else:  # the MLP's linears sit in the layer itself (OPT)
        direct = [n for n in names if n in children and is_linear(children[n]) and not n.startswith(top_attn)]
        if len(direct) < 2:
            raise LmscopeError(f"cannot derive a family for '{hf.config.model_type}': no MLP found")
        mlp, mlp_up, mlp_down = None, direct[0], direct[-1]
        mlp_in, mlp_out = io(mlp_up)[0], io(mlp_down)[1]
    attn_in, attn_out = io(top_attn)

    def norm_feeding(x):
        return next((n for n in norms if _same(io(n)[1], x)), None)

    def norm_reading(y):
        return next((n for n in norms if _same(io(n)[0], y)), None)

    attn_norm, mlp_norm = norm_feeding(attn_in), norm_feeding(mlp_in)
    block_in = next(x for n, x, *_ in calls if n == prefix[:-1])
    parallel = _same(mlp_in, attn_in) or (mlp_norm is not None and _same(io(mlp_norm)[0], block_in))
    inner = dict(block.get_submodule(attn).named_modules())
    q_norm = next((f"{attn}.{n}" for n, m in inner.items() if n and _is_norm(n, m) and "q" in n.split(".")[-1]), None)
    k_norm = next((f"{attn}.{n}" for n, m in inner.items() if n and _is_norm(n, m) and "k" in n.split(".")[-1]), None)
    embed = _path_of(hf, hf.get_input_embeddings())
    embed_out = next(y for n, x, y, _ in calls if n == embed)
    embed_norm = next(  # a norm applied to the embeddings before the first layer (BLOOM)
        (
            n
            for n, x, y, _ in calls
            if not n.startswith(layers + ".") and _same(x, embed_out) and _is_norm(n, modules[n])
        ),
        None,
    )
    embed = embed_norm or embed
    unembed = _path_of(hf, hf.get_output_embeddings())
    unembed_in = next(x for n, x, *_ in calls if n == unembed)
    final_norm = next(
        (n for n, x, y, _ in calls if not n.startswith(layers + ".") and n != unembed and _same(y, unembed_in)), None
    )
    if final_norm is None:
        raise LmscopeError(f"cannot derive a family for '{hf.config.model_type}': no final norm before the unembedding")
    pos_embed = _position_embedding(hf, embed, layers)
    return Family(
        layers=layers,
        embed=embed,
        final_norm=final_norm,
        unembed=unembed,
        attn=attn,
        o_proj=o_proj,
        attn_contrib=norm_reading(attn_out) or top_attn,
        mlp=mlp,
        mlp_down=mlp_down,
        mlp_up=mlp_up,
        attn_norm=attn_norm,
        mlp_norm=mlp_norm,
        mlp_contrib=norm_reading(mlp_out) or (mlp or mlp_down),
        parallel_residual=True if parallel else None,
        conv1d=is_conv1d(block.get_submodule(o_proj)),
        q_norm=q_norm,
        k_norm=k_norm,
        pos_embed=pos_embed,
        attn_interface=_uses_interface(block.get_submodule(attn)),
        router=router,
        experts=experts,
        **qkv,
        **_scales(hf.config, next(y for n, x, y, _ in calls if n == unembed), logits),
    )


def _scales(config, unembedded: Tensor, logits: Tensor) -> dict:
    """Formula fields for the usual scaling attributes of ``config`` (those it has); whether
    ``logits_scaling`` divides or multiplies the unembedding's output is measured on it."""
    candidates = {
        "residual_scale": ("residual_multiplier", "residual_multiplier"),
        "embed_scale": ("embedding_multiplier", "embedding_multiplier"),
        "logit_scale": ("logit_scale", "logit_scale"),
    }
    out = {field: formula for field, (attr, formula) in candidates.items() if getattr(config, attr, None) is not None}
    scaling = getattr(config, "logits_scaling", None)
    if "logit_scale" not in out and scaling is not None:  # Granite divides, HyperCLOVA X multiplies
        factor = float((logits * unembedded).sum() / (unembedded * unembedded).sum().clamp(min=1e-30))
        out["logit_scale"] = (
            "logits_scaling" if abs(factor - scaling) < abs(factor - 1 / scaling) else "1 / logits_scaling"
        )
    return out


def _attention_owner(block: nn.Module) -> str:
    """The module that owns the attention projections: the deepest ``*Attention*`` module that
    holds linear layers directly."""
    best = None
    for name, m in block.named_modules():
        if name and "attention" in type(m).__name__.lower() and any(is_linear(c) for c in m.children()):
            best = name
    if best is None:
        raise LmscopeError("cannot derive a family: no attention module")
    return best


def _holds_compute(m: nn.Module) -> bool:
    return any(is_linear(c) or isinstance(c, nn.Parameter) for c in m.modules()) or any(True for _ in m.parameters())


def _qkv(block: nn.Module, attn: str, linears: list[str]) -> dict:
    """q/k/v projection paths (separate, by name) or the fused projection."""
    leaf = {n.rsplit(".", 1)[-1]: n for n in linears}
    for q, k, v in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("wq", "wk", "wv")):
        if {q, k, v} <= set(leaf):
            return {"q_proj": leaf[q], "k_proj": leaf[k], "v_proj": leaf[v]}
    if len(linears) == 1:
        layout = "per_head" if leaf.get("query_key_value") and "neox" in type(block).__name__.lower() else "concat"
        return {"qkv_proj": linears[0], "qkv_layout": layout}
    return {}  # q/k/v are not plain projections (latent attention): no per-head q/k/v weights


def _moe_parts(hf: nn.Module, layers: str, mlp: str, calls: list) -> tuple[str | None, str | None, str | None]:
    """(router, experts, dense down projection) of the layers' ``mlp``: the experts module is the
    child called with three arguments (hidden states, top-k indices, top-k weights), the router
    the ``gate``/``router`` child; layers without them are dense (their down projection is the
    last linear of ``mlp``). All None for a dense model."""
    seen = {name: n_args for name, _, _, n_args in calls}
    router = experts = down = None
    for i, block in enumerate(hf.get_submodule(layers)):
        prefix = f"{layers}.{i}."
        sub = block.get_submodule(mlp)
        children = {f"{mlp}.{n}": m for n, m in sub.named_children() if prefix + f"{mlp}.{n}" in seen}
        moe_experts = next((p for p, m in children.items() if seen[prefix + p] == 3 and not is_linear(m)), None)
        moe_router = next(
            (p for p, m in children.items() if p.rsplit(".", 1)[-1] in ("gate", "router") and not is_linear(m)),
            None,
        ) or next((p for p in children if p.rsplit(".", 1)[-1] == "router"), None)
        if moe_experts and moe_router:
            router, experts = router or moe_router, experts or moe_experts
        elif down is None:
            own = [n for n, m in sub.named_modules() if n and is_linear(m)]
            order = [name.removeprefix(prefix + mlp + ".") for name, *_ in calls if name.startswith(prefix + mlp + ".")]
            linears = [n for n in order if n in own]
            down = f"{mlp}.{linears[-1]}" if linears else None
    return (router, experts, down) if experts else (None, None, None)


def _position_embedding(hf: nn.Module, embed: str, layers: str) -> str | None:
    """A second embedding table outside the layers (learned positions), if any."""
    token = hf.get_input_embeddings()
    for name, m in hf.named_modules():
        if name.startswith(layers) or m is token:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, nn.Embedding) or leaf in ("wpe", "embed_positions", "position_embeddings"):
            return name
    return None


def _uses_interface(attn: nn.Module) -> bool:
    """Whether the attention module's code calls transformers' attention interface."""
    source = sys.modules.get(type(attn).__module__)
    return source is not None and hasattr(source, "ALL_ATTENTION_FUNCTIONS")


def entry_source(model_type: str, family: Family) -> str:
    """The entry as a line of Python for :data:`lmscope.core.families.FAMILIES` (fields that
    differ from their defaults only)."""
    defaults = {f.name: f.default for f in fields(Family) if f.default is not MISSING}
    items = [f"{k}={v!r}" for k, v in asdict(family).items() if k not in defaults or defaults[k] != v]
    return f'"{model_type}": Family({", ".join(items)}),'

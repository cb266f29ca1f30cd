"""Mixture-of-experts layers: routing sites, expert outputs and routing interventions.

transformers 5 MoE blocks share one shape: a router (``Family.router``) returns the router logits
``[tokens, n_experts]`` (alone, or first in a tuple with the top-k weights and indices), and the
experts module (``Family.experts``) is called as ``experts(hidden, top_k_index [tokens, k],
top_k_weights [tokens, k])`` and returns ``sum_k weight_k * expert_{index_k}(hidden)``. On that
contract lmscope reads and writes (sites, :mod:`lmscope.core.sites`):

- ``blocks.{L}.moe.router``: the router logits, [batch, pos, n_experts]. Editing them makes the
  router choose again from the edited logits with its own rule (softmax or sigmoid, top-k, group
  limits, score-correction biases, normalisation): the router is re-run with its logits
  computation returning the edited logits;
- ``blocks.{L}.moe.weights``: the routing weights actually used, dense [batch, pos, n_experts]
  (0 where an expert was not chosen). Editing them changes which experts run and how much they
  count; no renormalisation happens;
- ``blocks.{L}.moe.expert.{E}``: expert E's output where it was chosen (0 elsewhere), before its
  routing weight, [batch, pos, d_model] (computed by calling the experts module with every token
  routed to E alone). Editing it replaces E's contribution ``w_E * out_E`` by ``w_E * new``; in a
  gradient run the captured tensor is in the graph, so expert-level attribution works as for any
  other site.

Llama 4 (``Family.experts_scaled_inputs``) routes differently: its router returns (scores,
logits), the scores (sigmoid of the top-k logits, 0 elsewhere) multiply each expert's *input*, and
every expert runs on every token. There ``moe.weights`` are those scores and ``moe.expert.{E}`` is
E's whole contribution (its weight already acted on its input); editing it replaces that.

Interventions: :func:`resect` (an expert's routing weight set to 0: removed, as Monet resects
experts), :func:`scale` (its weight times a factor), :func:`forbid` (the router may not choose it:
its logit is -inf and the router re-chooses), :func:`force` (the router must choose it: its logit
is raised above every other).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscope.core.errors import LmscopeError
from lmscope.core.hooks import Hook, HookSession, SessionSites
from lmscope.core.interventions import Intervention, _positions
from lmscope.core.sites import MOE_KINDS, Site, SiteKind, SiteProvider, register_site_kind

_INDEX_NAMES = ("top_k_index", "router_indices", "selected_experts", "topk_indices")
_WEIGHT_NAMES = ("top_k_weights", "routing_weights", "router_scores", "topk_weights")


def n_experts(model, layer: int) -> int:
    """The number of routed experts of ``layer``."""
    experts = model.layer_module(layer, model.family.experts)
    for name in ("num_experts", "n_experts", "moe_num_experts"):
        if getattr(experts, name, None):
            return int(getattr(experts, name))
    config = model.hf.config
    for name in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise LmscopeError(f"cannot tell how many experts layer {layer} has")


def expert_counts(model) -> dict[int, int]:
    """The number of routed experts of each mixture-of-experts layer; a clear error for a model
    without any."""
    layers = model.layers_with("experts") if model.family.experts else []
    if not layers:
        raise LmscopeError(f"{model.name} has no mixture-of-experts layers")
    return {layer: n_experts(model, layer) for layer in layers}


def expert_weights(model, layer: int) -> dict[str, Tensor]:
    """The weights of the experts module of ``layer`` as per-expert views ``[n_experts, ...]``
    by parameter name (writing into ``view[e]`` writes expert e's weights): stacked on the first
    axis as transformers 5 stores them, or flattened into it (``Family.experts_flat``: DBRX's
    ``[n_experts * d_ffn, d_model]``). A clear error for a weight not stored per expert."""
    experts = model.layer_module(layer, model.family.experts)
    n, flat = n_experts(model, layer), model.family.experts_flat
    views = {}
    for name, p in experts.named_parameters():
        if p.ndim >= 2 and flat and p.shape[0] % n == 0:
            views[name] = p.view(n, p.shape[0] // n, *p.shape[1:])
        elif p.ndim >= 2 and not flat and p.shape[0] == n:
            views[name] = p
        else:
            where = f"{n} x [{p.shape[0] // n}, ...] flattened" if flat else f"[{n}, ...]"
            raise LmscopeError(
                f"expert weight '{name}' {tuple(p.shape)} of layer {layer} is not stored per expert ({where})"
            )
    return views


def top_k(model, layer: int) -> int:
    """How many experts the router of ``layer`` chooses per token."""
    router = model.layer_module(layer, model.family.router)
    if getattr(router, "top_k", None):
        return int(router.top_k)
    config = model.hf.config
    for name in ("num_experts_per_tok", "moe_top_k", "top_k", "num_experts_per_token"):
        value = getattr(config, name, None) or getattr(getattr(config, "ffn_config", None), name, None)
        if value:
            return int(value)
    raise LmscopeError(f"cannot tell how many experts the router of layer {layer} chooses")


def check_site(model, site: Site) -> None:
    """A clear error for a mixture-of-experts site the model lacks."""
    if site.layer not in model.layers_with("experts"):
        raise LmscopeError(f"site '{site}': layer {site.layer} has no mixture-of-experts block")
    if site.kind == "moe.expert":
        n = n_experts(model, site.layer)
        if not 0 <= site.head < n:
            raise LmscopeError(f"site '{site}': expert {site.head} out of range ({n} experts)")


# -- interventions -----------------------------------------------------------------------------


def _expert_list(experts: int | Sequence[int]) -> list[int]:
    return [experts] if isinstance(experts, int) else [int(e) for e in experts]


def scale(layer: int, experts: int | Sequence[int], factor: float, positions=None) -> Intervention:
    """Multiply the routing weights of ``experts`` in ``layer`` by ``factor`` (at ``positions``)."""
    chosen = _expert_list(experts)

    def fn(w: Tensor, _) -> Tensor:
        w = w.clone()
        w[..., chosen] = w[..., chosen] * factor
        return w

    return Intervention(Site("moe.weights", layer), fn, _positions(positions))


def resect(layer: int, experts: int | Sequence[int], positions=None) -> Intervention:
    """Remove ``experts`` of ``layer``: their routing weights become 0, the other chosen experts'
    weights stay as they were (Monet's expert resection)."""
    return scale(layer, experts, 0.0, positions)


def forbid(layer: int, experts: int | Sequence[int], positions=None) -> Intervention:
    """The router of ``layer`` may not choose ``experts`` (at ``positions``): their logits are
    -inf and the router chooses and weighs again among the others."""
    chosen = _expert_list(experts)

    def fn(logits: Tensor, _) -> Tensor:
        logits = logits.clone()
        logits[..., chosen] = float("-inf")
        return logits

    return Intervention(Site("moe.router", layer), fn, _positions(positions))


def force(layer: int, expert: int, positions=None, margin: float = 10.0) -> Intervention:
    """The router of ``layer`` must choose ``expert`` (at ``positions``): its logit is set to the
    largest logit plus ``margin``; the router then weighs it by its own rule."""

    def fn(logits: Tensor, _) -> Tensor:
        logits = logits.clone()
        logits[..., expert] = logits.max(-1).values + margin
        return logits

    return Intervention(Site("moe.router", layer), fn, _positions(positions))


# -- the session's callbacks -------------------------------------------------------------------


@contextlib.contextmanager
def _linear_returns(logits: Tensor) -> Iterator[list[int]]:
    """While inside, ``F.linear`` returns ``logits`` (the router's one linear map); yields a
    counter of the calls it answered."""
    original = F.linear
    calls = [0]

    def linear(input, weight, bias=None):
        calls[0] += 1
        return logits.to(input.dtype)

    torch.nn.functional.linear = linear
    try:
        yield calls
    finally:
        torch.nn.functional.linear = original


def _reroute(router: nn.Module, args, kwargs, logits: Tensor):
    """The router's output recomputed from edited ``logits`` [tokens, n_experts]."""
    with _linear_returns(logits) as calls:
        out = router.forward(*args, **kwargs)
    if calls[0] != 1:
        raise LmscopeError(
            f"cannot edit the router logits of {type(router).__name__}: it does not compute them with one linear map"
        )
    return out


def _split_call(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden, top_k_index, top_k_weights) of an experts call, positional or by keyword."""
    values = list(args)
    for names in (("hidden_states",), _INDEX_NAMES, _WEIGHT_NAMES):
        if len(values) < 3:
            values += [kwargs[n] for n in names if n in kwargs][:1]
    if len(values) < 3:
        raise LmscopeError("unexpected call of the experts module (expected hidden, top-k indices, top-k weights)")
    return values[0], values[1], values[2]


def _join_call(args: tuple, kwargs: dict, index: Tensor, weights: Tensor) -> tuple[tuple, dict]:
    if len(args) >= 3:
        return (args[0], index, weights, *args[3:]), kwargs
    kwargs = dict(kwargs)
    for names, value in ((_INDEX_NAMES, index), (_WEIGHT_NAMES, weights)):
        key = next((n for n in names if n in kwargs), None)
        if key is None:
            args = (*args, value)
        else:
            kwargs[key] = value
    return args, kwargs


def dense_weights(index: Tensor, weights: Tensor, n: int) -> Tensor:
    """Top-k routing as dense weights [tokens, n] (0 where an expert was not chosen)."""
    out = torch.zeros(index.shape[0], n, dtype=weights.dtype, device=weights.device)
    return out.scatter_add(1, index.long(), weights)


def sparse_weights(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Dense weights [tokens, n] as (index, weights) [tokens, k'] with k' the most experts any
    token uses (at least 1; unused slots carry weight 0)."""
    k = max(int((dense != 0).sum(-1).max()), 1)
    index = dense.abs().topk(k, dim=-1).indices
    return index, dense.gather(1, index)


def _scaled(model) -> bool:
    return bool(model.family.experts_scaled_inputs)


def routing_hooks(model, layer: int, sites: SessionSites, offset: Callable[[], int]) -> list[Hook]:
    """The hooks that serve a hook session's ``moe.router`` and ``moe.weights`` sites of ``layer``
    (``sites`` is the session's :class:`lmscope.core.hooks.SessionSites`)."""
    n, scaled = n_experts(model, layer), _scaled(model)
    shape: dict[str, tuple[int, int]] = {}

    def block_in(x: Tensor) -> None:
        shape["bp"] = tuple(x.shape[:2])

    def router_out(module, args, kwargs, out):
        logits = out[1] if scaled else out[0] if isinstance(out, tuple) else out
        b, p = shape["bp"]
        new = sites.process("moe.router", layer, logits.reshape(b, p, -1), offset())
        rerouted = sites.edited("moe.router", layer)
        if rerouted:
            out = _reroute(module, args, kwargs, new.reshape(logits.shape))
        if not scaled:
            return out if rerouted else None
        # Llama 4: the routing weights are the router's scores, which scale the experts' inputs
        scores = sites.process("moe.weights", layer, out[0].view(b, p, n), offset())
        if rerouted or sites.edited("moe.weights", layer):
            return scores.reshape(out[0].shape), out[1]
        return None

    def experts_in(module, args, kwargs):
        _, index, weights = _split_call(args, kwargs)
        b, p = shape["bp"]
        new = sites.process("moe.weights", layer, dense_weights(index, weights, n).view(b, p, n), offset())
        if not sites.edited("moe.weights", layer):
            return None
        return _join_call(args, kwargs, *sparse_weights(new.reshape(-1, n)))

    hooks = [Hook("mlp.in", layer, block_in), Hook("moe.router", layer, router_out)]
    if not scaled:
        hooks.append(Hook("moe.experts", layer, experts_in))
    return hooks


def expert_hooks(model, layer: int, experts: Sequence[int], edit: Callable[[int, Tensor], Tensor]) -> list[Hook]:
    """Hooks that hand ``edit(e, out_e)`` each of ``experts``' output in ``layer``, ``out_e``
    [batch, pos, d_model] (expert e's output where it was chosen, 0 elsewhere, before its routing
    weight; Llama 4's experts take their weight on the input, so there it is e's whole
    contribution), and replace e's contribution ``w_e * out_e`` by ``w_e * edit(e, out_e)``.

    ``out_e`` is detached: in a gradient run what ``edit`` returns is the only path from e to the
    output, so its gradient is dM/d(out_e). Routing edits made by hooks registered earlier (the
    session's ``moe.weights``) are seen: the weights are read from the experts' call."""
    n, scaled = n_experts(model, layer), _scaled(model)
    state: dict = {}

    def block_in(x: Tensor) -> None:
        state["bp"] = tuple(x.shape[:2])

    def experts_in(module, args, kwargs):
        hidden, index, weights = _split_call(args, kwargs)
        state["dense"], state["hidden"] = dense_weights(index, weights, n), hidden

    def alone(module, out: Tensor, e: int) -> tuple[Tensor, Tensor]:
        """Expert e's output [tokens, d_model] and its routing weight [tokens, 1]."""
        if scaled:
            per_expert = out.view(n, -1, out.shape[-1])
            return per_expert[e].detach(), per_expert.new_ones(1, 1)
        dense, hidden = state["dense"], state["hidden"]
        tokens = dense.shape[0]
        index = torch.full((tokens, 1), e, dtype=torch.long, device=dense.device)
        ones = torch.ones(tokens, 1, dtype=dense.dtype, device=dense.device)
        chosen = (dense[:, e] != 0).to(out.dtype)[:, None]
        own = module.forward(hidden, index, ones).reshape(tokens, -1) * chosen
        return own.detach(), dense[:, e, None].to(out.dtype)

    def experts_out(module, args, kwargs, out):
        b, p = state["bp"]
        total = out
        for e in experts:
            own, weight = alone(module, out, e)
            new = edit(e, own.view(b, p, -1)).reshape(own.shape)
            delta = weight * (new - own)
            if scaled:  # expert-major rows: e's block of the output
                delta = torch.cat([torch.zeros_like(own) if i != e else delta for i in range(n)])
            total = total + delta.reshape(out.shape)
        return total

    hooks = [Hook("mlp.in", layer, block_in)]
    if not scaled:
        hooks.append(Hook("moe.experts", layer, experts_in))
    return [*hooks, Hook("moe.experts.out", layer, experts_out)]


def session_hooks(session: HookSession, layer: int | None, keys: set[str]) -> list[Hook]:
    """The hooks that serve a hook session's ``moe.*`` sites ``keys`` of ``layer`` (the provider's
    ``hooks``): routing first, so the experts' outputs are read under the session's routing edits."""
    model, sites = session.model, session.sites
    wanted = sorted(int(k.rsplit(".", 1)[1]) for k in keys if k.startswith("moe.expert."))
    hooks = routing_hooks(model, layer, sites, lambda: session.offset)
    if wanted:
        hooks += expert_hooks(
            model, layer, wanted, lambda e, x: sites.process(f"moe.expert.{e}", layer, x, session.offset)
        )
    return hooks


# -- the provider ------------------------------------------------------------------------------


def has(model, kind: str, layer: int | None = None) -> bool:
    """Whether ``model`` has the whole site ``kind`` (router logits or routing weights) at
    ``layer``: a layer with an experts module (``moe.expert`` needs its expert's index)."""
    return kind != "moe.expert" and layer is not None and model.has_module(layer, model.family.experts)


def shape(model, site: Site, batch: int, pos: int) -> tuple[int, ...]:
    """[batch, pos, n_experts] for the router and weights, [batch, pos, d_model] for an expert."""
    if site.kind == "moe.expert":
        return (batch, pos, model.d_model)
    return (batch, pos, n_experts(model, site.layer))


MOE = register_site_kind(
    SiteProvider(
        "moe",
        tuple(
            SiteKind(k, suffix="index", index_name="expert") if k == "moe.expert" else SiteKind(k) for k in MOE_KINDS
        ),
        has=has,
        shape=shape,
        hooks=session_hooks,
        check=check_site,
        order=10,  # after the dense sites' hooks (they share the MLP's input)
    )
)

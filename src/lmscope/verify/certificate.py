"""``lmscope verify``: a correctness certificate for a model, each check against an independent
reference (the plain Hugging Face forward, a hand computation from the weights, a weight edit).

Checks (names as in results.json):

- ``logits_hooked``: logits with every site hooked are bitwise the plain forward's;
- ``hidden_states``: ``resid_pre`` / ``resid_post`` / ``final_norm`` equal HF's ``hidden_states``;
- ``residual_sum``: the residual stream is the sum of embeddings, attention and MLP outputs (and
  a third branch's, ``Family.extra_contrib``), times each layer's scale (``Family.layer_scale``);
- ``logit_lens``: the logit lens on the last layer's residual stream reproduces the logits;
- ``pattern``: attention probabilities sum to 1, writing them back unchanged reproduces the
  eager forward and editing them changes the output;
- ``z_to_out``: per-head ``z`` through the output projection's weights reproduces ``attn.out``;
- ``qkv``: q/k/v equal the projections of the attention input computed from the weights (q and k
  at position 0, where rotary embedding is the identity; clamped where the family clamps them,
  ``Family.qkv_clip``; through the q/k/v norm where there is one); a layer that reuses an earlier
  layer's keys and values (``Family.kv_reuse``) has exactly that layer's;
- ``head_ablation``: zeroing a head's ``z`` equals zeroing its output-projection columns;
- ``batching``: a right- and a left-padded batch give each sequence's logits alone;
- ``kv_cache``: greedy generation with the KV cache equals argmax of full forwards;
- ``sdpa_eager``: SDPA and eager attention agree within tolerance;
- ``self_patch``: patching the clean run's activations into the clean run changes nothing;
- mixture-of-experts models: ``moe_routing`` (routing weights: k experts per token, as the
  router chose) and ``moe_resection`` (resecting an expert equals zeroing its weights, through
  :func:`lmscope.core.moe.expert_weights`' per-expert views).

On a hybrid model (``Family.mixer``: Qwen 3.5's linear-attention layers) the checks of heads
(``pattern``, ``z_to_out``, ``qkv``, ``head_ablation``) run on its attention layers; the others
cover every layer. A check is ``pass``, ``fail`` (with the measured difference) or ``n/a`` (what
the family lacks, e.g. attention computed inline). :func:`certify` runs them; :func:`require` refuses a model whose
certificate failed, naming the failed checks.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from lmscope.core import moe, zero
from lmscope.core.anatomy import head_params, kv_head_of
from lmscope.core.errors import LmscopeError
from lmscope.core.families import config_value
from lmscope.core.hooks import Hook, hooked
from lmscope.core.interventions import apply, patch
from lmscope.core.model import Model
from lmscope.core.progress import progress_bar
from lmscope.core.weights import parameter
from lmscope.reports.results import Result, Table

TOL = 1e-4  # relative to the compared tensor's scale (float32 reorderings stay far below it)


@dataclass
class Check:
    """One check: ``status`` is ``"pass"``, ``"fail"`` or ``"n/a"``; ``error`` the measured
    relative difference where one was measured."""

    name: str
    status: str
    detail: str = ""
    error: float | None = None


@dataclass
class Certificate(Result):
    """All checks of one model; ``passed`` when none failed."""

    model: str
    family: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.status == "fail"]

    def counts(self) -> dict[str, int]:
        out = {"pass": 0, "fail": 0, "n/a": 0}
        for c in self.checks:
            out[c.status] += 1
        return out

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "family": self.family,
            "passed": self.passed,
            "counts": self.counts(),
            "checks": [asdict(c) for c in self.checks],
        }

    def text(self) -> str:
        counts = self.counts()
        verdict = (
            "passed" if self.passed else f"FAILED ({', '.join(self.failed)}): results on this model are not trusted"
        )
        return f"{self.family}: {verdict}; {counts['pass']} pass, {counts['fail']} fail, {counts['n/a']} n/a."

    def tables(self) -> list[Table]:
        rows = [{"check": c.name, "result": c.status, "detail": c.detail} for c in self.checks]
        return [Table("correctness checks, each against an independent reference", rows)]


class _NotApplicable(Exception):
    pass


def _rel(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max(max |b|, 1e-6)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))


def _close(a: Tensor, b: Tensor, what: str, tol: float = TOL) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
    err = _rel(a, b)
    if not err <= tol:  # also catches NaN
        raise AssertionError(f"{what}: relative difference {err:.2e} > {tol:.0e}")
    return err


def _ids(m: Model, batch: int = 2, pos: int = 8, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    low = 3 if m.d_vocab > 8 else 0
    return torch.randint(low, m.d_vocab, (batch, pos), generator=g).to(m.device)


def _plain(m: Model, ids: Tensor, **kw):
    with torch.no_grad():
        return m.hf(input_ids=ids, use_cache=False, **kw)


@contextlib.contextmanager
def _attention(m: Model, impl: str) -> Iterator[None]:
    config = m.hf.config
    saved = config._attn_implementation
    config._attn_implementation = impl
    try:
        yield
    finally:
        config._attn_implementation = saved


def _attention_layers(m: Model) -> list[int]:
    """The layers with attention heads (a hybrid's linear-attention layers have none, ``Family.mixer``)."""
    layers = m.layers_with("attn") if m.family.mixer else list(range(m.n_layers))
    if not layers:
        raise _NotApplicable("no attention layers")
    return layers


def _sites(m: Model, kinds: tuple[str, ...]) -> list[str]:
    return [name for name, _ in m.site_shapes() if name.split(".", 2)[-1] in kinds or name in kinds]


# -- the checks ----------------------------------------------------------------------------------


def _logits_hooked(m: Model, ids: Tensor) -> str:
    plain = _plain(m, ids).logits
    sites = [name for name, _ in m.site_shapes() if "pattern" not in name]
    hooked_logits = m.run(ids, capture=sites).logits
    if not torch.equal(plain, hooked_logits):
        raise AssertionError(f"logits differ by {_rel(hooked_logits, plain):.2e} with {len(sites)} sites hooked")
    return f"{len(sites)} sites hooked, logits bitwise equal"


def _hidden_states(m: Model, ids: Tensor) -> str:
    hs = _plain(m, ids, output_hidden_states=True).hidden_states
    L = m.n_layers
    sites = ["blocks.0.resid_pre", "final_norm", *[f"blocks.{i}.resid_post" for i in range(L - 1)]]
    cache = m.run(ids, capture=sites).cache
    _close(cache["blocks.0.resid_pre"], hs[0], "resid_pre 0 vs hidden_states[0]", 0)
    for i in range(L - 1):
        _close(cache[f"blocks.{i}.resid_post"], hs[i + 1], f"resid_post {i} vs hidden_states[{i + 1}]", 0)
    _close(cache["final_norm"], hs[L], f"final_norm vs hidden_states[{L}]", 0)
    return f"{L + 1} residual streams equal"


def _residual_sum(m: Model, ids: Tensor) -> str:
    L, s = m.n_layers, m.residual_scale
    got: dict[str, Tensor] = {}

    def keep(key: str) -> Callable:
        def fn(x: Tensor) -> None:
            got[key] = x.clone()  # some models modify a module's output in place (Falcon)

        return fn

    hooks = [Hook("embed", None, keep("embed")), Hook("final_norm.in", None, keep("final"))]
    if m.family.pos_embed:
        hooks.append(Hook("pos_embed", None, keep("pos")))
    extra = [i for i in range(L) if m.has_module(i, m.family.extra_contrib)]
    for i in range(L):
        hooks += [
            Hook("resid_pre", i, keep(f"pre{i}")),
            Hook("attn.contrib", i, keep(f"attn{i}")),
            Hook("mlp.contrib", i, keep(f"mlp{i}")),
        ]
    hooks += [Hook("extra.contrib", i, keep(f"extra{i}")) for i in extra]
    scales = [m.layer_scale(i) for i in range(L)]
    with torch.no_grad(), hooked(m, hooks):
        m.hf(input_ids=ids, use_cache=False)
    embed = got["embed"] * m.embed_scale
    if "pos" in got:
        embed = embed + got["pos"]
    _close(got["pre0"], embed, "resid_pre 0 vs embedding (+ positions)")
    total = got["pre0"]
    for i in range(L):
        branches = [got[f"{b}{i}"].view_as(total) for b in ("attn", "mlp", "extra") if f"{b}{i}" in got]
        total = total + s * sum(branches)
        if scales[i] is not None:
            total = total * scales[i]
        nxt = got[f"pre{i + 1}"] if i + 1 < L else got["final"]
        _close(total, nxt, f"layer {i}: resid_pre + attention + MLP (+ extra) vs next residual stream")
    parts = "attention, MLP and extra-branch" if extra else "attention and MLP"
    scaled = ", each layer's scale applied," if any(x is not None for x in scales) else ""
    return f"embedding + {L} layers' {parts} outputs{scaled} reproduce every residual stream"


def _logit_lens(m: Model, ids: Tensor) -> str:
    run = m.run(ids, capture=[f"blocks.{m.n_layers - 1}.resid_post"])
    with torch.no_grad():
        lens = m.unembed(run.cache[f"blocks.{m.n_layers - 1}.resid_post"])
    err = _close(lens, run.logits, "logit lens at the last layer vs logits")
    return f"relative difference {err:.1e}"


def _pattern(m: Model, ids: Tensor) -> str:
    if not m.family.attn_interface:
        raise _NotApplicable("attention computed inline (no attention interface)")
    layers = _attention_layers(m)
    run = m.run(ids, capture=[f"blocks.{i}.attn.pattern" for i in layers])
    for i in layers:
        p = run.cache[f"blocks.{i}.attn.pattern"]
        if hasattr(m.layer_module(i, m.family.attn), "sinks"):  # attention sinks take the rest (gpt-oss)
            if not bool((p.sum(-1) <= 1 + 1e-5).all()):
                raise AssertionError(f"layer {i}: pattern rows sum above 1")
            continue
        _close(p.sum(-1), torch.ones_like(p.sum(-1)), f"layer {i}: pattern rows sum", 1e-5)
    with _attention(m, "eager"):
        eager = _plain(m, ids).logits
    same = m.run(ids, interventions=[apply(f"blocks.{layers[0]}.attn.pattern", lambda p: p.clone() * 1.0)]).logits
    _close(same, eager, "pattern written back unchanged vs eager forward")

    def uniform(p: Tensor) -> Tensor:
        causal = (p > 0).to(p.dtype)
        return causal / causal.sum(-1, keepdim=True)

    edited = m.run(ids, interventions=[apply(f"blocks.{i}.attn.pattern", uniform) for i in layers]).logits
    if _rel(edited, eager) < 1e-4:
        raise AssertionError("uniform attention patterns did not change the logits")
    return f"rows sum to 1; edits change the logits by {_rel(edited, eager):.1e}"


def _z_to_out(m: Model, ids: Tensor) -> str:
    layers = _attention_layers(m)
    cache = m.run(ids, capture=[f"blocks.{i}.attn.{k}" for i in layers for k in ("z", "out")]).cache
    for i in layers:
        o = m.layer_module(i, m.family.o_proj)
        w, b = parameter(o), parameter(o, "bias")
        w = w.T if m.family.conv1d else w
        out = cache[f"blocks.{i}.attn.z"].flatten(-2) @ w.T + (0 if b is None else b)
        _close(out, cache[f"blocks.{i}.attn.out"], f"layer {i}: z W_O vs attn.out")
    return f"{len(layers)} layers"


def _norm(module, x: Tensor, heads: int) -> Tensor:
    """Apply a q/k norm over all heads (its weight spans them, OLMo 2) or per head."""
    weight = getattr(module, "weight", None)
    if weight is not None and weight.numel() == x.shape[-2] * x.shape[-1] and heads > 1:
        return module(x.flatten(-2)).unflatten(-1, x.shape[-2:])
    return module(x)


def _qkv(m: Model, ids: Tensor) -> str:
    fam = m.family
    if not fam.attn_interface:
        raise _NotApplicable("attention computed inline (no attention interface)")
    layers = _attention_layers(m)
    if not (fam.qkv_proj or fam.q_proj):
        raise _NotApplicable("q/k/v are not linear projections of the input (latent attention)")
    clip = config_value(m.hf.config, fam.qkv_clip)  # q/k/v clamped after the projection (OLMo, DBRX)
    inputs: dict[int, Tensor] = {}
    scales: set[float] = set()
    reused = [i for i in layers if m.kv_source(i) != i]

    def keep(i):
        def fn(x):
            inputs[i] = x

        return fn

    with hooked(m, [Hook("attn.in", i, keep(i)) for i in layers]):
        cache = m.run(ids, capture=[f"blocks.{i}.attn.{t}" for i in layers for t in "qkv"]).cache
    for i in layers:
        for t in "qkv":
            got = cache[f"blocks.{i}.attn.{t}"]
            if t != "q" and i in reused:  # the source layer's own, checked from its weights
                source = m.kv_source(i)
                _close(got, cache[f"blocks.{source}.attn.{t}"], f"layer {i}: {t} vs layer {source}'s, reused", 0)
                continue
            hand = _by_hand(m, i, t, inputs[i], clip)
            if t == "v":
                _close(got, hand, f"layer {i}: v vs x W_v")
                continue
            got, hand = got[:, 0], hand[:, 0]  # rotary embedding is the identity at position 0
            if t != "v":  # some fold the softmax scale (OPT) or a rotary attention factor (YaRN) into q/k
                factor = float((got * hand).sum() / (hand * hand).sum().clamp(min=1e-30))
                scales.add(round(factor, 6))
                hand = hand * factor
            _close(got, hand, f"layer {i}: {t} at position 0 vs x W_{t}")
    folded = "" if scales <= {1.0} else f" (q/k scaled by {', '.join(map(str, sorted(scales)))})"
    shared = f"; layers {reused} attend with their source layers' k/v" if reused else ""
    return f"{len(layers)} layers, q/k at position 0, v everywhere{folded}{shared}"


def _by_hand(m: Model, layer: int, t: str, x: Tensor, clip: float | None) -> Tensor:
    """Input ``t`` (q, k or v) of ``layer`` from its attention input ``x`` [batch, pos, d_model]
    and the weights, before rotary embedding: [batch, pos, heads, d_head] (one per KV head for k
    and v), clamped where the family clamps, through the layer's q/k/v norm where it has one."""
    fam = m.family
    w, b = head_params(m, layer, t)  # per query head
    hand = (torch.einsum("bpd,hed->bphe", x, w) + (0 if b is None else b)).detach()
    if clip is not None:
        hand = hand.clamp(-clip, clip)
    if t != "q":  # one per KV head
        kv = kv_head_of(m, layer)
        hand = hand[:, :, [int((kv == k).nonzero()[0]) for k in range(m.n_kv_heads_of(layer))]]
    norm = {"q": fam.q_norm, "k": fam.k_norm, "v": fam.v_norm}[t]
    if norm and m.has_module(layer, norm):
        with torch.no_grad():
            hand = _norm(m.layer_module(layer, norm), hand, hand.shape[-2])
    return hand


def _head_ablation(m: Model, ids: Tensor) -> str:
    layer, head = _attention_layers(m)[-1], m.n_heads - 1
    ablated = m.run(ids, interventions=[zero(f"blocks.{layer}.attn.z.{head}")]).logits
    o = m.layer_module(layer, m.family.o_proj)
    weight = parameter(o)
    saved = weight.detach().clone()
    d_head = m.d_head_of(layer)
    cols = slice(head * d_head, (head + 1) * d_head)
    try:
        with torch.no_grad():
            if m.family.conv1d:
                weight[cols, :] = 0
            else:
                weight[:, cols] = 0
            reference = _plain(m, ids).logits
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    err = _close(ablated, reference, f"zeroing head {layer}.{head} vs zeroing its W_O columns")
    if _rel(ablated, _plain(m, ids).logits) < 1e-6:
        raise AssertionError("zeroing the head did not change the logits")
    return f"head {layer}.{head}: relative difference {err:.1e}"


def _batching(m: Model, ids: Tensor) -> str:
    pad = m.pad_id if m.pad_id is not None else 0
    a, b = ids[0], ids[1, :-3]
    alone = [_plain(m, x[None]).logits[0] for x in (a, b)]
    n = a.shape[0]
    for side in ("right", "left"):
        batch = torch.full((2, n), pad, dtype=ids.dtype, device=ids.device)
        mask = torch.zeros_like(batch)
        for row, x in enumerate((a, b)):
            span = slice(0, len(x)) if side == "right" else slice(n - len(x), n)
            batch[row, span], mask[row, span] = x, 1
        logits = m.run({"input_ids": batch, "attention_mask": mask}).logits
        for row, x in enumerate((a, b)):
            span = slice(0, len(x)) if side == "right" else slice(n - len(x), n)
            _close(logits[row, span], alone[row], f"{side}-padded sequence {row} vs alone", 1e-3)
    return "right and left padding"


def _kv_cache(m: Model, ids: Tensor) -> str:
    prompt, new = ids[:1], 4
    out = m.hf.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=m.pad_id if m.pad_id is not None else 0,
    )
    seq = prompt
    for _ in range(out.shape[1] - prompt.shape[1]):  # generation may stop early at EOS
        nxt = _plain(m, seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    if not torch.equal(out, seq):
        raise AssertionError(f"cached generation {out.tolist()} vs full forwards {seq.tolist()}")
    return f"{out.shape[1] - prompt.shape[1]} greedy tokens equal"


def _sdpa_eager(m: Model, ids: Tensor) -> str:
    if not m.family.attn_interface:
        raise _NotApplicable("attention computed inline (no attention interface)")
    if not getattr(m.hf, "_supports_sdpa", False):
        raise _NotApplicable("the model class does not support SDPA")
    with _attention(m, "sdpa"):
        sdpa = _plain(m, ids).logits
    with _attention(m, "eager"):
        eager = _plain(m, ids).logits
    err = _close(sdpa, eager, "SDPA vs eager logits", 1e-3)
    return f"relative difference {err:.1e}"


def _self_patch(m: Model, ids: Tensor) -> str:
    kinds = ("resid_pre", "attn.z", "mlp.out", "resid_post")
    exist = {name for name, _ in m.site_shapes()}  # attn.z: attention layers only (hybrids)
    sites = [s for s in (f"blocks.{i}.{k}" for i in range(m.n_layers) for k in kinds) if s in exist]
    clean = m.run(ids, capture=sites)
    patched = m.run(ids, interventions=[patch(s, clean.cache) for s in sites]).logits
    if not torch.equal(patched, clean.logits):
        raise AssertionError(f"logits changed by {_rel(patched, clean.logits):.2e}")
    return f"{len(sites)} sites patched, logits bitwise equal"


def _moe_layers(m: Model) -> list[int]:
    """The mixture-of-experts layers (n/a without any)."""
    layers = m.layers_with("experts")
    if not layers:
        raise _NotApplicable("no mixture-of-experts layers")
    return layers


def _moe_routing(m: Model, ids: Tensor) -> str:
    layers = _moe_layers(m)
    sites = [f"blocks.{i}.moe.{k}" for i in layers for k in ("router", "weights")]
    run = m.run(ids, capture=sites)
    for i in layers:
        logits, weights = run.cache[f"blocks.{i}.moe.router"], run.cache[f"blocks.{i}.moe.weights"]
        k = moe.top_k(m, i)
        chosen = (weights != 0).sum(-1)
        if logits.shape != weights.shape or logits.shape[:2] != ids.shape:
            raise AssertionError(f"layer {i}: router {tuple(logits.shape)}, weights {tuple(weights.shape)}")
        if int(chosen.max()) > k:
            raise AssertionError(f"layer {i}: up to {int(chosen.max())} experts per token, top-k is {k}")
    return f"{len(layers)} MoE layers, at most top-k experts per token"


def _moe_resection(m: Model, ids: Tensor) -> str:
    layers = _moe_layers(m)
    layer = layers[-1]
    used = m.run(ids, capture=[f"blocks.{layer}.moe.weights"]).cache[f"blocks.{layer}.moe.weights"]
    expert = int((used != 0).sum((0, 1)).argmax())
    resected = m.run(ids, interventions=[moe.resect(layer, [expert])]).logits
    experts = m.layer_module(layer, m.family.experts)
    try:
        weights = moe.expert_weights(m, layer)
    except LmscopeError as e:
        raise _NotApplicable(str(e)) from None
    clone = copy.deepcopy(experts)
    try:
        with torch.no_grad():
            for w in weights.values():
                w[expert] = 0
            reference = _plain(m, ids).logits
    finally:
        experts.load_state_dict(clone.state_dict())
    err = _close(resected, reference, f"resecting expert {layer}.{expert} vs zeroing its weights")
    return f"expert {layer}.{expert}: relative difference {err:.1e}"


CHECKS: dict[str, Callable[[Model, Tensor], str]] = {
    "logits_hooked": _logits_hooked,
    "hidden_states": _hidden_states,
    "residual_sum": _residual_sum,
    "logit_lens": _logit_lens,
    "pattern": _pattern,
    "z_to_out": _z_to_out,
    "qkv": _qkv,
    "head_ablation": _head_ablation,
    "batching": _batching,
    "kv_cache": _kv_cache,
    "sdpa_eager": _sdpa_eager,
    "self_patch": _self_patch,
    "moe_routing": _moe_routing,
    "moe_resection": _moe_resection,
}


def certify(m: Model, checks: list[str] | None = None) -> Certificate:
    """Run the certificate's checks (all by default) on ``m`` in float32 semantics; a check that
    raises is a failure with the error's first line, never an exception."""
    cert = Certificate(m.name, m.hf.config.model_type)
    names = checks or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise LmscopeError(f"unknown check(s) {', '.join(unknown)} (known: {', '.join(CHECKS)})")
    ids = _ids(m)
    with progress_bar(f"verifying {m.name}", total=len(names)) as advance:
        for name in names:
            try:
                detail = CHECKS[name](m, ids)
                cert.checks.append(Check(name, "pass", detail))
            except _NotApplicable as e:
                cert.checks.append(Check(name, "n/a", str(e)))
            except Exception as e:  # noqa: BLE001 - every failure is reported, none escapes
                cert.checks.append(
                    Check(name, "fail", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                )
            advance(1)
    return cert


def require(cert: Certificate) -> None:
    """Refuse (a one-line :class:`LmscopeError`) a model whose certificate failed."""
    if not cert.passed:
        raise LmscopeError(
            f"{cert.model} ({cert.family}) failed lmscope's correctness checks: {', '.join(cert.failed)}; "
            "its results would be wrong (run `lmscope verify` for details)"
        )

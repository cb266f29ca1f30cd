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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmscope.core.errors import LmscopeError

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

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.([a-z_]+(?:\.[a-z_][a-z0-9_]*)?)(?:\.(\d+))?$")


@dataclass(frozen=True)
class Site:
    """A parsed site name: ``kind`` (e.g. ``"attn.z"``), ``layer`` and optional ``head``."""

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
        """What a hook session files the site under: its kind, with the expert for ``moe.expert``
        (each expert's output is a tensor of its own; a head is a slice of one)."""
        return f"moe.expert.{self.head}" if self.kind == "moe.expert" else self.kind

    @property
    def head_axis(self) -> int | None:
        """Axis of the head dimension in the site's tensor, if it has one."""
        if self.kind == "attn.pattern":
            return 1
        return 2 if self.kind in HEAD_KINDS else None

    @property
    def pos_axis(self) -> int:
        """Axis of the (query) position dimension."""
        return 2 if self.kind == "attn.pattern" else 1


def parse_site(text: str, head: int | None = None) -> Site:
    """Parse a site name; ``head`` may be given here instead of as a suffix."""
    text = text.strip()
    if text in GLOBAL_KINDS:
        if head is not None:
            raise LmscopeError(f"site '{text}' has no heads")
        return Site(text)
    m = _LAYER_RE.match(text)
    if not m or m.group(2) not in LAYER_KINDS:
        raise LmscopeError(
            f"unknown site '{text}': expected one of {', '.join(GLOBAL_KINDS)} or "
            f"blocks.<layer>.<{'|'.join(LAYER_KINDS)}>[.<head>]"
        )
    layer, kind, suffix = int(m.group(1)), m.group(2), m.group(3)
    if kind == "moe.expert":
        if suffix is None and head is None:
            raise LmscopeError(f"site '{text}': name the expert, e.g. blocks.{layer}.moe.expert.0")
        return Site(kind, layer, int(suffix) if suffix is not None else head)
    if suffix is not None:
        if kind not in HEAD_KINDS:
            raise LmscopeError(f"site '{text}': {kind} has no heads")
        if head is not None and head != int(suffix):
            raise LmscopeError(f"site '{text}' names head {suffix} but head={head} was given")
        head = int(suffix)
    if head is not None and kind not in HEAD_KINDS:
        raise LmscopeError(f"site '{text}': {kind} has no heads")
    return Site(kind, layer, head)


def layer_sites(layer: int) -> list[str]:
    """All site names of one layer, in forward order (mixture-of-experts and Monet sites not included)."""
    return [f"blocks.{layer}.{k}" for k in LAYER_KINDS if k not in MOE_KINDS + MONET_KINDS]


def all_sites(n_layers: int) -> list[str]:
    """Every site name of a model with ``n_layers`` layers, in forward order."""
    names = ["embed"]
    for layer in range(n_layers):
        names += layer_sites(layer)
    return names + ["final_norm", "logits"]

"""Names of the nodes of the computational graph that circuits are made of (:mod:`lmscope.circuits.edges`):

- ``input``: the embeddings entering layer 0;
- ``a{L}.h{H}``: head H of layer L's output (``z_H W_O[H]``); ``a{L}.h{H}<q>`` (``<k>``, ``<v>``):
  that head's query (key, value) input, a node that reads the residual stream;
- ``m{L}``: layer L's MLP (its output, or its input where it reads);
- ``logits``: the unembedding's input.

Every name is built by :func:`head_node` and :func:`mlp_node` and read back by :func:`parse_node`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from lmscope.core.errors import LmscopeError

INPUT, LOGITS = "input", "logits"
_NODE = re.compile(r"^(?:a(\d+)\.h(\d+)(?:<([qkv])>)?|m(\d+))$")


class Node(NamedTuple):
    """A parsed node name: ``kind`` is ``"input"``, ``"head"``, ``"mlp"`` or ``"logits"``;
    ``layer`` and ``head`` are None where the kind has none; ``qkv`` is the head input a
    ``a{L}.h{H}<q|k|v>`` node reads (None otherwise)."""

    kind: str
    layer: int | None = None
    head: int | None = None
    qkv: str | None = None


def head_node(layer: int, head: int, qkv: str | None = None) -> str:
    """The name of head ``head`` of layer ``layer`` (``a3.h2``), or of its ``qkv`` input (``a3.h2<k>``)."""
    return f"a{layer}.h{head}" if qkv is None else f"a{layer}.h{head}<{qkv}>"


def mlp_node(layer: int) -> str:
    """The name of layer ``layer``'s MLP (``m3``)."""
    return f"m{layer}"


def parse_node(name: str) -> Node:
    """``"a3.h2"`` -> ``Node("head", 3, 2)``, ``"a3.h2<k>"`` -> ``Node("head", 3, 2, "k")``,
    ``"m3"`` -> ``Node("mlp", 3)``, ``"input"`` / ``"logits"`` -> ``Node("input")`` / ``Node("logits")``."""
    if name in (INPUT, LOGITS):
        return Node(name)
    match = _NODE.match(name)
    if match is None:
        raise LmscopeError(
            f"bad node name {name!r}: expected input, a{{L}}.h{{H}}, a{{L}}.h{{H}}<q|k|v>, m{{L}} or logits"
        )
    layer, head, qkv, mlp = match.groups()
    if mlp is not None:
        return Node("mlp", int(mlp))
    return Node("head", int(layer), int(head), qkv)


def head_of(name: str) -> tuple[int, int]:
    """``"a3.h2"`` (or ``"a3.h2<k>"``) -> ``(3, 2)``: the layer and index of a head's node."""
    node = parse_node(name)
    if node.kind != "head":
        raise LmscopeError(f"node {name!r} is not a head")
    return node.layer, node.head


def is_head_node(name: str) -> bool:
    """Whether ``name`` names an attention head (or one of its q/k/v inputs)."""
    return parse_node(name).kind == "head"


def node_order(name: str) -> tuple[int, int, int]:
    """A sort key in the order of the forward pass: ``input``, then per layer its heads by index
    and its MLP, then ``logits``."""
    node = parse_node(name)
    if node.kind == INPUT:
        return (-1, 0, 0)
    if node.kind == LOGITS:
        return (10**9, 0, 0)
    return (node.layer, 0 if node.kind == "head" else 1, node.head or 0)

"""Circuits as graphs: select edges by score, prune what is left unconnected, export and draw.

- selection: the top-n edges by |score|, or every edge with |score| >= threshold
  (of :class:`~lmscope.circuits.edges.EdgeScores`);
- pruning: keep only edges on a path from ``input`` to ``logits`` (a head's q, k and v inputs
  count as the head), repeated until nothing changes;
- export: JSON with nodes ``input``, ``a{L}.h{H}``, ``m{L}``, ``logits`` and weighted edges
  (:meth:`Circuit.to_json`), and a layered drawing (:func:`draw`).

How faithful a circuit is: :mod:`lmscope.circuits.faithfulness`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmscope.circuits.edges import EdgeScores
from lmscope.circuits.nodes import node_order, parse_node
from lmscope.core.errors import LmscopeError
from lmscope.reports.plots import graph


def node_of(name: str) -> str:
    """The graph node an edge endpoint belongs to: ``a3.h2<q>`` -> ``a3.h2``."""
    return name.split("<")[0]


@dataclass
class Circuit:
    """Selected edges ``(from, to, score)`` and the nodes they connect."""

    edges: list[tuple[str, str, float]]

    @property
    def nodes(self) -> list[str]:
        names = {node_of(n) for edge in self.edges for n in edge[:2]}
        return sorted(names, key=node_order)

    def to_json(self) -> dict:
        """``{"nodes": [...], "edges": [{"from", "to", "input", "score"}, ...]}``: ``to`` is a node,
        ``input`` the q/k/v input the edge enters (None for MLPs and the logits)."""
        return {
            "nodes": self.nodes,
            "edges": [{"from": u, "to": node_of(v), "input": parse_node(v).qkv, "score": s} for u, v, s in self.edges],
        }


def select(scores: EdgeScores, top: int | None = None, threshold: float | None = None) -> Circuit:
    """Edges by top-n |score| or |score| >= threshold, then pruned (see :func:`prune`)."""
    if (top is None) == (threshold is None):
        raise LmscopeError("choose edges by exactly one of top-n or threshold")
    edges = sorted(scores.edges(), key=lambda e: -abs(e[2]))
    if top is not None:
        if top < 1:
            raise LmscopeError("--top must be at least 1")
        edges = edges[:top]
    else:
        edges = [e for e in edges if abs(e[2]) >= threshold]
    return prune(Circuit(edges))


def prune(circuit: Circuit) -> Circuit:
    """Drop edges not on a path from ``input`` to ``logits``, until nothing changes."""
    edges = list(circuit.edges)
    while True:
        reached = {"input"}
        for u, v, _ in sorted(edges, key=lambda e: node_order(node_of(e[1]))):
            if u in reached:
                reached.add(node_of(v))
        useful = {"logits"}
        for u, v, _ in sorted(edges, key=lambda e: node_order(e[0]), reverse=True):
            if node_of(v) in useful:
                useful.add(u)
        kept = [e for e in edges if e[0] in reached and e[0] in useful and node_of(e[1]) in useful]
        if len(kept) == len(edges):
            return Circuit(kept)
        edges = kept


def draw(circuit: Circuit, path: str | Path, title: str = "circuit") -> Path:
    """A layered drawing: layers bottom to top, heads left to right; edge width ~ |score|,
    red positive, blue negative."""
    nodes = circuit.nodes
    layers = sorted({node_order(n)[0] for n in nodes})
    rank = {layer: i for i, layer in enumerate(layers)}
    pos = {}
    for n in nodes:
        layer, kind, head = node_order(n)
        y = rank[layer] * 2 + kind
        x = 0.0 if n in ("input", "logits") else (head if kind == 0 else -1.5)
        pos[n] = (x, y)
    edges = [(u, node_of(v), score) for u, v, score in circuit.edges]
    return graph(nodes, pos, edges, path, title, height=max(4, 0.6 * len(layers) + 2))

"""Temporal heads from the circuits' node sets, exactly as the paper's
``2.circuit_analysis.ipynb`` (``analyze_nodes_by_category``) selects them.

"Temporal Heads" (Park et al., ACL 2025, arXiv 2502.14258). Circuits are grouped by their
target year (``year2004``: the 2004 circuits of every temporal category) or, for invariant
categories, into one group (``time_invariant``). With n circuits in a group, a node is
**major** in it when it appears in at least ``int(ratio * n + 0.9999999)`` = ceil(ratio n) of
them (ratio 0.9). Then:

- A.1 ``common``: nodes in every circuit (all groups);
- A.2 ``found_in_both``: nodes in at least one temporal and at least one invariant circuit,
  minus A.1;
- B.1 **temporal heads**: nodes major in some year group, minus those major in the invariant
  group, minus A.1, minus A.2 (reported: the heads ``a{L}.h{H}`` among them; MLP nodes listed
  apart);
- B.2 invariant-only: major in the invariant group, minus the temporal majors, A.1 and A.2.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from lmscope.circuits.nodes import head_node, head_of, is_head_node, node_order
from lmscope.core.errors import LmscopeError
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table

INVARIANT = "invariant"


@dataclass(frozen=True)
class NodeSet:
    """One circuit's nodes, its group (the target year, or ``"invariant"``) and name."""

    name: str
    group: str
    nodes: frozenset[str]

    @property
    def temporal(self) -> bool:
        return self.group != INVARIANT


def major_nodes(sets: Sequence[frozenset[str]], ratio: float) -> set[str]:
    """Nodes in at least ``int(ratio * n + 0.9999999)`` of the ``n`` sets (the paper's
    ``get_nodes_in_threshold``: ceil(ratio n))."""
    counts = Counter(node for nodes in sets for node in nodes)
    need = int(ratio * len(sets) + 0.9999999)
    return {node for node, count in counts.items() if count >= need}


@dataclass
class TemporalHeads(Result):
    """The selection of :func:`temporal_heads`: node lists as the notebook's report (A.1, A.2,
    B.1, B.2), each temporal head's count of temporal circuits containing it (``counts``), the
    circuits per group and the ratio."""

    temporal_nodes: list[str]
    invariant_nodes: list[str]
    common: list[str]
    found_in_both: list[str]
    counts: dict[str, int]
    groups: dict[str, int]
    ratio: float
    n_layers: int = 0
    n_heads: int = 0

    @property
    def heads(self) -> list[tuple[int, int]]:
        """The temporal heads ``(layer, head)``, in layer order."""
        return [head_of(n) for n in self.temporal_nodes if is_head_node(n)]

    def ranked(self) -> list[tuple[int, int]]:
        """The temporal heads, those in the most temporal circuits first (ties in layer order)."""
        return sorted(self.heads, key=lambda h: -self.counts.get(head_node(*h), 0))

    @property
    def invariant_heads(self) -> list[tuple[int, int]]:
        return [head_of(n) for n in self.invariant_nodes if is_head_node(n)]

    @property
    def n_temporal_circuits(self) -> int:
        return sum(n for g, n in self.groups.items() if g != INVARIANT)

    def text(self) -> str:
        heads = ", ".join(head_node(layer, head) for layer, head in self.heads) or "none"
        inv = ", ".join(head_node(layer, head) for layer, head in self.invariant_heads) or "none"
        return (
            f"Temporal heads (major in >= {self.ratio:.0%} of a year's circuits, not in the invariant ones): "
            f"{heads}. Invariant-only heads: {inv}. {len(self.common)} nodes are in every circuit, "
            f"{len(self.found_in_both)} more in both temporal and invariant circuits."
        )

    def tables(self) -> list[Table]:
        n = self.n_temporal_circuits
        rows = [
            {"head": node, "kind": "temporal", "temporal circuits": f"{self.counts.get(node, 0)} of {n}"}
            for node in self.temporal_nodes
        ]
        rows += [{"head": node, "kind": "invariant only", "temporal circuits": ""} for node in self.invariant_nodes]
        groups = [{"group": g, "circuits": k} for g, k in self.groups.items()]
        return [Table("temporal and invariant-only nodes", rows), Table("circuits per group", groups)]

    def figures(self) -> list[Figure]:
        """How many temporal circuits contain each head (heads by layer), temporal heads marked
        by the count, others 0."""
        if not self.n_layers:
            return []
        z = [[0.0] * self.n_layers for _ in range(self.n_heads)]
        for layer, head in self.heads:
            z[head][layer] = float(self.counts.get(head_node(layer, head), 0))
        return [
            Figure(
                "temporal_heads",
                "heatmap",
                f"temporal heads: temporal circuits containing each (of {self.n_temporal_circuits})",
                "layer",
                "head",
                x=list(range(self.n_layers)),
                y=list(range(self.n_heads)),
                z=z,
                value_label="circuits",
            )
        ]


def temporal_heads(sets: Sequence[NodeSet], ratio: float = 0.9, n_layers: int = 0, n_heads: int = 0) -> TemporalHeads:
    """Select temporal (B.1) and invariant-only (B.2) nodes from circuits' node sets (see the
    module docstring); ``n_layers``/``n_heads`` size the heatmap."""
    if not 0 < ratio <= 1:
        raise LmscopeError(f"ratio must be in (0, 1], not {ratio}")
    groups: dict[str, list[frozenset[str]]] = {}
    for s in sets:
        groups.setdefault(s.group, []).append(s.nodes)
    temporal = [s.nodes for s in sets if s.temporal]
    invariant = [s.nodes for s in sets if not s.temporal]
    common = frozenset.intersection(*[s.nodes for s in sets]) if sets else frozenset()
    union = lambda group: frozenset().union(*group)
    both = (union(temporal) & union(invariant)) - common
    t_major = set().union(*[major_nodes(g, ratio) for name, g in groups.items() if name != INVARIANT])
    i_major = major_nodes(groups[INVARIANT], ratio) if INVARIANT in groups else set()
    temporal_only = t_major - i_major - common - both
    invariant_only = i_major - t_major - common - both
    counts = Counter(node for nodes in temporal for node in nodes if node in temporal_only)
    return TemporalHeads(
        sorted(temporal_only, key=node_order),
        sorted(invariant_only, key=node_order),
        sorted(common, key=node_order),
        sorted(both, key=node_order),
        dict(counts),
        {name: len(g) for name, g in groups.items()},
        ratio,
        n_layers,
        n_heads,
    )

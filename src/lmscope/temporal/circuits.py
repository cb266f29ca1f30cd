"""One EAP-IG circuit per target year and per invariant category, as the paper builds them.

"Temporal Heads" (Park et al., ACL 2025, arXiv 2502.14258), notebook ``1.circuit_construction``:
for each (temporal category, target year) and each invariant category, EAP-IG edge attribution
on its pairs (metric: logit difference of the answer over the wrong answer at the last
position; ``ig_steps=100``; the paper's vendored EAP-IG integrates over k = 1..steps, lmscope's
``schedule="paper"``), the top-n edges by absolute score (``apply_topn(5000, absolute=True)``;
here capped at the graph's edge count), dead nodes pruned, then the circuit's faithfulness:
B = the full model's mean logit difference, C = the circuit's (every edge outside it patched
from the corrupted run, EAP-IG's ``evaluate_graph``) and the paper's CRS
(:func:`lmscope.circuits.faithfulness.crs`).

Each circuit is saved as ``graph_<name>.json`` when it is done; a later run with the same
settings reads it back instead of recomputing (:func:`load_circuit`), so an interrupted study
resumes where it stopped.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from lmscope.circuits.edges import edge_attribution
from lmscope.circuits.faithfulness import Faithfulness, faithfulness
from lmscope.circuits.graph import Circuit, select
from lmscope.circuits.nodes import is_head_node
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.reports.results import nan_for_none, write_json
from lmscope.temporal.data import PairSet
from lmscope.temporal.heads import INVARIANT, NodeSet


@dataclass(frozen=True)
class CircuitSettings:
    """How circuits are built: EAP-IG ``steps`` and ``schedule``, ``top`` edges by |score|,
    at most ``max_pairs`` pairs per circuit (None: all, as the paper)."""

    steps: int = 100
    schedule: str = "paper"
    top: int = 5000
    max_pairs: int | None = None


@dataclass
class CategoryCircuit:
    """The circuit of one pair set: ``name`` (``"<category> <year>"`` or the invariant category),
    ``group`` (the year, or ``"invariant"``; :attr:`kind` follows from it), the number of
    pairs used and dropped (unequal token lengths), the graph's edge count, the selected and
    pruned :class:`Circuit` and its :class:`Faithfulness` (with the paper's CRS)."""

    name: str
    group: str
    n_pairs: int
    dropped: int
    graph_edges: int
    circuit: Circuit
    faithfulness: Faithfulness
    settings: CircuitSettings

    @property
    def kind(self) -> str:
        """``"invariant"`` for the invariant group, else ``"temporal"``."""
        return "invariant" if self.group == INVARIANT else "temporal"

    @property
    def nodes(self) -> set[str]:
        """The circuit's nodes (``input``, ``a{L}.h{H}``, ``m{L}``, ``logits``)."""
        return set(self.circuit.nodes)

    def node_set(self) -> NodeSet:
        """The nodes and group, for :func:`lmscope.temporal.heads.temporal_heads`."""
        return NodeSet(self.name, self.group, frozenset(self.nodes))

    @property
    def slug(self) -> str:
        return slug(self.name)

    def to_json(self) -> dict:
        """The graph (nodes, edges) with what it was built from and its faithfulness."""
        return {
            "name": self.name,
            "group": self.group,
            "kind": self.kind,
            "n_pairs": self.n_pairs,
            "dropped": self.dropped,
            "graph_edges": self.graph_edges,
            "settings": asdict(self.settings),
            "faithfulness": self.faithfulness.to_json(),
            **self.circuit.to_json(),
        }

    def summary(self) -> dict:
        """One table row: sizes and faithfulness."""
        f = self.faithfulness
        return {
            "circuit": self.name,
            "group": self.group,
            "pairs": self.n_pairs,
            "dropped": self.dropped,
            "edges": len(self.circuit.edges),
            "nodes": len(self.circuit.nodes),
            "heads": sum(is_head_node(n) for n in self.circuit.nodes),
            "B (full model)": round(f.baseline, 4),
            "C (circuit)": round(f.circuit, 4),
            "CRS": round(f.crs, 2),
        }


def slug(name: str) -> str:
    """A file-name-safe form of a circuit name: ``"temporal political leadership 2004"`` ->
    ``temporal_political_leadership_2004``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "circuit"


def build_circuit(
    model: Model, pairs: PairSet, group: str, settings: CircuitSettings = CircuitSettings()
) -> CategoryCircuit:
    """EAP-IG on ``pairs`` (metric logit difference), the top ``settings.top`` edges (capped at
    the graph's edge count) pruned, and the circuit's faithfulness and CRS on the same pairs."""
    if settings.top < 1 or settings.steps < 1:
        raise LmscopeError("circuits need top >= 1 and steps >= 1")
    used = pairs.pairs if settings.max_pairs is None else pairs.pairs[: settings.max_pairs]
    if not used:
        raise LmscopeError(f"{pairs.name}: no pairs to build a circuit from")
    scores = edge_attribution(model, used, "logit_diff", steps=settings.steps, schedule=settings.schedule)
    graph_edges = int(scores.valid.sum())
    circuit = select(scores, top=min(settings.top, graph_edges))
    faith = faithfulness(model, used, circuit, "logit_diff")
    return CategoryCircuit(pairs.name, group, len(used), pairs.dropped, graph_edges, circuit, faith, settings)


def save_circuit(circuit: CategoryCircuit, out: Path) -> Path:
    """Write ``out/graph_<slug>.json``."""
    return write_json(out / f"graph_{circuit.slug}.json", circuit.to_json())


def load_circuit(path: Path, settings: CircuitSettings, n_pairs: int) -> CategoryCircuit | None:
    """A circuit saved by :func:`save_circuit` if it was built with ``settings`` from
    ``n_pairs`` pairs, else None (also for an unreadable file: it is then rebuilt)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["settings"] != asdict(settings) or data["n_pairs"] != n_pairs:
            return None
        edges = [
            (e["from"], e["to"] + (f"<{e['input']}>" if e["input"] else ""), nan_for_none(e["score"]))
            for e in data["edges"]
        ]
        return CategoryCircuit(
            data["name"],
            data["group"],
            data["n_pairs"],
            data["dropped"],
            data["graph_edges"],
            Circuit(edges),
            Faithfulness(**nan_for_none(data["faithfulness"])),
            settings,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None

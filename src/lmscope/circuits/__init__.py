"""Where does a behaviour live: prompt pairs and metrics (one protocol), built-in tasks, exact
activation patching, attribution patching and EAP-IG (nodes and edges), head roles, circuit
selection (:mod:`~lmscope.circuits.graph`) and faithfulness."""

from lmscope.circuits.edges import EdgeScores, edge_attribution
from lmscope.circuits.faithfulness import Faithfulness, crs, faithfulness
from lmscope.circuits.graph import Circuit, draw, prune, select

__all__ = [
    "Circuit",
    "EdgeScores",
    "Faithfulness",
    "crs",
    "draw",
    "edge_attribution",
    "faithfulness",
    "prune",
    "select",
]

"""Where does a behaviour live: prompt pairs and metrics (one protocol), built-in tasks, exact
activation patching, attribution patching and EAP-IG (nodes and edges), head roles, circuit
selection and faithfulness."""

from lmscope.circuits.faithfulness import Circuit, Faithfulness, crs, draw, faithfulness, prune, select

__all__ = ["Circuit", "Faithfulness", "crs", "draw", "faithfulness", "prune", "select"]

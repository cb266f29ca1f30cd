"""Temporal Heads (Park et al., ACL 2025, arXiv 2502.14258): find the attention heads that recall
time-specific knowledge, ablate them, read them, and edit knowledge through their values.

- :mod:`~lmscope.temporal.data`: the paper's probing data (bundled) and its clean/corrupted
  pairs (per target year, alias, invariant), as token pairs for EAP-IG and faithfulness;
- :mod:`~lmscope.temporal.recall`: what the model knows, multiple-choice recall per category
  (with or without interventions);
- :mod:`~lmscope.temporal.circuits`: one EAP-IG circuit per year and invariant category;
- :mod:`~lmscope.temporal.heads`: temporal heads from the circuits' node sets;
- :mod:`~lmscope.temporal.ablation`: zeroed heads, recall and perplexity;
- :mod:`~lmscope.temporal.reading`: logit lens and DLA, numeric vs alias years;
- :mod:`~lmscope.temporal.edit`: editing through head values;
- :mod:`~lmscope.temporal.workflow`: the whole study (``lmscope temporal``).
"""

from lmscope.temporal.ablation import Ablation, ablation, zero_heads
from lmscope.temporal.circuits import CategoryCircuit, CircuitSettings, build_circuit
from lmscope.temporal.data import (
    InvariantCategory,
    PairSet,
    Problem,
    TemporalCategory,
    YearPairs,
    bundled,
    invariant_pairs,
    load_categories,
    load_category,
    pairs_by_year,
    select_categories,
    temporal_pairs,
)
from lmscope.temporal.edit import EditExperiment, TemporalEdit, temporal_edit
from lmscope.temporal.heads import TemporalHeads, temporal_heads
from lmscope.temporal.reading import HeadReading, read_heads
from lmscope.temporal.recall import CategoryRecall, Recall, recall
from lmscope.temporal.workflow import QUICK, TemporalSettings, TemporalStudy, run_study

__all__ = [
    "QUICK",
    "Ablation",
    "CategoryCircuit",
    "CategoryRecall",
    "CircuitSettings",
    "EditExperiment",
    "HeadReading",
    "InvariantCategory",
    "PairSet",
    "Problem",
    "Recall",
    "TemporalCategory",
    "TemporalEdit",
    "TemporalHeads",
    "TemporalSettings",
    "TemporalStudy",
    "YearPairs",
    "ablation",
    "build_circuit",
    "bundled",
    "invariant_pairs",
    "load_categories",
    "load_category",
    "pairs_by_year",
    "read_heads",
    "recall",
    "run_study",
    "select_categories",
    "temporal_edit",
    "temporal_heads",
    "temporal_pairs",
    "zero_heads",
]

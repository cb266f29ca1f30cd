"""Temporal Heads (Park et al., ACL 2025, arXiv 2502.14258): find the attention heads that recall
time-specific knowledge, ablate them, read them, and edit knowledge through their values.

- :mod:`~lmscope.temporal.data`: the paper's probing data (bundled) and its clean/corrupted
  pairs (per target year, alias, invariant), as token pairs for EAP-IG and faithfulness;
- :mod:`~lmscope.temporal.recall`: what the model knows, multiple-choice recall per category
  (with or without interventions).
"""

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
    temporal_pairs,
)
from lmscope.temporal.recall import CategoryRecall, Recall, recall

__all__ = [
    "CategoryRecall",
    "InvariantCategory",
    "PairSet",
    "Problem",
    "Recall",
    "TemporalCategory",
    "YearPairs",
    "bundled",
    "invariant_pairs",
    "load_categories",
    "load_category",
    "pairs_by_year",
    "recall",
    "temporal_pairs",
]

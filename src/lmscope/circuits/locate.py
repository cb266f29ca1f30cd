"""Where does a behaviour live: one entry point over exact activation patching
(:mod:`lmscope.circuits.patching`), attribution patching and EAP-IG
(:mod:`lmscope.circuits.attribution`), at the level of heads, layers (attention and MLP), residual
positions or mixture-of-experts experts."""

from __future__ import annotations

from collections.abc import Sequence

from lmscope.circuits.attribution import GRADIENT_METHODS, attribute
from lmscope.circuits.metrics import Metric
from lmscope.circuits.pairs import PromptPair, TokenPair, as_token_pairs
from lmscope.circuits.patching import activation_patching
from lmscope.circuits.scores import PatchResult
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model

METHODS = ("exact", *GRADIENT_METHODS)
# level -> (component, per_position) runs
LEVELS = {
    "head": [("head", False)],
    "layer": [("attn", False), ("mlp", False)],
    "position": [("resid", True)],
    "expert": [("expert", False)],  # mixture-of-experts models
}


def locate(
    model: Model,
    pairs: Sequence[PromptPair] | Sequence[TokenPair],
    method: str = "exact",
    level: str = "head",
    metric: str | Metric = "logit_diff",
    steps: int = 100,
    direction: str = "denoising",
    max_memory: int | str | dict | None = None,
) -> list[PatchResult]:
    """Score the components of ``level`` by ``method``: ``exact`` activation patching (Meng et al.
    2022; Wang et al. 2022), ``attribution`` patching (Nanda 2023) or ``eap-ig`` (Hanna et al.
    2024; gradient methods score the denoising direction only); one :class:`PatchResult` per
    component, normalised so the corrupted run scores 0 and the clean run 1.

    ``pairs``: token pairs, or prompt pairs of equal length (tokenise pairs of different lengths
    with :func:`~lmscope.circuits.pairs.tokenize_pairs` and ``align="final"`` first).
    ``max_memory``: the gradient methods' working-memory budget (see :func:`attribute`)."""
    if method not in METHODS:
        raise LmscopeError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    if level not in LEVELS:
        raise LmscopeError(f"unknown level '{level}' (choose from {', '.join(LEVELS)})")
    if method != "exact" and direction != "denoising":
        raise LmscopeError(f"{method} scores the denoising direction only")
    token_pairs = as_token_pairs(model, pairs)
    results = []
    for component, per_position in LEVELS[level]:
        if method == "exact":
            r = activation_patching(model, token_pairs, component, per_position, direction, metric)
        else:
            r = attribute(model, token_pairs, method, component, per_position, metric, steps, max_memory=max_memory)
        results.append(r)
    return results

"""Where does a behaviour live: one entry point over exact patching, attribution patching and
EAP-IG, at the level of heads, layers (attention and MLP) or residual positions."""

from __future__ import annotations

from collections.abc import Sequence

from lmscope.circuits.attribution import attribute
from lmscope.circuits.metrics import Metric
from lmscope.circuits.pairs import PromptPair, TokenPair
from lmscope.circuits.patching import activation_patching, as_token_pairs
from lmscope.circuits.scores import PatchResult
from lmscope.core.errors import LmscopeError

METHODS = ("exact", "attribution", "eap-ig")
# level -> (component, per_position) runs
LEVELS = {
    "head": [("head", False)],
    "layer": [("attn", False), ("mlp", False)],
    "position": [("resid", True)],
}


def locate(
    model,
    pairs: Sequence[PromptPair] | Sequence[TokenPair],
    method: str = "exact",
    level: str = "head",
    metric: str | Metric = "logit_diff",
    steps: int = 100,
    direction: str = "denoising",
    align: str = "strict",
) -> list[PatchResult]:
    """Score the components of ``level`` by ``method``; one :class:`PatchResult` per component."""
    if method not in METHODS:
        raise LmscopeError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    if level not in LEVELS:
        raise LmscopeError(f"unknown level '{level}' (choose from {', '.join(LEVELS)})")
    if method != "exact" and direction != "denoising":
        raise LmscopeError(f"{method} scores the denoising direction only")
    token_pairs = as_token_pairs(model, pairs, align)
    results = []
    for component, per_position in LEVELS[level]:
        if method == "exact":
            r = activation_patching(model, token_pairs, component, per_position, direction, metric)
        else:
            r = attribute(model, token_pairs, method, component, per_position, metric, steps)
        results.append(r)
    return results

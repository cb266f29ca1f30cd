"""Metrics of a prompt pair's final-position logits, for patching and attribution.

Each metric maps final-position logits ``[K, vocab]`` (K variants of one pair) to ``[K]``.
Patching scores normalise a metric M so that the corrupted run scores 0 and the clean run 1:
``(M(patched) - M(corrupt)) / (M(clean) - M(corrupt))`` (as in Wang et al. 2022 and
TransformerLens's patching demos; :class:`lmscope.circuits.pairs.Baselines`). A metric is bound
to a pair and its clean run with :func:`lmscope.circuits.pairs.bind`.

- ``logit_diff`` (default): mean logit of the answer candidates minus mean logit of the wrong ones;
- ``logprob``: log of the total probability of the answer candidates;
- ``prob``: total probability of the answer candidates;
- ``kl``: minus the KL divergence from the clean run's next-token distribution, KL(clean || run);
- any callable ``(logits [K, vocab], pair) -> [K]``.

An answer candidate is one token here: one of several tokens is scored by the token
``answer_token`` picks when the pair is tokenised (:func:`lmscope.circuits.pairs.tokenize_pairs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lmscope.circuits.pairs import TokenPair
from lmscope.core.errors import LmscopeError
from lmscope.core.stats import kl_divergence


@dataclass(frozen=True)
class Metric:
    """``fn(logits, pair, clean_logprobs)``; ``answers_only``: fn reads only the answer and wrong
    rows, so callers may pass logits restricted to ``pair.answer`` then ``pair.wrong`` (as
    :meth:`lmscope.circuits.pairs.BoundMetric.of_residual` does)."""

    name: str
    fn: Callable[[Tensor, TokenPair, Tensor | None], Tensor]
    answers_only: bool = False

    def __call__(self, logits: Tensor, pair: TokenPair, clean_logprobs: Tensor | None = None) -> Tensor:
        return self.fn(logits, pair, clean_logprobs)


def _logit_diff(logits, pair, _):
    return logits[:, pair.answer].mean(-1) - logits[:, pair.wrong].mean(-1)


def _logprob(logits, pair, _):
    return torch.logsumexp(logits.log_softmax(-1)[:, pair.answer], dim=-1)


def _prob(logits, pair, _):
    return logits.softmax(-1)[:, pair.answer].sum(-1)


def _neg_kl(logits, pair, clean_logprobs):
    return -kl_divergence(clean_logprobs, logits.log_softmax(-1))


METRICS = {
    "logit_diff": Metric("logit_diff", _logit_diff, answers_only=True),
    "logprob": Metric("logprob", _logprob),
    "prob": Metric("prob", _prob),
    "kl": Metric("kl", _neg_kl),
}


def get_metric(metric: str | Metric | Callable) -> Metric:
    """A metric by name, or wrap a callable ``(logits [K, vocab], pair) -> [K]``."""
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        return Metric(getattr(metric, "__name__", "custom"), lambda logits, pair, _: metric(logits, pair))
    if metric not in METRICS:
        raise LmscopeError(f"unknown metric '{metric}' (choose from {', '.join(METRICS)})")
    return METRICS[metric]

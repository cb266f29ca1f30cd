"""Statistics of next-token distributions shared by every layer above ``core``."""

from __future__ import annotations

from torch import Tensor


def kl_divergence(p: Tensor, q: Tensor, *, logits: bool = False) -> Tensor:
    """``KL(P || Q) = sum_v P(v) (log P(v) - log Q(v))`` in nats, over the last (vocabulary) axis:
    ``p``, ``q`` [..., vocab] -> [...] (no mean: the caller reduces over positions or prompts).

    ``P`` is the reference (the distribution the expectation is taken under: clean, unsteered or
    final logits), ``Q`` the one compared with it. ``p`` and ``q`` are log-probabilities
    (``log_softmax`` already applied); with ``logits=True`` they are logits, cast to float32
    and normalised here."""
    if logits:
        p, q = p.float().log_softmax(-1), q.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)

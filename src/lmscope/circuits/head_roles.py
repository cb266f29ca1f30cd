"""Head roles on repeated random-token sequences (Olsson et al. 2022, "In-context Learning
and Induction Heads"; Elhage et al. 2021; the scores of TransformerLens's head detector).

On ``[BOS] R R`` with R a random sequence of n tokens, for query position ``q`` in the second
half whose token first occurred at position ``q - n``:

- **induction score**: mean attention from ``q`` to ``q - n + 1`` (the token after the earlier
  occurrence, which an induction head copies);
- **duplicate-token score**: mean attention from ``q`` to ``q - n`` (the earlier occurrence);
- **previous-token score**: mean attention from every position ``q >= 1`` to ``q - 1``.

:func:`repeated_loss` gives the next-token loss on the first and second halves; a model that
copies in context has a much lower loss on the second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmscope.circuits.tasks import _bos, _plain_token_range

ROLES = ("induction", "previous_token", "duplicate_token")


@dataclass
class HeadRoles:
    """Scores ``[n_layers, n_heads]`` for each role."""

    induction: Tensor
    previous_token: Tensor
    duplicate_token: Tensor

    def rows(self) -> list[dict]:
        n_layers, n_heads = self.induction.shape
        return [
            {"layer": layer, "head": head, **{r: float(getattr(self, r)[layer, head]) for r in ROLES}}
            for layer in range(n_layers)
            for head in range(n_heads)
        ]

    def top(self, role: str, n: int = 5) -> list[tuple[int, int, float]]:
        scores = getattr(self, role)
        values, index = scores.flatten().topk(min(n, scores.numel()))
        return [(int(i) // scores.shape[1], int(i) % scores.shape[1], float(v)) for v, i in zip(values, index)]


def repeated_tokens(model, batch: int = 8, length: int = 30, seed: int = 0) -> Tensor:
    """``[batch, 1 + 2 * length]`` (or without BOS if the model has none): BOS, R, R."""
    g = torch.Generator().manual_seed(seed)
    low, high = _plain_token_range(model)
    r = torch.randint(low, high, (batch, length), generator=g)
    bos = torch.tensor(_bos(model), dtype=torch.long).expand(batch, -1)
    return torch.cat([bos, r, r], dim=1)


def head_roles(model, batch: int = 8, length: int = 30, seed: int = 0) -> HeadRoles:
    """Induction, previous-token and duplicate-token scores of every head."""
    ids = repeated_tokens(model, batch, length, seed).to(model.device)
    offset = ids.shape[1] - 2 * length  # 1 with BOS
    second = torch.arange(offset + length, offset + 2 * length, device=ids.device)
    every = torch.arange(1, ids.shape[1], device=ids.device)
    sites = [f"blocks.{layer}.attn.pattern" for layer in range(model.n_layers)]
    with torch.no_grad():
        cache = model.run(ids, capture=sites).cache
    scores = {r: torch.zeros(model.n_layers, model.n_heads) for r in ROLES}
    for layer, site in enumerate(sites):
        p = cache[site]  # [batch, heads, q, k]
        scores["induction"][layer] = p[:, :, second, second - length + 1].mean((0, 2))
        scores["duplicate_token"][layer] = p[:, :, second, second - length].mean((0, 2))
        scores["previous_token"][layer] = p[:, :, every, every - 1].mean((0, 2))
    return HeadRoles(**scores)


def repeated_loss(model, batch: int = 8, length: int = 30, seed: int = 0) -> tuple[float, float]:
    """Mean next-token loss (nats) predicting the first half and the second half of ``R R``."""
    ids = repeated_tokens(model, batch, length, seed).to(model.device)
    offset = ids.shape[1] - 2 * length
    with torch.no_grad():
        logits = model.run(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    loss = loss.view(batch, -1)  # loss[:, i] predicts token i + 1
    # predicting R[1:] in each half (R[0] of the second half cannot be foreseen)
    first = loss[:, offset : offset + length - 1].mean()
    second = loss[:, offset + length :].mean()
    return float(first), float(second)

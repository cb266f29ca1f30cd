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

from lmscope.circuits.tasks import plain_token_range
from lmscope.core.model import Model
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table

ROLES = ("induction", "previous_token", "duplicate_token")
_TITLES = {
    "induction": "induction score (attention to the token after the previous occurrence)",
    "previous_token": "previous-token score (attention to the previous token)",
    "duplicate_token": "duplicate-token score (attention to the previous occurrence)",
}


@dataclass
class HeadRoles(Result):
    """Scores ``[n_layers, n_heads]`` for each role and, when measured, the next-token loss on
    the first and second halves of the repeated sequences (:func:`repeated_loss`)."""

    induction: Tensor
    previous_token: Tensor
    duplicate_token: Tensor
    repeated_loss: tuple[float, float] | None = None

    def rows(self) -> list[dict]:
        """One dict per head: layer, head and its score for each role."""
        n_layers, n_heads = self.induction.shape
        return [
            {"layer": layer, "head": head, **{r: float(getattr(self, r)[layer, head]) for r in ROLES}}
            for layer in range(n_layers)
            for head in range(n_heads)
        ]

    def top(self, role: str, n: int = 5) -> list[tuple[int, int, float]]:
        """The ``n`` heads of highest ``role`` score as ``(layer, head, score)``."""
        scores = getattr(self, role)
        values, index = scores.flatten().topk(min(n, scores.numel()))
        return [(int(i) // scores.shape[1], int(i) % scores.shape[1], float(v)) for v, i in zip(values, index)]

    def to_json(self) -> dict:
        """``scores`` (role -> [layer][head]), ``top`` (role -> [layer, head, score] of the top five),
        ``repeated_loss`` (``first_half``, ``second_half``; when measured) and ``rows``."""
        out = {
            "scores": {role: getattr(self, role).tolist() for role in ROLES},
            "top": {role: [list(t) for t in self.top(role)] for role in ROLES},
        }
        if self.repeated_loss is not None:
            first, second = self.repeated_loss
            out["repeated_loss"] = {"first_half": first, "second_half": second}
        out["rows"] = self.rows()
        return out

    def text(self) -> str:
        if self.repeated_loss is None:
            return ""
        first, second = self.repeated_loss
        return (
            f"Next-token loss on repeated random tokens: {first:.2f} nats on the first half, "
            f"{second:.2f} on the repeat."
        )

    def tables(self) -> list[Table]:
        """The top five heads of each role."""
        rows = [
            {"role": role, "top heads": ", ".join(f"{layer}.{head} ({score:.2f})" for layer, head, score in top)}
            for role, top in ((role, self.top(role)) for role in ROLES)
        ]
        return [Table("top heads (layer.head)", rows)]

    def figures(self) -> list[Figure]:
        """One layer x head heatmap per role, named ``heads_<role>``."""
        figures = []
        for role in ROLES:
            grid = getattr(self, role).tolist()
            figures.append(
                Figure(
                    f"heads_{role}",
                    "heatmap",
                    _TITLES[role],
                    "head",
                    "layer",
                    z=grid,
                    x=list(range(len(grid[0]))),
                    y=list(range(len(grid))),
                    value_label="score",
                )
            )
        return figures


def repeated_tokens(model: Model, batch: int = 8, length: int = 30, seed: int = 0) -> Tensor:
    """``[batch, 1 + 2 * length]`` (or without BOS if the model has none): BOS, R, R."""
    g = torch.Generator().manual_seed(seed)
    low, high = plain_token_range(model)
    r = torch.randint(low, high, (batch, length), generator=g)
    bos = torch.tensor(model.bos_ids(), dtype=torch.long).expand(batch, -1)
    return torch.cat([bos, r, r], dim=1)


def head_roles(model: Model, batch: int = 8, length: int = 30, seed: int = 0, loss: bool = False) -> HeadRoles:
    """Induction, previous-token and duplicate-token scores of every head on ``batch``
    sequences BOS R R (R: ``length`` random tokens); with ``loss``, also :func:`repeated_loss`
    on the same sequences."""
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
    return HeadRoles(**scores, repeated_loss=repeated_loss(model, batch, length, seed) if loss else None)


def repeated_loss(model: Model, batch: int = 8, length: int = 30, seed: int = 0) -> tuple[float, float]:
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

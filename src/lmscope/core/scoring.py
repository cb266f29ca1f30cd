"""Scoring token sequences by their log-probability under the model (teacher forcing).

One helper for every scorer of continuations: the Temporal Heads recall
(:mod:`lmscope.temporal.recall`, candidates after a prompt) and the whole-answer scores of prompt
pairs (:func:`lmscope.circuits.pairs.answer_logprobs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.interventions import Intervention
from lmscope.core.model import Model


def padded(model: Model, sequences: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    """Token sequences as one right-padded batch: ``input_ids`` and ``attention_mask``
    [n, longest], on the model's device (padding with the pad token, else 0)."""
    pad = model.pad_id if model.pad_id is not None else 0
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device)}


def sequence_logprobs(
    model: Model,
    sequences: Sequence[Sequence[int]],
    *,
    starts: Sequence[int] | None = None,
    interventions: Sequence[Intervention] = (),
    batch_size: int = 32,
) -> Tensor:
    """Summed log-probability of each token sequence's tokens from ``starts[i]`` on (default 1:
    every token after the first), ``sum_{t >= start} log p(x_t | x_<t)``: float64 [n], on the CPU.
    With ``starts[i]`` the length of a prompt that begins sequence i, this is the log-probability
    of the continuation after it, teacher-forced. Sequences run sorted by length in right-padded
    batches of ``batch_size`` (padding masked out), with ``interventions`` applied."""
    if batch_size < 1:
        raise LmscopeError("batch_size must be at least 1")
    starts = [1] * len(sequences) if starts is None else list(starts)
    if len(starts) != len(sequences):
        raise LmscopeError(f"{len(starts)} starts for {len(sequences)} sequences")
    if any(not 1 <= s <= len(seq) for s, seq in zip(starts, sequences, strict=True)):
        raise LmscopeError("each start must be at least 1 and at most its sequence's length")
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = torch.zeros(len(sequences), dtype=torch.float64)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        inputs = padded(model, [sequences[i] for i in chunk])
        logits = model.run(inputs, interventions=interventions).logits
        logprobs = logits[:, :-1].float().log_softmax(-1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
        targets = torch.arange(1, logprobs.shape[1] + 1, device=logprobs.device)  # the index of each scored token
        first = torch.tensor([starts[i] for i in chunk], device=logprobs.device)
        keep = inputs["attention_mask"][:, 1:] * (targets[None] >= first[:, None])
        out[chunk] = (logprobs * keep).sum(-1).double().cpu()
    return out

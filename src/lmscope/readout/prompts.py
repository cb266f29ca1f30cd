"""What every readout takes in and hands back as text: answer tokens, the position read in each
prompt, prompts in batches, and token ids as strings.

Positions follow the convention of the whole package (and of :mod:`lmscope.core.interventions`):
an absolute index into the prompt's token sequence, negative from its end (``-1``: the last
token). Prompts are right-padded internally, so the index counts each prompt's own tokens: for
a batch given as ids with an attention mask, padding is not part of a prompt's sequence.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model

Token = int | str
Answers = Token | Sequence[Token | Sequence[Token]] | Tensor
Position = int | Sequence[int] | Tensor


def answer_ids(model: Model, answers: Answers, n_prompts: int) -> Tensor:
    """Answer token ids [n_prompts, n_answers] from one answer for every prompt, or one entry
    per prompt (an answer or a list of answers, the same number for every prompt). An answer is
    a token id or a string, tokenised without special tokens, of which the first token is used
    (give BPE tokenizers the leading space: ``" Arsenal"``)."""
    if isinstance(answers, Tensor):
        ids = answers.long().cpu()
        ids = ids.expand(n_prompts) if ids.ndim == 0 else ids
        ids = ids[:, None] if ids.ndim == 1 else ids
        if ids.ndim != 2 or ids.shape[0] != n_prompts:
            raise LmscopeError(
                f"answers: expected [{n_prompts}] or [{n_prompts}, n_answers], got {list(answers.shape)}"
            )
    elif _is_token(answers):
        ids = torch.tensor([[_token_id(model, answers)]] * n_prompts)
    else:
        entries = list(answers)
        if len(entries) != n_prompts:
            raise LmscopeError(f"answers: {len(entries)} entries for {n_prompts} prompts")
        rows = [[_token_id(model, a)] if _is_token(a) else [_token_id(model, t) for t in a] for a in entries]
        if len({len(r) for r in rows}) != 1 or not rows[0]:
            raise LmscopeError("answers: every prompt needs the same number of answers (at least one)")
        ids = torch.tensor(rows)
    vocab = model.module(model.family.unembed).weight.shape[0]
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise LmscopeError(f"answers: token ids must lie in [0, {vocab})")
    return ids


def _is_token(a) -> bool:
    return isinstance(a, str) or (not isinstance(a, Sequence) and not (isinstance(a, Tensor) and a.ndim > 0))


def _token_id(model: Model, a: Token) -> int:
    if not isinstance(a, str):
        return operator.index(a.item() if isinstance(a, Tensor) else a)
    if model.tokenizer is None:
        raise LmscopeError(f"model {model.name} has no tokenizer: give answers as token ids")
    ids = model.tokenizer(a, add_special_tokens=False)["input_ids"]
    if not ids:
        raise LmscopeError(f"answer {a!r} tokenises to no tokens")
    return int(ids[0])


def token_strings(model: Model, ids: Tensor) -> list:
    """Token ids [...] as nested lists of token strings of the same shape (the ids as strings
    without a tokenizer)."""
    if ids.ndim > 1:
        return [token_strings(model, row) for row in ids]
    if model.tokenizer is None:
        return [str(int(t)) for t in ids]
    return [model.tokenizer.decode([int(t)]) for t in ids]


def read_positions(mask: Tensor, position: Position) -> tuple[Tensor, Tensor]:
    """For a right-padded batch with attention ``mask`` [batch, pos]: the column of the batch to
    read [batch] and the position in each prompt's own sequence [batch] (non-negative).
    ``position``: one for every prompt or one per prompt, an index into the prompt's sequence,
    negative from its end."""
    lengths = mask.sum(1)
    pos = torch.as_tensor(position, dtype=torch.long, device=mask.device)
    pos = pos.expand(len(mask)) if pos.ndim == 0 else pos
    if pos.shape != lengths.shape:
        raise LmscopeError(f"position: one for every prompt or one per prompt ({len(mask)}), got {list(pos.shape)}")
    index = torch.where(pos < 0, lengths + pos, pos)
    if bool(((index < 0) | (index >= lengths)).any()):
        raise LmscopeError(f"position {position} out of range for prompts of {lengths.tolist()} tokens")
    count = mask.long().cumsum(1) - 1
    column = ((count == index[:, None]) & mask.bool()).long().argmax(1)
    return column, index


def batches(ids: Tensor, mask: Tensor, column: Tensor, batch_size: int) -> Iterator[tuple[slice, dict, Tensor]]:
    """Batches of at most ``batch_size`` prompts of ``ids``, ``mask`` [batch, pos], without the
    columns that are padding in all of them: ``(rows, inputs for Model.run, column to read)``."""
    if batch_size < 1:
        raise LmscopeError(f"batch_size must be at least 1, not {batch_size}")
    for start in range(0, len(ids), batch_size):
        rows = slice(start, start + batch_size)
        real = mask[rows].any(0).nonzero().flatten()
        lo, hi = int(real[0]), int(real[-1]) + 1
        yield rows, {"input_ids": ids[rows, lo:hi], "attention_mask": mask[rows, lo:hi]}, column[rows] - lo


def slug(name: str) -> str:
    """``name`` as a file-name part: runs of other characters than letters and digits become ``_``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "set"

"""What every readout takes in and hands back as text: answer tokens, the position read in each
prompt, prompts in batches, and token ids as strings.

Positions follow the convention of the whole package (and of :mod:`lmscope.core.interventions`):
an absolute index into the sequence the model is given, negative from its end (``-1``: the last
token). Prompts given as texts are each their own sequence (they are padded internally, which
does not move an index); a batch given as token ids [batch, pos] (with an attention mask) is
indexed by its columns, padding included, exactly as an intervention on that batch is, and a
position that falls on padding is refused.
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
    model.check_ids(ids, "answers", sequence=False)
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


def read_prompts(model: Model, prompts, position: Position) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(ids, mask, column, index)`` for reading ``prompts`` at ``position``: ids and mask
    [batch, pos] (texts right-padded), the column of the batch to read [batch] and that
    position's index among each prompt's own tokens [batch] (non-negative). ``position``: one
    for every prompt or one per prompt, in the module's convention (texts: an index into each
    text's tokens; token ids: an index into the given columns), negative from the end."""
    ids, mask = model.tokenize(prompts, padding_side="right")
    texts = isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and not isinstance(prompts, Tensor) and all(isinstance(p, str) for p in prompts)
    )
    return ids, mask, *read_positions(mask, position, own_tokens=texts)


def read_positions(mask: Tensor, position: Position, own_tokens: bool = False) -> tuple[Tensor, Tensor]:
    """For a batch with attention ``mask`` [batch, pos]: the column of the batch to read
    [batch] and the position among each prompt's own tokens [batch] (non-negative).
    ``position``: one for every prompt or one per prompt, an absolute index into the batch's
    columns, negative from its end; with ``own_tokens`` an index into each prompt's own tokens
    instead (a right-padded batch of separate texts)."""
    lengths = mask.sum(1)
    pos = torch.as_tensor(position, dtype=torch.long, device=mask.device)
    pos = pos.expand(len(mask)) if pos.ndim == 0 else pos
    if pos.shape != lengths.shape:
        raise LmscopeError(f"position: one for every prompt or one per prompt ({len(mask)}), got {list(pos.shape)}")
    count = mask.long().cumsum(1) - 1  # [batch, pos]: index among own tokens
    if own_tokens:
        index = torch.where(pos < 0, lengths + pos, pos)
        if bool(((index < 0) | (index >= lengths)).any()):
            raise LmscopeError(f"position {position} out of range for prompts of {lengths.tolist()} tokens")
        column = ((count == index[:, None]) & mask.bool()).long().argmax(1)
        return column, index
    width = mask.shape[1]
    column = torch.where(pos < 0, width + pos, pos)
    if bool(((column < 0) | (column >= width)).any()):
        raise LmscopeError(f"position {position} out of range for a batch of {width} positions")
    rows = torch.arange(len(mask), device=mask.device)
    if not bool(mask[rows, column].bool().all()):
        raise LmscopeError(f"position {position} falls on padding in some prompts (attention mask 0)")
    return column, count[rows, column]


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

"""Clean/corrupted prompt pairs: the one protocol every pair experiment follows.

Exact patching, attribution patching, EAP-IG (nodes and edges) and faithfulness all compare a
model on a *clean* prompt with a *corrupted* one that differs in what matters (Wang et al. 2022;
Heimersheim & Nanda 2024, "How to use and interpret activation patching"):

1. **Tokenise once, at the boundary**: :func:`tokenize_pairs` (or :func:`as_token_pairs`, which
   passes token pairs through) turns :class:`PromptPair` into :class:`TokenPair`; the analyses
   take token pairs. Prompts of different lengths need ``align="final"`` here, nowhere else.
2. **Bind the metric**: :func:`bind` gives a :class:`BoundMetric` that knows the pair and the
   clean run's next-token distribution (for KL), so callers pass logits only.
3. **Baselines**: the metric on the clean and on the corrupted prompt, per pair, averaged over
   pairs and checked to differ once: :class:`Baselines`.
4. **Normalise**: :meth:`Baselines.normalise`, so the corrupted run scores 0 and the clean run 1:
   ``(M - M(corrupt)) / (M(clean) - M(corrupt))``.

JSONL, one object per line::

    {"clean": "When Mary and John went to the store, John gave a drink to",
     "corrupt": "When Mary and John went to the store, Mary gave a drink to",
     "answer": " Mary", "wrong_answer": " John"}

``answer`` and ``wrong_answer`` may be lists of candidates; a prompt may also be a list of
token ids. Answers are scored by their first token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.jsonl import TEXT, TOKEN_ID, TOKEN_IDS, Kind, Schema, either, list_of, read_rows

if TYPE_CHECKING:
    from lmscope.circuits.metrics import Metric
    from lmscope.core.model import Model

Prompt = str | list[int]


@dataclass(frozen=True)
class PromptPair:
    clean: Prompt
    corrupt: Prompt
    answer: tuple[str | int, ...]
    wrong_answer: tuple[str | int, ...]
    where: str = field(default="", compare=False)  # the file and line it was read from, for errors


@dataclass
class TokenPair:
    """A tokenised pair: clean/corrupt ids [pos] (equal length) with attention masks, and
    candidate answer / wrong-answer token ids."""

    clean: Tensor
    corrupt: Tensor
    answer: Tensor
    wrong: Tensor
    clean_mask: Tensor
    corrupt_mask: Tensor

    def inputs(self, which: str, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """``{"input_ids", "attention_mask"}`` [1, pos] of the ``"clean"`` or ``"corrupt"`` prompt."""
        ids, mask = (self.clean, self.clean_mask) if which == "clean" else (self.corrupt, self.corrupt_mask)
        return {"input_ids": ids[None].to(device), "attention_mask": mask[None].to(device)}


PROMPT = either(TEXT, TOKEN_IDS)
ANSWER = Kind(
    "a non-empty string, a token id or a list of them", either(TEXT, TOKEN_ID, list_of(either(TEXT, TOKEN_ID))).test
)
PAIR = Schema({"clean": PROMPT, "corrupt": PROMPT, "answer": ANSWER, "wrong_answer": ANSWER})


def pair_from_dict(obj: object, where: str = "pair") -> PromptPair:
    """Validate one JSON object as a :class:`PromptPair` (:data:`PAIR`); errors name ``where``."""
    values = PAIR.check(obj, where)
    answers = [tuple(v) if isinstance(v, list) else (v,) for v in (values["answer"], values["wrong_answer"])]
    return PromptPair(values["clean"], values["corrupt"], *answers, where=where)


def load_pairs(path: str | Path) -> list[PromptPair]:
    """Read a prompt-pair JSONL file (:data:`PAIR` rows); errors name the file, line and field."""
    return [pair_from_dict(row.values, row.where) for row in read_rows(path, PAIR, what="prompt pairs")]


def _ids(tokenizer, prompt: Prompt) -> list[int]:
    if not isinstance(prompt, list) and tokenizer is None:
        raise LmscopeError("the model has no tokenizer: give prompts as token ids")
    return list(prompt) if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]


def _answer_ids(tokenizer, answers: tuple) -> Tensor:
    ids = []
    for a in answers:
        ids.append(a if isinstance(a, int) else tokenizer(a, add_special_tokens=False)["input_ids"][0])
    return torch.tensor(ids)


def tokenize_pairs(model: Model, pairs: Sequence[PromptPair], align: str = "strict") -> list[TokenPair]:
    """Tokenise pairs. Clean and corrupt prompts must have the same number of tokens, unless
    ``align="final"``: then the shorter one is left-padded so the final positions align."""
    if align not in ("strict", "final"):
        raise LmscopeError(f"align must be 'strict' or 'final', not '{align}'")
    tok = model.tokenizer
    out = []
    for i, p in enumerate(pairs):
        where = p.where or f"pair {i}"
        model.check_length([x for x in (p.clean, p.corrupt) if isinstance(x, str)], where)
        clean, corrupt = _ids(tok, p.clean), _ids(tok, p.corrupt)
        model.check_ids(clean, f"{where}: clean")
        model.check_ids(corrupt, f"{where}: corrupt")
        if len(clean) != len(corrupt) and align == "strict":
            raise LmscopeError(
                f"{where}: clean and corrupt prompts tokenise to {len(clean)} and {len(corrupt)} tokens; "
                "make them the same length or align on the final position (align='final', --align final)"
            )
        n = max(len(clean), len(corrupt))
        pad = model.pad_id or 0
        (c, cm), (k, km) = _left_pad(clean, n, pad), _left_pad(corrupt, n, pad)
        answer, wrong = _answer_ids(tok, p.answer), _answer_ids(tok, p.wrong_answer)
        model.check_ids(answer, f"{where}: answer", sequence=False)
        model.check_ids(wrong, f"{where}: wrong_answer", sequence=False)
        out.append(TokenPair(c, k, answer, wrong, cm, km))
    return out


def _left_pad(ids: list[int], n: int, pad: int) -> tuple[Tensor, Tensor]:
    """``ids`` left-padded to ``n`` tokens, and its attention mask."""
    missing = n - len(ids)
    return torch.tensor([pad] * missing + ids), torch.tensor([0] * missing + [1] * len(ids))


def as_token_pairs(model: Model, pairs: Sequence[PromptPair] | Sequence[TokenPair]) -> list[TokenPair]:
    """Token pairs as they are, or prompt pairs tokenised (of equal length: for pairs of different
    lengths call :func:`tokenize_pairs` with ``align="final"`` first)."""
    if not pairs:
        raise LmscopeError("no prompt pairs")
    if isinstance(pairs[0], TokenPair):
        return list(pairs)
    return tokenize_pairs(model, list(pairs))


# -- the metric, bound to a pair -----------------------------------------------------------------


@dataclass(frozen=True)
class BoundMetric:
    """A metric of one pair's final-position logits: ``bound(logits [K, vocab]) -> [K]``.

    ``clean_logprobs`` [vocab] is the clean run's next-token distribution (read by ``kl``)."""

    metric: Metric
    pair: TokenPair
    clean_logprobs: Tensor

    @property
    def name(self) -> str:
        return self.metric.name

    def __call__(self, logits: Tensor) -> Tensor:
        return self.metric(logits, self.pair, self.clean_logprobs)

    def of_residual(self, model: Model, resid: Tensor) -> Tensor:
        """The metric from final residual streams [K, d_model] (final norm and unembedding; only the
        answer rows of the unembedding when the metric reads nothing else)."""
        if not self.metric.answers_only:
            return self(model.unembed(resid))
        tokens = torch.cat([self.pair.answer, self.pair.wrong])
        n = len(self.pair.answer)
        local = TokenPair(
            self.pair.clean,
            self.pair.corrupt,
            torch.arange(n),
            torch.arange(n, len(tokens)),
            self.pair.clean_mask,
            self.pair.corrupt_mask,
        )
        return self.metric(model.unembed(resid, tokens), local, None)


def bind(metric: Metric, pair: TokenPair, clean_logits: Tensor) -> BoundMetric:
    """Bind ``metric`` to ``pair`` and its clean run's final-position logits [vocab] (or [1, vocab])."""
    return BoundMetric(metric, pair, clean_logits.reshape(-1).log_softmax(-1))


# -- baselines and normalisation -------------------------------------------------------------


@dataclass(frozen=True)
class Baselines:
    """The metric on the clean and on the corrupted prompts, averaged over pairs."""

    clean: float
    corrupt: float

    @classmethod
    def mean(cls, per_pair: Sequence[tuple[float, float]], *, check: bool = True) -> Baselines:
        """Average ``(clean, corrupt)`` values over pairs; with ``check``, a clear error when the two
        are equal (nothing to normalise by)."""
        n = len(per_pair)
        baselines = cls(sum(c for c, _ in per_pair) / n, sum(k for _, k in per_pair) / n)
        if check and baselines.clean == baselines.corrupt:
            raise LmscopeError(
                f"the metric is the same on clean and corrupted prompts ({baselines.clean:.4g}): nothing to patch"
            )
        return baselines

    def normalise(self, value, *, difference: bool = False):
        """``(value - corrupt) / (clean - corrupt)``: 0 for the corrupted run, 1 for the clean run; with
        ``difference``, ``value`` is already a change from the corrupted run (``value / (clean - corrupt)``).
        NaN when the baselines are equal. Works on floats and tensors."""
        span = self.clean - self.corrupt
        if span == 0:
            return value * math.nan
        return (value if difference else value - self.corrupt) / span

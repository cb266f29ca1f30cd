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
token ids.

**Answers of several tokens.** The metrics of :mod:`lmscope.circuits.metrics` read one
next-token distribution, at the final position, so patching, attribution and EAP-IG score each
answer by one token; which one is explicit, ``answer_token`` (:data:`ANSWER_TOKENS`): ``"first"``,
each answer's first token (:func:`shortened` counts the answers it shortened). Where a score needs
no patching, an answer is scored whole: :func:`answer_logprobs` is the log-probability of each
answer's full continuation after the clean and after the corrupted prompt (teacher-forced: the
answer's tokens appended to the prompt, each token's log-probability summed), and
:func:`answer_record` puts both, with the choice and the count, in a command's results.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.jsonl import TEXT, TOKEN_ID, TOKEN_IDS, Kind, Schema, either, list_of, read_rows
from lmscope.core.scoring import sequence_logprobs

if TYPE_CHECKING:
    from lmscope.circuits.metrics import Metric
    from lmscope.core.model import Model

Prompt = str | list[int]

# How an answer of several tokens meets a metric of one next token: name -> what it does.
ANSWER_TOKENS = {"first": "each answer's first token (answers of several tokens are counted and recorded)"}


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
    candidate answer / wrong-answer token ids (the token each is scored by, [n_candidates]).
    ``answer_tokens`` / ``wrong_tokens``: each candidate's whole tokenisation (empty: the
    candidates are the single tokens of ``answer`` / ``wrong``)."""

    clean: Tensor
    corrupt: Tensor
    answer: Tensor
    wrong: Tensor
    clean_mask: Tensor
    corrupt_mask: Tensor
    answer_tokens: tuple[tuple[int, ...], ...] = ()
    wrong_tokens: tuple[tuple[int, ...], ...] = ()

    def continuations(self, which: str = "answer") -> tuple[tuple[int, ...], ...]:
        """Every ``"answer"`` (or ``"wrong"``) candidate's whole token sequence."""
        whole = self.answer_tokens if which == "answer" else self.wrong_tokens
        return whole or tuple((int(t),) for t in (self.answer if which == "answer" else self.wrong))

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


def _answer_tokens(tokenizer, answers: tuple, what: str, where: str) -> tuple[tuple[int, ...], ...]:
    """Each candidate's tokens (a token id stands for itself); a one-line error for one that
    tokenises to nothing."""
    out = []
    for a in answers:
        ids = (a,) if isinstance(a, int) else tuple(tokenizer(a, add_special_tokens=False)["input_ids"])
        if not ids:
            raise LmscopeError(
                f"{where}: {what} {a!r} has no tokens (an answer must be a non-empty string or a token id)"
            )
        out.append(ids)
    return tuple(out)


def check_answer_token(answer_token: str) -> str:
    """``answer_token`` if the pair metrics support it (:data:`ANSWER_TOKENS`); else a one-line error."""
    if answer_token not in ANSWER_TOKENS:
        raise LmscopeError(
            f"answer token '{answer_token}' is not supported: the pair metrics (logit_diff, logprob, prob, kl) read "
            f"one next token at the final position; choose {', '.join(ANSWER_TOKENS)} "
            "(whole answers are scored by their log-probability in results.json's 'answers')"
        )
    return answer_token


def tokenize_pairs(
    model: Model, pairs: Sequence[PromptPair], align: str = "strict", answer_token: str = "first"
) -> list[TokenPair]:
    """Tokenise pairs. Clean and corrupt prompts must have the same number of tokens, unless
    ``align="final"``: then the shorter one is left-padded so the final positions align. Each
    answer candidate keeps its whole tokenisation and is scored by the token ``answer_token``
    picks (:data:`ANSWER_TOKENS`; ``"first"``: its first)."""
    if align not in ("strict", "final"):
        raise LmscopeError(f"align must be 'strict' or 'final', not '{align}'")
    check_answer_token(answer_token)
    if model.tokenizer is None and any(isinstance(a, str) for p in pairs for a in (*p.answer, *p.wrong_answer)):
        raise LmscopeError(f"model {model.name} has no tokenizer: give answers as token ids")
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
        answers = _answer_tokens(tok, p.answer, "answer", where)
        wrong = _answer_tokens(tok, p.wrong_answer, "wrong_answer", where)
        for name, candidates in (("answer", answers), ("wrong_answer", wrong)):
            for ids in candidates:
                model.check_ids(list(ids), f"{where}: {name}", sequence=False)
        first = lambda candidates: torch.tensor([ids[0] for ids in candidates])
        out.append(TokenPair(c, k, first(answers), first(wrong), cm, km, answers, wrong))
    return out


def _all_candidates(pairs: Sequence[TokenPair]) -> list[tuple[int, ...]]:
    return [ids for p in pairs for ids in (*p.continuations("answer"), *p.continuations("wrong"))]


def shortened(pairs: Sequence[TokenPair]) -> int:
    """How many answer and wrong-answer candidates have several tokens (a metric of one next
    token scores each by one of them)."""
    return sum(len(ids) > 1 for ids in _all_candidates(pairs))


def answer_logprobs(model: Model, pairs: Sequence[TokenPair], batch_size: int = 32) -> Tensor:
    """The log-probability of each pair's answer, whole, after the clean and after the corrupted
    prompt: ``[n_pairs, 2]`` float64 (clean, corrupt). An answer's log-probability is the sum of
    its tokens' log-probabilities with the tokens appended to the prompt (teacher forcing,
    :func:`lmscope.core.scoring.sequence_logprobs`); with several candidates, the log of their
    total probability (as the ``logprob`` metric)."""
    sequences, starts, layout = [], [], []
    for p in pairs:
        for ids, mask in ((p.clean, p.clean_mask), (p.corrupt, p.corrupt_mask)):
            prompt = ids[mask.bool()].tolist()
            layout.append(len(sequences))
            for answer in p.continuations("answer"):
                sequences.append(prompt + list(answer))
                starts.append(len(prompt))
    layout.append(len(sequences))
    scores = sequence_logprobs(model, sequences, starts=starts, batch_size=batch_size)
    per_prompt = [torch.logsumexp(scores[a:b], 0) for a, b in itertools.pairwise(layout)]
    return torch.stack(per_prompt).reshape(len(pairs), 2)


def answer_record(model: Model, pairs: Sequence[TokenPair], answer_token: str = "first") -> dict:
    """How the pairs' answers were scored, for a command's results: the ``answer_token`` choice,
    the number of candidates and of those it shortened (:func:`shortened`), and the mean
    whole-answer log-probability after the clean and the corrupted prompts (:func:`answer_logprobs`)."""
    with torch.no_grad():
        whole = answer_logprobs(model, pairs).mean(0)
    return {
        "answer_token": answer_token,
        "candidates": len(_all_candidates(pairs)),
        "shortened": shortened(pairs),
        "whole_answer_logprob": {"clean": float(whole[0]), "corrupt": float(whole[1])},
    }


def shortened_note(pairs: Sequence[TokenPair], answer_token: str = "first") -> str | None:
    """One line saying how many answers ``answer_token`` shortened, or None when none."""
    k = shortened(pairs)
    if not k:
        return None
    n = len(_all_candidates(pairs))
    return (
        f"note: {k} of {n} answers have several tokens; the metric scores each by its {answer_token} token "
        "(--answer-token); their whole log-probability is in results.json's 'answers'"
    )


def _left_pad(ids: list[int], n: int, pad: int) -> tuple[Tensor, Tensor]:
    """``ids`` left-padded to ``n`` tokens, and its attention mask."""
    missing = n - len(ids)
    return torch.tensor([pad] * missing + ids), torch.tensor([0] * missing + [1] * len(ids))


def prompt_batch(model: Model, pairs: Sequence[TokenPair], which: str) -> dict[str, Tensor]:
    """The ``"clean"`` or ``"corrupt"`` prompts of ``pairs`` as one batch ``{"input_ids",
    "attention_mask"}`` [n, longest], left-padded so position -1 is every prompt's final token."""
    rows = [p.inputs(which) for p in pairs]
    n = max(r["input_ids"].shape[1] for r in rows)
    pad = lambda x, value: torch.nn.functional.pad(x, (n - x.shape[1], 0), value=value)
    return {
        "input_ids": torch.cat([pad(r["input_ids"], model.pad_id or 0) for r in rows]).to(model.device),
        "attention_mask": torch.cat([pad(r["attention_mask"], 0) for r in rows]).to(model.device),
    }


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

"""Prompt-pair tasks for circuit discovery: JSONL datasets and built-in generators.

A pair is a clean prompt, a corrupted prompt, the answer the clean prompt should get and
a wrong answer (the corrupted prompt's answer, usually). JSONL, one object per line::

    {"clean": "When Mary and John went to the store, John gave a drink to",
     "corrupt": "When Mary and John went to the store, Mary gave a drink to",
     "answer": " Mary", "wrong_answer": " John"}

``answer`` and ``wrong_answer`` may be lists of candidates; a prompt may also be a list of
token ids. Answers are scored by their first token.

Generators: :func:`ioi` (indirect object identification, Wang et al. 2022), :func:`induction`
(repeated random tokens, Olsson et al. 2022), :func:`capitals` (factual recall).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.jsonl import read_jsonl

Prompt = str | list[int]


@dataclass(frozen=True)
class PromptPair:
    clean: Prompt
    corrupt: Prompt
    answer: tuple[str | int, ...]
    wrong_answer: tuple[str | int, ...]


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


def _candidates(value, what: str, where: str) -> tuple:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in values):
        raise LmscopeError(f"{where}: '{what}' must be a string or a list of strings")
    return tuple(values)


def _prompt(value, what: str, where: str) -> Prompt:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
        return value
    raise LmscopeError(f"{where}: '{what}' must be a non-empty string or a list of token ids")


def pair_from_dict(obj: dict, where: str = "pair") -> PromptPair:
    """Validate one JSON object as a :class:`PromptPair`."""
    if not isinstance(obj, dict):
        raise LmscopeError(f"{where}: expected a JSON object")
    missing = [k for k in ("clean", "corrupt", "answer", "wrong_answer") if k not in obj]
    if missing:
        raise LmscopeError(f"{where}: missing {', '.join(missing)}")
    return PromptPair(
        clean=_prompt(obj["clean"], "clean", where),
        corrupt=_prompt(obj["corrupt"], "corrupt", where),
        answer=_candidates(obj["answer"], "answer", where),
        wrong_answer=_candidates(obj["wrong_answer"], "wrong_answer", where),
    )


def load_pairs(path: str | Path) -> list[PromptPair]:
    """Read a prompt-pair JSONL file; errors name the file and line."""
    pairs = [pair_from_dict(obj, where) for where, obj in read_jsonl(path)]
    if not pairs:
        raise LmscopeError(f"{path}: no prompt pairs")
    return pairs


def _ids(tokenizer, prompt: Prompt) -> list[int]:
    return list(prompt) if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]


def _answer_ids(tokenizer, answers: tuple) -> Tensor:
    ids = []
    for a in answers:
        ids.append(a if isinstance(a, int) else tokenizer(a, add_special_tokens=False)["input_ids"][0])
    return torch.tensor(ids)


def tokenize_pairs(model, pairs: list[PromptPair], align: str = "strict") -> list[TokenPair]:
    """Tokenise pairs. Clean and corrupt prompts must have the same number of tokens, unless
    ``align="final"``: then the shorter one is left-padded so the final positions align."""
    if align not in ("strict", "final"):
        raise LmscopeError(f"align must be 'strict' or 'final', not '{align}'")
    tok = model.tokenizer
    out = []
    for i, p in enumerate(pairs):
        clean, corrupt = _ids(tok, p.clean), _ids(tok, p.corrupt)
        if len(clean) != len(corrupt) and align == "strict":
            raise LmscopeError(
                f"pair {i}: clean and corrupt prompts tokenise to {len(clean)} and {len(corrupt)} tokens; "
                "make them the same length or align on the final position (align='final', --align final)"
            )
        n = max(len(clean), len(corrupt))
        pad = model._pad_id() or 0
        (c, cm), (k, km) = _left_pad(clean, n, pad), _left_pad(corrupt, n, pad)
        out.append(TokenPair(c, k, _answer_ids(tok, p.answer), _answer_ids(tok, p.wrong_answer), cm, km))
    return out


def _left_pad(ids: list[int], n: int, pad: int) -> tuple[Tensor, Tensor]:
    """``ids`` left-padded to ``n`` tokens, and its attention mask."""
    missing = n - len(ids)
    return torch.tensor([pad] * missing + ids), torch.tensor([0] * missing + [1] * len(ids))


# -- generators ----------------------------------------------------------------------------

_NAMES = [
    "Mary",
    "John",
    "Tom",
    "James",
    "Paul",
    "Mark",
    "Kate",
    "Anna",
    "Sarah",
    "David",
    "Michael",
    "Lisa",
    "Peter",
    "Emma",
    "Daniel",
    "Laura",
    "Robert",
    "Alice",
    "George",
    "Jane",
    "Chris",
    "Rachel",
    "Steve",
    "Linda",
    "Martin",
    "Helen",
    "Frank",
    "Susan",
    "Andrew",
    "Karen",
]
_PLACES = ["store", "park", "school", "office", "garden", "hospital", "station", "market", "beach", "library"]
_OBJECTS = ["drink", "book", "ball", "letter", "gift", "key", "bag", "phone", "ring", "flower"]
_IOI_TEMPLATES = [
    "When {A} and {B} went to the {place}, {S} gave a {obj} to",
    "After {A} and {B} went to the {place}, {S} gave a {obj} to",
    "When {A} and {B} arrived at the {place}, {S} handed a {obj} to",
    "Then, {A} and {B} had a long day at the {place}. {S} gave a {obj} to",
]


def _single_token(tokenizer, words: list[str]) -> list[str]:
    return [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def ioi(model, n: int = 40, seed: int = 0) -> list[PromptPair]:
    """Indirect object identification (Wang et al. 2022): "When Mary and John went to the
    store, John gave a drink to" -> " Mary". The corrupted prompt repeats the other name
    ("..., Mary gave a drink to"), which flips the answer to " John"."""
    rng = random.Random(seed)
    tok = model.tokenizer
    names = _single_token(tok, _NAMES)
    places, objects = _single_token(tok, _PLACES), _single_token(tok, _OBJECTS)
    pairs = []
    for i in range(n):
        io, s = rng.sample(names, 2)
        first, second = (io, s) if i % 2 == 0 else (s, io)  # balance where the indirect object stands
        template = _IOI_TEMPLATES[i % len(_IOI_TEMPLATES)]
        fill = {"A": first, "B": second, "place": rng.choice(places), "obj": rng.choice(objects)}
        clean = template.format(S=s, **fill)
        corrupt = template.format(S=io, **fill)
        pairs.append(PromptPair(clean, corrupt, (" " + io,), (" " + s,)))
    return pairs


def induction(model, n: int = 10, length: int = 20, seed: int = 0) -> list[PromptPair]:
    """Induction (Olsson et al. 2022): a random token sequence R repeated, ``R R[:-1]``; the
    answer is ``R[-1]``, copied from the first half. The corrupted prompt replaces the first
    half by other random tokens (nothing to copy); the wrong answer is the corrupted first
    half's last token."""
    rng = torch.Generator().manual_seed(seed)
    low, high = _plain_token_range(model)
    bos = _bos(model)
    pairs = []
    for _ in range(n):
        r = torch.randint(low, high, (length,), generator=rng).tolist()
        other = torch.randint(low, high, (length,), generator=rng).tolist()
        pairs.append(PromptPair(bos + r + r[:-1], bos + other + r[:-1], (r[-1],), (other[-1],)))
    return pairs


def _bos(model) -> list[int]:
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    return [] if bos is None else [bos]


def _plain_token_range(model) -> tuple[int, int]:
    """Token ids to draw random sequences from: skip the first 1000 (special and byte tokens)."""
    return min(1000, model.d_vocab // 4), model.d_vocab


_CAPITALS = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Japan", "Tokyo"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Russia", "Moscow"),
    ("Egypt", "Cairo"),
    ("England", "London"),
    ("Greece", "Athens"),
    ("China", "Beijing"),
    ("Canada", "Ottawa"),
    ("Austria", "Vienna"),
    ("Poland", "Warsaw"),
    ("Ireland", "Dublin"),
    ("Norway", "Oslo"),
]


def capitals(model, n: int = 10) -> list[PromptPair]:
    """Capital-city recall: "The capital of France is" -> " Paris"; the corrupted prompt names
    another country of the same token length, whose capital is the wrong answer."""
    tok = model.tokenizer
    template = "The capital of {} is"
    length = lambda c: len(tok(template.format(c))["input_ids"])
    items = _CAPITALS[:n]
    pairs = []
    for i, (country, capital) in enumerate(items):
        others = [(c, k) for c, k in _CAPITALS if c != country and length(c) == length(country)]
        if not others:
            continue
        other, other_capital = others[i % len(others)]
        pairs.append(
            PromptPair(template.format(country), template.format(other), (" " + capital,), (" " + other_capital,))
        )
    return pairs


GENERATORS = {"ioi": ioi, "induction": induction, "capitals": capitals}


def builtin(model, name: str) -> list[PromptPair]:
    """A built-in task's pairs by name."""
    if name not in GENERATORS:
        raise LmscopeError(f"unknown task '{name}' (built-in: {', '.join(GENERATORS)})")
    return GENERATORS[name](model)

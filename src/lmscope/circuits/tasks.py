"""Prompt-pair tasks for circuit discovery: JSONL datasets and built-in generators.

A pair is a clean prompt, a corrupted prompt, the answer the clean prompt should get and
a wrong answer (the corrupted prompt's answer, usually). JSONL, one object per line::

    {"clean": "When Mary and John went to the store, John gave a drink to",
     "corrupt": "When Mary and John went to the store, Mary gave a drink to",
     "answer": " Mary", "wrong_answer": " John"}

``answer`` and ``wrong_answer`` may be lists of candidates; a prompt may also be a list of
token ids. The metrics score an answer of several tokens by its first (``answer_token``, see
:mod:`lmscope.circuits.pairs`).

Reading and tokenising pairs is :mod:`lmscope.circuits.pairs` (``load_pairs``, ``tokenize_pairs``
and the pair types are re-exported here). Generators: :func:`ioi` (indirect object identification, Wang et al. 2022), :func:`induction`
(repeated random tokens, Olsson et al. 2022), :func:`capitals` (factual recall).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from lmscope.circuits.pairs import PromptPair, TokenPair, load_pairs, tokenize_pairs
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model

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
    low, high = plain_token_range(model)
    bos = model.bos_ids()
    pairs = []
    for _ in range(n):
        r = torch.randint(low, high, (length,), generator=rng).tolist()
        other = torch.randint(low, high, (length,), generator=rng).tolist()
        pairs.append(PromptPair(bos + r + r[:-1], bos + other + r[:-1], (r[-1],), (other[-1],)))
    return pairs


def plain_token_range(model) -> tuple[int, int]:
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


def pairs_for(
    model: Model, data: str | Path | None = None, task: str | None = None, n: int | None = None
) -> list[PromptPair]:
    """The prompt pairs of exactly one of ``data`` (a JSONL file, :func:`load_pairs`) or
    ``task`` (a built-in task of :data:`GENERATORS`: its default pairs, or ``n`` of them)."""
    if (data is None) == (task is None):
        raise LmscopeError("give exactly one of --data pairs.jsonl or --task ioi|induction|capitals")
    if data is not None:
        return load_pairs(data)
    if n is None:
        return builtin(model, task)
    if task not in GENERATORS:
        builtin(model, task)  # raises the unknown-task error
    return GENERATORS[task](model, n=n)


__all__ = [
    "GENERATORS",
    "PromptPair",
    "TokenPair",
    "builtin",
    "capitals",
    "induction",
    "ioi",
    "load_pairs",
    "pairs_for",
    "plain_token_range",
    "tokenize_pairs",
]

"""Text corpora for activation statistics and perplexity: tokenise once, cut into windows.

A corpus is a plain text file, a JSONL file with a text field, or the bundled WikiText-2
test split (``"wikitext2"``; Merity et al. 2016, CC BY-SA 3.0, see
``lmscope/data/wikitext-2/README.md``). The whole text is tokenised once, without special
tokens, and cut into fixed-length windows that are batched for the forward passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.jsonl import STRING, Schema, read_rows, read_text

BUNDLED = {"wikitext2": "wikitext-2/test.txt"}


@dataclass(frozen=True)
class Corpus:
    """A tokenised corpus: ``tokens`` is one long [n_tokens] sequence of token ids."""

    name: str
    tokens: Tensor

    def __len__(self) -> int:
        return self.tokens.numel()

    def head(self, n: int) -> Corpus:
        """The first ``n`` tokens."""
        return Corpus(self.name, self.tokens[:n])

    def windows(self, length: int, stride: int | None = None) -> Tensor:
        """Windows of ``length`` tokens starting every ``stride`` tokens (default: ``length``,
        no overlap), dropping a last window shorter than ``length``: [n_windows, length]."""
        stride = length if stride is None else stride
        if length < 1 or stride < 1:
            raise LmscopeError("window length and stride must be positive")
        if len(self) < length:
            raise LmscopeError(f"corpus {self.name} has {len(self)} tokens, fewer than one window of {length}")
        return self.tokens.unfold(0, length, stride)

    def batches(self, length: int, batch_size: int) -> Iterator[Tensor]:
        """Non-overlapping windows of ``length`` tokens in batches: each [<= batch_size, length]."""
        yield from self.windows(length).split(batch_size)


def corpus_text(source: str | Path, text_field: str = "text") -> tuple[str, str]:
    """``(name, text)`` of a bundled corpus name, a .jsonl file (``text_field`` of every line,
    joined by blank lines) or any other UTF-8 text file; a missing, unreadable, binary or empty
    file is a one-line error naming it."""
    if str(source) in BUNDLED:
        path = resources.files("lmscope") / "data" / BUNDLED[str(source)]
        return str(source), path.read_text(encoding="utf-8")
    path = Path(source)
    if not path.exists():
        known = ", ".join(BUNDLED)
        raise LmscopeError(f"corpus not found: {source} (a text or JSONL file, or one of: {known})")
    if path.suffix == ".jsonl":
        rows = read_rows(path, Schema({text_field: STRING}), what="texts")
        text = "\n\n".join(row.values[text_field] for row in rows)
    else:
        text = read_text(path, "corpus")
    if not text.strip():
        raise LmscopeError(f"corpus {path}: no text (an empty or blank file)")
    return path.name, text


def check_corpus(source: str | Path, text_field: str = "text") -> None:
    """Read a corpus file through :func:`corpus_text` (a bundled name passes), so that settings
    naming a bad one fail before any model loads."""
    if str(source) not in BUNDLED:
        corpus_text(source, text_field)


def load_corpus(
    model, source: str | Path = "wikitext2", *, max_tokens: int | None = None, text_field: str = "text"
) -> Corpus:
    """Tokenise ``source`` (see :func:`corpus_text`) with ``model``'s tokenizer, keeping the
    first ``max_tokens`` tokens. Only a prefix of the text is tokenised when that suffices."""
    if model.tokenizer is None:
        raise LmscopeError(f"model {model.name} has no tokenizer: a corpus needs one")
    if max_tokens is not None and max_tokens < 1:
        raise LmscopeError(f"max_tokens must be positive, got {max_tokens}")
    name, text = corpus_text(source, text_field)
    ids = _tokenize_prefix(model.tokenizer, text, max_tokens)
    return Corpus(name, torch.tensor(ids[:max_tokens], dtype=torch.long))


def _tokenize_prefix(tokenizer, text: str, max_tokens: int | None) -> list[int]:
    chars = len(text) if max_tokens is None else 8 * max_tokens
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        # A cut mid-word changes the last few tokens only: keep a margin past max_tokens.
        if max_tokens is None or len(ids) > max_tokens + 16 or chars >= len(text):
            return ids
        chars *= 2

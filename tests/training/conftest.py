"""Fixtures of the training tests: a small word-level tokenizer and short training and evaluation
texts (slices of the bundled WikiText-2 validation and test splits), so tiny models train in
milliseconds per step."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lmscope.training import PretrainSettings

VOCAB = 300


def _bundled(name: str, chars: int) -> str:
    return (resources.files("lmscope") / "data" / "wikitext-2" / name).read_text(encoding="utf-8")[:chars]


@pytest.fixture(scope="session")
def texts(tmp_path_factory) -> dict[str, Path]:
    """``train`` (40k characters of the validation split) and ``eval`` (20k of the test split) files."""
    root = tmp_path_factory.mktemp("texts")
    paths = {"train": root / "train.txt", "eval": root / "eval.txt"}
    paths["train"].write_text(_bundled("valid.txt", 40_000), encoding="utf-8")
    paths["eval"].write_text(_bundled("test.txt", 20_000), encoding="utf-8")
    return paths


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, texts) -> Path:
    """A word-level tokenizer of the training text's 300 most frequent words (``<unk>``, ``<s>``,
    ``</s>`` first), saved in Hugging Face format."""
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(
        [texts["train"].read_text()],
        trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"]),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_settings(texts, tokenizer_dir) -> PretrainSettings:
    """2 layers, d_model 64, 2 heads, windows of 32 tokens, batches of 2, 6 steps; logs and
    checkpoints every 2 steps."""
    return PretrainSettings(
        d_model=64, n_layers=2, n_heads=2, seq_len=32, batch_size=2, steps=6, log_every=2, checkpoint_every=2,
        corpus=str(texts["train"]), eval_corpus=str(texts["eval"]), tokenizer=str(tokenizer_dir),
        eval_tokens=1024, kurtosis_tokens=64, lr=1e-2,
    )  # fmt: skip

"""A tiny Llama with a planted feature direction ``u`` (known by construction).

Every token embedding and every unembedding row is made orthogonal to ``u``; then the word
``good`` gets ``+alpha u`` and ``bad`` gets ``-alpha u`` in its embedding, and the answer words
``P`` and ``N`` get ``+beta u`` and ``-beta u`` in their unembedding rows. A text ending in
``good`` or ``bad`` carries its label along ``u`` at its last position (the random layers add
little: initial weights have std 0.02), and adding ``c u`` to the last residual stream raises
``logit(P) - logit(N)`` for ``c > 0`` and lowers it for ``c < 0``: steering along ``u`` moves
the output as designed.
"""

from __future__ import annotations

import functools
import random

import torch
import transformers as T

import lmscope
from lmscope.steering.directions import Examples
from tests.helpers import word_tokenizer

FILLER = [f"w{i}" for i in range(20)]
WORDS = ["<pad>", "<bos>", "<eos>", "good", "bad", "P", "N", *FILLER]


@functools.cache
def planted(alpha: float = 4.0, beta: float = 4.0, seed: int = 0) -> tuple[lmscope.Model, torch.Tensor]:
    """The model and its unit direction ``u`` [32] (cached: tests must not modify it)."""
    torch.manual_seed(seed)
    config = T.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    hf = T.LlamaForCausalLM(config).eval()
    u = torch.nn.functional.normalize(torch.randn(32), dim=0)
    ids = {w: i for i, w in enumerate(WORDS)}
    with torch.no_grad():
        for weight, plant in ((hf.model.embed_tokens.weight, {"good": alpha, "bad": -alpha}),
                              (hf.lm_head.weight, {"P": beta, "N": -beta})):  # fmt: skip
            weight -= (weight @ u)[:, None] * u
            for word, scale in plant.items():
                weight[ids[word]] += scale * u
    return lmscope.Model(hf, tokenizer=word_tokenizer(WORDS), source="planted direction", name="tiny-planted"), u


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` random filler sentences of 2 to 5 words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 5))) for _ in range(n)]


def pairs(n: int = 24, seed: int = 0) -> Examples:
    """Contrastive pairs ``(s good, s bad)`` over random filler sentences ``s``."""
    return Examples.from_pairs([(f"{s} good", f"{s} bad") for s in sentences(n, seed)])

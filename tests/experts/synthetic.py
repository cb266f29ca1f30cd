"""A tiny mixture-of-experts model trained on two synthetic domains whose experts are known.

Two domains with disjoint vocabularies (``a0..a23`` and ``b0..b23``); in each, the next token is
a fixed random permutation of the current one with probability 0.9, else any token of the
domain. The model is a 2-layer Mixtral (8 experts, top-2) in which only the experts compute:

* **Planted routing.** A random direction ``u`` is added to the embeddings of domain A's tokens
  and subtracted from domain B's, and every router's rows for experts 0-3 are ``+c u`` and for
  4-7 ``-c u`` (plus their random init); routers are frozen. Domain A's tokens are routed to
  experts 0-3 and B's to 4-7: ground truth for specialisation.
* **Only the experts learn.** Attention is switched off (``o_proj`` zero and frozen) and the
  embedding and unembedding are frozen at their random values, so the permutations can only be
  learned by the experts: removing A's experts must break A and leave B exactly as it was.

Deterministic for a given seed (one thread); a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import functools

import torch
import transformers as T

import lmscope
from lmscope.core.corpus import Corpus
from tests.helpers import one_thread, word_tokenizer

N_WORDS = 24
SPECIALS = ["<pad>", "<bos>", "<eos>"]
WORDS = {d: [f"{d}{i}" for i in range(N_WORDS)] for d in ("a", "b")}
NAMES = SPECIALS + WORDS["a"] + WORDS["b"]
IDS = {d: list(range(len(SPECIALS) + k * N_WORDS, len(SPECIALS) + (k + 1) * N_WORDS)) for k, d in enumerate("ab")}
A_EXPERTS, B_EXPERTS = [0, 1, 2, 3], [4, 5, 6, 7]
SEED = 0


def _permutations() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    return {d: torch.tensor(IDS[d])[torch.randperm(N_WORDS, generator=g)] for d in "ab"}


PERM = _permutations()  # PERM[d][i]: the usual successor of domain d's i-th word


def sample(domain: str, n_tokens: int, seed: int) -> torch.Tensor:
    """``n_tokens`` token ids of ``domain``'s process: [n_tokens]."""
    g = torch.Generator().manual_seed(seed)
    ids, perm, base = [], PERM[domain], IDS[domain][0]
    cur = IDS[domain][int(torch.randint(N_WORDS, (1,), generator=g))]
    for _ in range(n_tokens):
        ids.append(cur)
        if float(torch.rand((), generator=g)) < 0.9:
            cur = int(perm[cur - base])
        else:
            cur = IDS[domain][int(torch.randint(N_WORDS, (1,), generator=g))]
    return torch.tensor(ids)


def corpus(domain: str, n_tokens: int = 2048, seed: int = 1) -> Corpus:
    """A held-out corpus of ``domain`` (named after it)."""
    return Corpus(domain, sample(domain, n_tokens, seed + (0 if domain == "a" else 1000)))


def text(domain: str, n_tokens: int = 2048, seed: int = 1) -> str:
    """The same corpus as words, for the CLI."""
    return " ".join(NAMES[i] for i in corpus(domain, n_tokens, seed).tokens.tolist())


def tokenizer() -> T.PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`NAMES` that adds no special tokens."""
    return word_tokenizer(NAMES)


def train(steps: int = 500, seq: int = 32, batch: int = 16, planted: float = 4.0, lr: float = 1e-2) -> lmscope.Model:
    """Train the model described in the module docstring on both domains (half of each batch)."""
    torch.manual_seed(SEED)
    config = T.MixtralConfig(
        vocab_size=len(NAMES), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    hf = T.MixtralForCausalLM(config)
    u = torch.nn.functional.normalize(torch.randn(32), dim=0)
    frozen = [hf.model.embed_tokens.weight, hf.lm_head.weight]
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        scale = planted * emb.norm(dim=-1).mean()
        emb[IDS["a"]] += scale * u
        emb[IDS["b"]] -= scale * u
        for layer in hf.model.layers:
            gate = layer.mlp.gate.weight  # [experts, d_model]
            gate[A_EXPERTS] += 4 * planted * u
            gate[B_EXPERTS] -= 4 * planted * u
            torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
            frozen += [gate, *layer.self_attn.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in hf.parameters() if p.requires_grad], lr=lr)
    hf.train()
    with one_thread():
        for step in range(steps):
            ids = torch.stack(
                [sample(d, seq, seed=10_000 + step * batch + i) for i, d in enumerate("ab" * (batch // 2))]
            )
            loss = hf(input_ids=ids, labels=ids, use_cache=False).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    hf.eval()
    return lmscope.Model(hf, tokenizer=tokenizer(), source="two synthetic domains", name="tiny-moe-domains")


@functools.cache
def trained_model() -> lmscope.Model:
    """:func:`train` with its defaults, once per process."""
    return train()


def save_model(model: lmscope.Model, directory) -> str:
    """The model and its tokenizer as a Hugging Face directory the CLI loads."""
    model.hf.save_pretrained(directory)
    model.tokenizer.save_pretrained(directory)
    return str(directory)

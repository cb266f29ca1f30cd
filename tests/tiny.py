"""Tiny random models, one per supported family, built from transformers config classes (no download)."""

from __future__ import annotations

import random

import torch
import transformers as T

import lmscope
from tests.families import SMALL

# The dense subset of the family matrix's sizes (tests/families.py).
_COMMON = {key: SMALL[key] for key in (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
)}  # fmt: skip
_GPT = {"vocab_size": 96, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

_NEOX = dict(
    **_GPT, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64
)

CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_COMMON),
    "mistral": lambda: T.MistralConfig(**_COMMON, sliding_window=5),
    "qwen2": lambda: T.Qwen2Config(**_COMMON),
    "qwen3": lambda: T.Qwen3Config(**_COMMON, head_dim=16),
    "gemma": lambda: T.GemmaConfig(**_COMMON, head_dim=16),
    "gemma2": lambda: T.Gemma2Config(**_COMMON, head_dim=16, sliding_window=5),
    "gemma3": lambda: T.Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=5),
    "phi3": lambda: T.Phi3Config(**_COMMON),
    "gpt2": lambda: T.GPT2Config(**_GPT, n_embd=64, n_layer=3, n_head=4, n_positions=64),
    "gpt_neox": lambda: T.GPTNeoXConfig(
        **_GPT,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
    ),
    "gpt_neox_serial": lambda: T.GPTNeoXConfig(
        **_GPT,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        use_parallel_residual=False,
    ),
    "olmo2": lambda: T.Olmo2Config(**_COMMON),
    "olmo2_mha": lambda: T.Olmo2Config(**{**_COMMON, "num_key_value_heads": 4}),
}


def tiny_model(name: str, seed: int = 0) -> lmscope.Model:
    """A randomly initialised model of family ``name``; norm weights are randomised too,
    so a test that confuses a norm's input with its output fails."""
    torch.manual_seed(seed)
    hf = T.AutoModelForCausalLM.from_config(CONFIGS[name]())
    with torch.no_grad():
        for module_name, p in hf.named_parameters():
            if "norm" in module_name or "ln_" in module_name:
                p.add_(0.3 * torch.randn_like(p))
            elif p.ndim == 2:
                p.mul_(5.0)  # larger weights so attention is not uniform
    hf.eval()
    return lmscope.Model(hf, tokenizer=None, source=f"tiny {name}", name=f"tiny-{name}")


def random_ids(model: lmscope.Model, batch: int = 2, pos: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.d_vocab, (batch, pos), generator=g)


def train_induction_model(steps: int = 1500, heads: int = 2, seed: int = 0) -> lmscope.Model:
    """A 2-layer attention-only transformer (Llama blocks with the MLP zeroed and frozen) trained
    on repeated random token sequences ``R R`` with the period varying from 5 to 15 tokens (so
    no fixed positional offset solves it), loss on the second half: it learns to copy in context."""
    from lmscope.circuits.head_roles import repeated_tokens

    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = T.LlamaConfig(
        vocab_size=48,
        hidden_size=64,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    hf = T.AutoModelForCausalLM.from_config(config)
    for layer in hf.model.layers:
        for p in layer.mlp.parameters():
            p.requires_grad_(False)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    model = lmscope.Model(hf, tokenizer=None, name="tiny-induction")
    opt = torch.optim.Adam([p for p in hf.parameters() if p.requires_grad], lr=1e-3)
    hf.train()
    for step in range(steps):
        n = rng.randint(5, 15)
        ids = repeated_tokens(model, batch=32, length=n, seed=1000 + step)
        logits = hf(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, n:-1].flatten(0, 1), ids[:, n + 1 :].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    hf.eval()
    return model

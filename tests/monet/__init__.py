"""A tiny Monet model (Park et al. 2025) for the tests: built from this package's own modeling
code, or saved as a remote-code checkpoint (``config.json`` with ``auto_map``, the modeling files
beside the weights, a word-level tokenizer) that ``from_pretrained(dir, trust_remote_code=True)``
loads offline, with the ``--families`` entry lmscope needs for it."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers as T

from tests.helpers import word_tokenizer
from tests.monet.configuration_monet import MonetConfig
from tests.monet.modeling_monet import MonetForCausalLM

HERE = Path(__file__).parent
VOCAB = ["<pad>", "<bos>", "<eos>", *(f"w{i}" for i in range(45))]

# The family entry of a --families file: Llama blocks whose MLP is Monet's experts module ``moe``,
# routed by ``router`` (on the first layer of each group of layers sharing it).
FAMILY_TOML = """\
[monet]
base = "llama"
mlp = "moe"
mlp_contrib = "moe"
monet_router = "router"
monet_experts = "moe"
"""


def tiny_config(**overrides) -> MonetConfig:
    """4 layers, d_model 32, 2 attention heads; 2 routing heads over 2 groups of 8 half-experts
    (64 product experts), top-2, routers shared by pairs of layers."""
    sizes = {
        "vocab_size": len(VOCAB),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "moe_dim": 8,
        "moe_heads": 2,
        "moe_experts": 8,
        "moe_topk": 2,
        "moe_groups": 2,
    }
    return MonetConfig(**{**sizes, **overrides})


def tiny_monet(seed: int = 0, **overrides) -> MonetForCausalLM:
    """A random tiny Monet (eval mode): weights scaled up so that routing and attention are not
    flat, norm weights, expert biases and the routers' batch-norm statistics random too."""
    torch.manual_seed(seed)
    hf = MonetForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 2 and name.rsplit(".", 1)[-1] in ("b", "b1", "b2"):
                p.copy_(0.5 * torch.randn_like(p))
            elif p.ndim == 2:
                p.mul_(4.0)
            elif "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
        for module in hf.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.copy_(0.1 * torch.randn_like(module.running_mean))
                module.running_var.copy_(0.2 + 0.2 * torch.rand_like(module.running_var))
    return hf


def tokenizer() -> T.PreTrainedTokenizerFast:
    """A word-level tokenizer of :data:`VOCAB` (``"w3 w4"`` -> ids 6, 7)."""
    return word_tokenizer(VOCAB)


def save_tiny_monet(directory: Path, seed: int = 0, **overrides) -> Path:
    """Save :func:`tiny_monet` to ``directory`` as a remote-code checkpoint; returns the directory."""
    directory = Path(directory)
    hf = tiny_monet(seed, **overrides)
    hf.config.auto_map = {
        "AutoConfig": "configuration_monet.MonetConfig",
        "AutoModelForCausalLM": "modeling_monet.MonetForCausalLM",
    }
    hf.save_pretrained(directory)
    for name in ("configuration_monet.py", "modeling_monet.py"):
        shutil.copy(HERE / name, directory / name)
    tokenizer().save_pretrained(directory)
    return directory

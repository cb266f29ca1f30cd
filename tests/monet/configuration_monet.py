"""Configuration of a small Monet model (Park et al., "Monet: Mixture of Monosemantic Experts for
Transformers", ICLR 2025, arXiv 2412.04139), loaded as remote code by the tests.

Llama's fields, plus Monet's (the names of the authors' released configs):

- ``moe_heads``: routing heads h (each routes on its own, the outputs are summed);
- ``moe_experts``: E, the half-experts of each of the two groups (E**2 product experts per layer);
- ``moe_topk``: k, how many half-experts each head keeps per group (by batch-norm thresholding);
- ``moe_dim``: m, the width of one expert's hidden layer (halved between the two half-experts in
  the vertical decomposition);
- ``moe_groups``: layers per shared router (layer L owns a router when ``L % moe_groups == 0``;
  the next ``moe_groups - 1`` layers reuse its routing);
- ``moe_decompose``: ``"vertical"`` (VD) or ``"horizontal"`` (HD).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class MonetConfig(LlamaConfig):
    model_type = "monet"

    hidden_act: str = "relu2"
    moe_dim: int = 8
    moe_heads: int = 8
    moe_experts: int = 512
    moe_topk: int = 32
    moe_groups: int = 4
    moe_decompose: str = "vertical"

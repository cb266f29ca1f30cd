"""A small Monet model, written for lmscope's tests from the paper's equations (Park et al.,
"Monet: Mixture of Monosemantic Experts for Transformers", ICLR 2025, arXiv 2412.04139, §3), and
loaded as remote code (``trust_remote_code=True``) as the authors' checkpoints are.

Blocks are Llama's (attention, RMSNorm) with Monet's mixture of experts in place of the MLP. With
``x`` the normalised residual stream [batch, pos, d_model], H routing heads and two groups of E
half-experts each:

- router (one per group of ``moe_groups`` layers, on the group's first layer; the others reuse its
  routing): per head h and group g, logits ``z_h = W^g_h x`` [E]; a batch norm per head gives
  z-scores ``n_h`` (running statistics at inference); with ``sigma = Phi^-1(1 - k / E)`` the logits
  whose z-score reaches ``min(max_i n_hi, sigma)`` are kept and ``g^g_h = softmax`` over them (0
  elsewhere): about k of E per head, at least one;
- experts: product expert (i, j) pairs half-expert i of group 1 with j of group 2, and the block
  returns ``sum_h sum_i sum_j g1_hi g2_hj E_ij(x)`` where, with ``act`` ReLU squared,

  - horizontal decomposition (HD): ``E_ij(x) = V_j act(U_i x + c_i) + b_j``;
  - vertical decomposition (VD): ``E_ij(x) = [V11_i a1_i + V12_i a2_j + b1_i ;
    V21_j a1_i + V22_j a2_j + b2_j]`` with ``a1_i = act(U1_i x + c1_i)``,
    ``a2_j = act(U2_j x + c2_j)`` (each m/2 wide; the two halves of the output are stacked).

  As in the paper, the sum is computed without enumerating the E^2 experts: the terms of one
  half-expert alone are weighted by ``sum_h g1_hi`` (or ``sum_h g2_hj``), using that each head's
  distribution over the other group sums to 1.
"""

from __future__ import annotations

import dataclasses
from statistics import NormalDist

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding

from .configuration_monet import MonetConfig

Routing = tuple[Tensor, Tensor]  # g1, g2: [batch, pos, heads, experts]


# transformers 5.24 renamed ``past_key_values`` to ``cache`` (arguments and outputs); generate
# passes and reads the new name, so this model takes and returns whichever its version uses
CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"


class MonetRouter(nn.Module):
    """The two routing distributions g1, g2 [batch, pos, heads, experts] of ``x`` [batch, pos, d_model]."""

    def __init__(self, config: MonetConfig):
        super().__init__()
        self.heads, self.experts, self.topk = config.moe_heads, config.moe_experts, config.moe_topk
        self.w1 = nn.Linear(config.hidden_size, self.heads * self.experts, bias=False)
        self.w2 = nn.Linear(config.hidden_size, self.heads * self.experts, bias=False)
        self.norm1 = nn.BatchNorm1d(self.heads, affine=False)
        self.norm2 = nn.BatchNorm1d(self.heads, affine=False)

    def forward(self, x: Tensor) -> Routing:
        return self._route(self.w1(x), self.norm1), self._route(self.w2(x), self.norm2)

    def _route(self, logits: Tensor, norm: nn.BatchNorm1d) -> Tensor:
        z = logits.unflatten(-1, (self.heads, self.experts)).float()  # [batch, pos, heads, experts]
        scores = norm(z.reshape(-1, self.heads, self.experts)).view_as(z)  # z-scores per head
        sigma = NormalDist().inv_cdf(1 - self.topk / self.experts)
        threshold = scores.amax(-1, keepdim=True).clamp(max=sigma)
        return z.masked_fill(scores < threshold, float("-inf")).softmax(-1)


class MonetVD(nn.Module):
    """Vertically decomposed experts: ``forward(x, g1, g2)`` -> ``sum_hij g1_hi g2_hj E_ij(x)``."""

    def __init__(self, config: MonetConfig):
        super().__init__()
        self.experts = config.moe_experts
        self.act = ACT2FN[config.hidden_act]
        width, half = config.moe_experts * config.moe_dim // 2, config.hidden_size // 2
        self.u1 = nn.Linear(config.hidden_size, width)
        self.u2 = nn.Linear(config.hidden_size, width)
        self.v11 = nn.Linear(width, half, bias=False)
        self.v12 = nn.Linear(width, half, bias=False)
        self.v21 = nn.Linear(width, half, bias=False)
        self.v22 = nn.Linear(width, half, bias=False)
        self.b1 = nn.Parameter(torch.zeros(config.moe_experts, half))
        self.b2 = nn.Parameter(torch.zeros(config.moe_experts, half))

    def forward(self, x: Tensor, g1: Tensor, g2: Tensor) -> Tensor:
        g1, g2 = g1.type_as(x), g2.type_as(x)
        a1 = self.act(self.u1(x).unflatten(-1, (self.experts, -1)))  # [batch, pos, E, m/2]
        a2 = self.act(self.u2(x).unflatten(-1, (self.experts, -1)))
        joint = torch.einsum("bthi,bthj->btij", g1, g2)  # sum_h g1_hi g2_hj
        r1, r2 = g1.sum(2), g2.sum(2)  # [batch, pos, E]
        top = (
            self.v11((a1 * r1[..., None]).flatten(-2))
            + self.v12(torch.einsum("btij,btjm->btim", joint, a2).flatten(-2))
            + r1 @ self.b1
        )
        bottom = (
            self.v21(torch.einsum("btij,btim->btjm", joint, a1).flatten(-2))
            + self.v22((a2 * r2[..., None]).flatten(-2))
            + r2 @ self.b2
        )
        return torch.cat([top, bottom], dim=-1)


class MonetHD(nn.Module):
    """Horizontally decomposed experts: ``forward(x, g1, g2)`` -> ``sum_hij g1_hi g2_hj E_ij(x)``."""

    def __init__(self, config: MonetConfig):
        super().__init__()
        self.experts = config.moe_experts
        self.act = ACT2FN[config.hidden_act]
        width = config.moe_experts * config.moe_dim
        self.u = nn.Linear(config.hidden_size, width)
        self.v = nn.Linear(width, config.hidden_size, bias=False)
        self.b = nn.Parameter(torch.zeros(config.moe_experts, config.hidden_size))

    def forward(self, x: Tensor, g1: Tensor, g2: Tensor) -> Tensor:
        g1, g2 = g1.type_as(x), g2.type_as(x)
        a = self.act(self.u(x).unflatten(-1, (self.experts, -1)))  # [batch, pos, E, m]
        joint = torch.einsum("bthi,bthj->btij", g1, g2)
        return self.v(torch.einsum("btij,btim->btjm", joint, a).flatten(-2)) + g2.sum(2) @ self.b


class MonetDecoderLayer(nn.Module):
    def __init__(self, config: MonetConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.moe = MonetVD(config) if config.moe_decompose == "vertical" else MonetHD(config)
        if layer_idx % config.moe_groups == 0:
            self.router = MonetRouter(config)

    def forward(
        self,
        hidden_states: Tensor,
        routing: Routing | None = None,
        attention_mask: Tensor | None = None,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[Tensor, Routing]:
        """The layer's output and the routing it used (its own router's, or ``routing``)."""
        attn, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            **{CACHE: cache},
            **kwargs,
        )
        hidden_states = hidden_states + attn
        x = self.post_attention_layernorm(hidden_states)
        if hasattr(self, "router"):
            routing = self.router(x)
        return hidden_states + self.moe(x, *routing), routing


class MonetPreTrainedModel(PreTrainedModel):
    config: MonetConfig
    config_class = MonetConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MonetVD):
            init.zeros_(module.b1)
            init.zeros_(module.b2)
        elif isinstance(module, MonetHD):
            init.zeros_(module.b)


class MonetModel(MonetPreTrainedModel):
    def __init__(self, config: MonetConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(MonetDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = kwargs.pop(CACHE, None)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past)[None]
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE: past_key_values},
        )
        hidden = inputs_embeds
        rotary = self.rotary_emb(hidden, position_ids=position_ids)
        states, routing = [], None
        for layer in self.layers:
            states.append(hidden)
            hidden, routing = layer(
                hidden,
                routing,
                attention_mask=mask,
                position_embeddings=rotary,
                cache=past_key_values if use_cache else None,
                **kwargs,
            )
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=(*states, hidden) if output_hidden_states else None,
            **{CACHE: past_key_values if use_cache else None},
        )


class MonetForCausalLM(MonetPreTrainedModel, GenerationMixin):
    def __init__(self, config: MonetConfig):
        super().__init__(config)
        self.model = MonetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden = out.last_hidden_state[:, -logits_to_keep:] if logits_to_keep else out.last_hidden_state
        return CausalLMOutputWithPast(
            logits=self.lm_head(hidden), hidden_states=out.hidden_states, **{CACHE: getattr(out, CACHE)}
        )

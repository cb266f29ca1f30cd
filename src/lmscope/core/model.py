"""The :class:`Model`: a Hugging Face causal LM with canonical sites, capture and interventions."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmscope.core import memory
from lmscope.core.cache import ActivationCache
from lmscope.core.errors import LmscopeError
from lmscope.core.families import Family, config_value, family_for
from lmscope.core.hooks import HookSession
from lmscope.core.interventions import Intervention
from lmscope.core.sites import Site, parse_site, provider_of, site_providers
from lmscope.core.weights import parameter

Inputs = str | Sequence[str] | Tensor | Mapping[str, Tensor]


@dataclass
class RunResult:
    """What :meth:`Model.run` returns.

    logits: [batch, pos, vocab] (``None`` when the run stopped early or ran without them);
    cache: captured sites; input_ids, attention_mask: [batch, pos].
    """

    logits: Tensor | None
    cache: ActivationCache
    input_ids: Tensor
    attention_mask: Tensor


@dataclass
class GenerateResult:
    """What :meth:`Model.generate` returns: texts of the new tokens, all ids [batch, pos], captures."""

    texts: list[str]
    ids: Tensor
    cache: ActivationCache


class Model:
    """A loaded causal LM: ``hf`` (the unchanged Hugging Face module), ``tokenizer``,
    its family's table entry, and dimensions (``n_layers``, ``n_heads``, ``n_kv_heads``,
    ``d_model``, ``d_head``, ``d_mlp``, ``d_vocab``). Where layers differ in head size or number
    of KV heads (Gemma 4's two layer kinds), ``d_head`` and ``n_kv_heads`` are the first attention
    layer's and :meth:`d_head_of` / :meth:`n_kv_heads_of` give each layer's."""

    def __init__(self, hf: nn.Module, tokenizer, source: str = "", name: str = "", family: Family | None = None):
        self.hf = hf
        self.tokenizer = tokenizer
        self.source = source
        self.name = name or source
        config = hf.config
        self.family: Family = family or family_for(config.model_type)
        for attribute, reason in self.family.unsupported:
            if getattr(config, attribute, False):
                raise LmscopeError(f"model family '{config.model_type}' with {attribute} is not supported: {reason}")
        self.derived = False  # True when the family entry was derived from the module tree
        self.max_memory: str | dict | None = None  # --max-memory as loaded: the gradient methods' budget
        self.n_layers = len(self.module(self.family.layers))
        self.n_heads = config.num_attention_heads
        self.d_model = config.hidden_size
        self._kv_heads = [_kv_heads(_layer_config(config, i), self.n_heads) for i in range(self.n_layers)]
        self._d_heads = [self._layer_d_head(i) for i in range(self.n_layers)]
        attention = self.layers_with("o_proj")  # hybrids: the first attention layer has it
        first = attention[0] if attention else 0
        self.n_kv_heads, self.d_head = self._kv_heads[first], self._d_heads[first]
        downs = [self.layer_module(i, self.family.mlp_down) for i in self.layers_with("mlp_down")]
        self.d_mlp = self._in_features(downs[0]) if downs else None
        self.d_vocab = config.vocab_size
        self.context: int | None = _context(config)

    # -- structure -----------------------------------------------------------------

    def module(self, path: str) -> nn.Module:
        """A submodule by dotted path from the root model ('' is the root)."""
        return self.hf.get_submodule(path) if path else self.hf

    def layer_module(self, layer: int, path: str) -> nn.Module:
        """A submodule of decoder layer ``layer`` by dotted path ('' is the layer)."""
        block = self.module(self.family.layers)[layer]
        return block.get_submodule(path) if path else block

    def has_module(self, layer: int, path: str | None) -> bool:
        """Whether decoder layer ``layer`` has a module at ``path`` (layers of one model differ:
        dense and mixture-of-experts layers, say)."""
        if path is None:
            return False
        try:
            self.layer_module(layer, path)
        except AttributeError:
            return False
        return True

    def layers_with(self, role: str) -> list[int]:
        """The layers that have the family's module ``role`` (e.g. ``"experts"``, ``"mlp_down"``);
        cached per module path (every site check asks, once per forward)."""
        path = getattr(self.family, role)
        cache = self.__dict__.setdefault("_layers_with", {})
        if path not in cache:
            cache[path] = [i for i in range(self.n_layers) if self.has_module(i, path)]
        return list(cache[path])

    def _in_features(self, linear: nn.Module) -> int:
        w = linear.weight
        return w.shape[0] if self.family.conv1d else w.shape[1]

    def _layer_d_head(self, layer: int) -> int:
        """The head size of ``layer``: its output projection's input over the heads, or where it
        has none (attention exposed only as a whole, ``Family.mixer``) the config's."""
        if self.has_module(layer, self.family.o_proj):
            return self._in_features(self.layer_module(layer, self.family.o_proj)) // self.n_heads
        config = _layer_config(self.hf.config, layer)
        return (
            getattr(config, "head_dim", None) or getattr(config, "kv_channels", None) or (self.d_model // self.n_heads)
        )

    def d_head_of(self, layer: int) -> int:
        """The head size of ``layer``'s attention (Gemma 4's full-attention layers have larger
        heads than its sliding-window ones; elsewhere every layer's is ``d_head``)."""
        return self._d_heads[layer]

    def n_kv_heads_of(self, layer: int) -> int:
        """The number of key/value heads of ``layer``'s attention (the config's per-layer value
        where layers differ, as in Gemma 4; elsewhere ``n_kv_heads``)."""
        return self._kv_heads[layer]

    @property
    def uniform_heads(self) -> bool:
        """Whether every attention layer has the same head size and number of KV heads."""
        layers = self.layers_with("o_proj") or range(self.n_layers)
        return len({(self._d_heads[i], self._kv_heads[i]) for i in layers}) == 1

    def require_uniform_heads(self, what: str) -> None:
        """A clear error where layers differ in head size or KV heads, which ``what`` assumes they do not."""
        if not self.uniform_heads:
            raise LmscopeError(
                f"{what}: the layers of {self.hf.config.model_type} differ in head size or number of KV heads "
                f"(d_head {self._d_heads}, KV heads {self._kv_heads} per layer), which {what} does not support"
            )

    def kv_source(self, layer: int) -> int:
        """The layer whose keys and values ``layer`` attends with: itself, or (``Family.kv_reuse``)
        for a layer without a key projection of its own, the last earlier layer of the same kind
        that has one (Gemma 4's KV-shared layers)."""
        fam = self.family
        if fam.kv_reuse is None or fam.k_proj is None or self.has_module(layer, fam.k_proj):
            return layer
        kinds = getattr(self.hf.config, fam.kv_reuse)
        for earlier in range(layer - 1, -1, -1):
            if kinds[earlier] == kinds[layer] and self.has_module(earlier, fam.k_proj):
                return earlier
        raise LmscopeError(f"layer {layer} has no key projection and no earlier {kinds[layer]} layer has one")

    def layer_scale(self, layer: int) -> Tensor | None:
        """The factor ``layer`` multiplies its whole output by after adding its branches
        (``Family.layer_scale``: Gemma 4's ``layer_scalar`` buffer), or None where it has none."""
        path = self.family.layer_scale
        if path is None:
            return None
        parent, _, name = path.rpartition(".")
        return getattr(self.layer_module(layer, parent), name)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's device (its execution device when accelerate
        dispatched or offloaded the model)."""
        hook = getattr(self.hf.get_input_embeddings(), "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
        return next(self.hf.parameters()).device

    def with_cache(self, cache) -> dict:
        """``{name: cache}`` for the HF forward's KV-cache argument: ``cache`` since
        transformers 5.24, ``past_key_values`` before it and in older remote code."""
        name = self.__dict__.get("_cache_arg")  # a string: a Model stays deep-copyable
        if name is None:
            params = inspect.signature(self.hf.forward).parameters
            name = self.__dict__["_cache_arg"] = "cache" if "cache" in params else "past_key_values"
        return {name: cache}

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.hf.parameters())

    def site(self, name: str | Site, head: int | None = None) -> Site:
        """Parse and validate a site name against this model's layers and heads (or experts, or
        whatever its kind's provider checks: :class:`lmscope.core.sites.SiteProvider`)."""
        site = name if isinstance(name, Site) else parse_site(name, head)
        provider = provider_of(site.kind)
        if site.layer is not None and not 0 <= site.layer < self.n_layers:
            raise LmscopeError(f"site '{site}': layer {site.layer} out of range (model has {self.n_layers} layers)")
        provider.check_site(self, site)
        return site

    def site_shapes(self, batch: int = 1, pos: int = 1) -> list[tuple[str, tuple[int, ...]]]:
        """Every whole site this model has, with the shape of its tensor for ``batch`` sequences of
        ``pos`` tokens: each registered provider's sites in turn (dense, mixture-of-experts, Monet,
        then any registered later)."""
        return [
            (str(s), tuple(provider.shape(self, s, batch, pos)))
            for provider in site_providers()
            for s in provider.sites_of(self)
        ]

    def has_site(self, kind: str, layer: int | None = None) -> bool:
        """Whether this model has the whole site ``kind`` at ``layer`` (None: global, or asked
        without a layer), as the kind's provider says."""
        return provider_of(kind).has(self, kind, layer)

    _has = has_site

    @property
    def parallel_residual(self) -> bool:
        """Whether attention and MLP read the same residual stream (no ``resid_mid``)."""
        flag = self.family.parallel_residual
        return flag is True or bool(isinstance(flag, str) and getattr(self.hf.config, flag, False))

    @property
    def residual_scale(self) -> float:
        """The factor each layer multiplies attention and MLP outputs by before adding them to
        the residual stream (``Family.residual_scale``: Granite's ``residual_multiplier``,
        MiniCPM3's ``scale_depth / sqrt(num_hidden_layers)``; 1 elsewhere)."""
        return self._scale(self.family.residual_scale)

    @property
    def logit_scale(self) -> float:
        """The factor the model multiplies its logits by (``Family.logit_scale``: Cohere's
        ``logit_scale``, Granite's ``1 / logits_scaling``; 1 elsewhere)."""
        return self._scale(self.family.logit_scale)

    @property
    def embed_scale(self) -> float:
        """The factor the model multiplies the embedding module's output by before the first
        layer (``Family.embed_scale``: Granite's ``embedding_multiplier``; 1 elsewhere)."""
        return self._scale(self.family.embed_scale)

    def _scale(self, formula: str | None) -> float:
        value = config_value(self.hf.config, formula)
        return 1.0 if value is None else float(value)

    def card(self) -> dict:
        """A summary of the model: family, size, dimensions, dtype, source."""
        return {
            "name": self.name,
            "family": self.hf.config.model_type,
            "class": type(self.hf).__name__,
            "parameters": self.n_params,
            "layers": self.n_layers,
            "heads": self.n_heads,
            "kv_heads": self.n_kv_heads if self.uniform_heads else list(self._kv_heads),
            "d_model": self.d_model,
            "d_head": self.d_head if self.uniform_heads else list(self._d_heads),
            "d_mlp": self.d_mlp,
            "vocab": self.d_vocab,
            "dtype": str(next(self.hf.parameters()).dtype).removeprefix("torch."),
            "device": str(self.device),
            "source": self.source,
        }

    # -- running ---------------------------------------------------------------------

    def tokenize(self, inputs: Inputs, padding_side: str = "right") -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``, both [batch, pos], on the model's device. Empty
        inputs, ids outside the vocabulary and sequences longer than the model's context are
        one-line errors (:meth:`check_ids`)."""
        if isinstance(inputs, Tensor):
            ids = inputs if inputs.ndim == 2 else inputs.unsqueeze(0)
            mask = torch.ones_like(ids)
        elif isinstance(inputs, Mapping):
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
        else:
            if self.tokenizer is None:
                raise LmscopeError(f"model {self.name} has no tokenizer: pass token ids")
            texts = [inputs] if isinstance(inputs, str) else list(inputs)
            if not texts:
                raise LmscopeError("no input text")
            self.check_length(texts, "input")
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side=padding_side)
            ids, mask = enc["input_ids"], enc["attention_mask"]
        self.check_ids(ids, "input")
        return ids.to(self.device), mask.to(self.device)

    def check_ids(self, ids: Tensor | Sequence[int], what: str = "input", *, sequence: bool = True) -> None:
        """Refuse token ids outside the vocabulary [0, d_vocab) and, when ``ids`` is a sequence
        ([..., pos]: ``sequence``), an empty one or one longer than the model's context; the
        one-line error starts with ``what`` (a file and line, "answers", ...)."""
        ids = torch.as_tensor(ids)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise LmscopeError(f"{what}: token ids must be integers, not {str(ids.dtype).removeprefix('torch.')}")
        if sequence and (ids.ndim == 0 or ids.shape[-1] == 0):
            raise LmscopeError(f"{what}: no tokens (an empty prompt?)")
        if sequence and self.context is not None and ids.shape[-1] > self.context:
            raise LmscopeError(
                f"{what}: {ids.shape[-1]} tokens, longer than the context of {self.name} ({self.context} tokens)"
            )
        if ids.numel() and bool(((ids < 0) | (ids >= self.d_vocab)).any()):
            bad = int(ids[(ids < 0) | (ids >= self.d_vocab)].flatten()[0])
            raise LmscopeError(f"{what}: token id {bad} outside the vocabulary of {self.name} (ids 0..{self.d_vocab - 1})")

    def check_texts(self, texts: Sequence[str], what: str = "input", *, extra: int = 0) -> None:
        """Refuse texts that, tokenised as :meth:`tokenize` does, are empty, hold ids outside the
        vocabulary or with ``extra`` more tokens (to be generated) exceed the model's context:
        what commands check of every text they will run before they compute anything."""
        if self.tokenizer is None or not texts:
            return
        self.check_length(texts, what)
        for ids in self.tokenizer(list(texts))["input_ids"]:
            self.check_ids(ids, what)
            if self.context is not None and len(ids) + extra > self.context:
                raise LmscopeError(
                    f"{what}: {len(ids)} tokens and {extra} to generate exceed the context of {self.name} "
                    f"({self.context} tokens)"
                )

    def check_length(self, texts: Sequence[str], what: str = "input") -> None:
        """Refuse, before tokenising, a text that cannot fit the model's context: one of more
        than 4 x context x the longest token's characters (a token covers at most that many
        characters; 4 allows for normalisers that join characters)."""
        longest = max(map(len, texts), default=0)
        if self.context is None or longest <= 4 * self.context * self._token_chars():
            return
        raise LmscopeError(
            f"{what}: a text of {longest} characters, far longer than the context of {self.name} ({self.context} tokens)"
        )

    def _token_chars(self) -> int:
        """The most characters one token of the tokenizer spells (computed once)."""
        if not hasattr(self, "_longest_token"):
            vocab = self.tokenizer.get_vocab() if self.tokenizer is not None else {}
            self._longest_token = max(map(len, vocab), default=1)
        return self._longest_token

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Inside the block no parameter requires gradients, so a backward pass computes the
        gradients of activations only (gradient attribution needs no weight gradients: skipping
        them saves a model-sized buffer and its time); the flags come back on exit."""
        params = [p for p in self.hf.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def hooks(
        self, capture: Sequence[str | Site] = (), interventions: Sequence[Intervention] = (), **options
    ) -> HookSession:
        """A context manager capturing/intervening during any forward of ``self.hf``.

        ``with model.hooks(["blocks.3.attn.z"], [zero("blocks.2.attn.z.1")]) as s:``
        ``model.hf(ids)``; then ``s.cache["blocks.3.attn.z"]``. ``options`` (``to_cpu``, ``grad``,
        ``stop_after``, ``attention``) are :class:`~lmscope.core.hooks.HookSession`'s.
        """
        sites = [self.site(s) for s in capture]
        for iv in interventions:
            self.site(iv.site)
        stop_after = options.get("stop_after")
        if stop_after is not None:
            if not 0 <= stop_after < self.n_layers:
                raise LmscopeError(f"stop_after={stop_after} out of range (model has {self.n_layers} layers)")
            late = [str(s) for s in sites if s.layer is None and s.kind != "embed" or (s.layer or 0) > stop_after]
            if late:
                raise LmscopeError(f"cannot capture {', '.join(late)}: the run stops after layer {stop_after}")
        return HookSession(self, sites, interventions, **options)

    def run(
        self,
        inputs: Inputs,
        capture: Sequence[str | Site] = (),
        interventions: Sequence[Intervention] = (),
        *,
        padding_side: str = "right",
        logits: bool | str = True,
        **options,
    ) -> RunResult:
        """One forward pass over a batch, capturing sites and applying interventions.

        With left padding, position ids count real tokens only (as ``generate`` does),
        so a left-padded prompt sees the same positions as alone. ``logits=False`` runs only
        Hugging Face's ``base_model`` (no unembedding, a fifth of SmolLM2's forward) when the
        caller needs captured activations only; the ``logits`` site then cannot be captured.
        ``logits="last"`` computes the last position's logits only ([batch, 1, vocab]; Hugging
        Face's ``logits_to_keep``, see :meth:`_last_position`), which spares a gradient run the
        whole [batch, pos, vocab].
        ``options`` (``to_cpu``, ``grad``, ``stop_after``) are :class:`~lmscope.core.hooks.HookSession`'s;
        with ``grad`` the forward records gradients.
        """
        ids, mask = self.tokenize(inputs, padding_side)
        kept = 0 if not logits else 1 if logits == "last" else ids.shape[1]
        need = memory.forward_bytes(self, *ids.shape, kept, grad=bool(options.get("grad")))
        memory.require_memory(need, self.device, f"a forward pass of {ids.shape[0]} x {ids.shape[1]} tokens")
        session = self.hooks(capture, interventions, **options)
        if not logits and any(self.site(s).kind == "logits" for s in [*capture, *(iv.site for iv in interventions)]):
            raise LmscopeError("the logits site does not exist in a run without the unembedding (logits=False)")
        forward = self.hf if logits else self.hf.base_model
        result = None
        with torch.set_grad_enabled(options.get("grad", False)), session:
            keep = {"logits_to_keep": self._last_position()} if logits == "last" else {}
            out = forward(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask), use_cache=False, **keep)
            result = out.logits if logits else None
        return RunResult(result, session.cache, ids, mask)

    def generate(
        self,
        inputs: Inputs,
        interventions: Sequence[Intervention] = (),
        capture: Sequence[str | Site] = (),
        *,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        **kwargs,
    ) -> GenerateResult:
        """Generate with interventions active at every step (greedy unless ``do_sample``).

        Captured sites hold every position (prompt and generated), except
        ``attn.pattern``, which holds the last step.
        """
        ids, mask = self.tokenize(inputs, padding_side="left")
        if self.context is not None and ids.shape[1] + max_new_tokens > self.context:
            raise LmscopeError(
                f"{ids.shape[1]} prompt tokens and {max_new_tokens} new ones exceed the context of {self.name} "
                f"({self.context} tokens)"
            )
        if self.family.kv_reuse and "logits_to_keep" in inspect.signature(self.hf.forward).parameters:
            kwargs.setdefault("logits_to_keep", self._last_position())  # every layer sees the whole prompt
        session = self.hooks(capture, interventions)
        with torch.no_grad(), session:
            out = self.hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=self.pad_id,
                **kwargs,
            )
        new = out[:, ids.shape[1] :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True) if self.tokenizer else []
        return GenerateResult(texts, out, session.cache)

    def _last_position(self) -> int | Tensor:
        """``logits_to_keep`` for the last position's logits only: 1, or where layers reuse
        earlier layers' keys and values (``Family.kv_reuse``) the index of the last position. No
        other position reads what such layers compute, so under an integer a model may run them on
        the kept positions only (Gemma 4 does), and their sites would hold one position."""
        return torch.tensor([-1], device=self.device) if self.family.kv_reuse else 1

    def unembed(self, resid: Tensor, tokens: Tensor | None = None) -> Tensor:
        """Logits from the final residual stream ``[..., d_model]``: final norm, unembedding
        (only the rows of ``tokens`` if given, ``[..., len(tokens)]``), the family's logit scale
        and, for Gemma 2/3, the final logit soft-capping, as the model's own forward applies them."""
        x = self.module(self.family.final_norm)(resid)
        head = self.module(self.family.unembed)
        weight, bias = parameter(head), parameter(head, "bias")
        if tokens is not None:
            weight = weight[tokens]
            bias = None if bias is None else bias[tokens]
        logits = torch.nn.functional.linear(x, weight, bias)
        if self.logit_scale != 1:
            logits = logits * self.logit_scale
        cap = getattr(self.hf.config, "final_logit_softcapping", None)
        return logits if not cap else torch.tanh(logits / cap) * cap

    @property
    def pad_id(self) -> int | None:
        """The padding token id (the tokenizer's, else the config's)."""
        if self.tokenizer is not None:
            return self.tokenizer.pad_token_id
        return getattr(self.hf.config, "pad_token_id", None)

    def bos_ids(self) -> list[int]:
        """``[bos_token_id]``, or ``[]`` when the tokenizer has no BOS token."""
        bos = self.tokenizer.bos_token_id if self.tokenizer is not None else None
        return [] if bos is None else [bos]


def _context(config) -> int | None:
    """The longest sequence ``config`` allows (``max_position_embeddings`` or the family's name
    for it), None when it names none."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _layer_config(config, layer: int):
    """The config of ``layer``: its own where layers differ (transformers' ``per_layer_config``,
    whose per-layer attributes the global config refuses to give), else the global one."""
    return config.per_layer_config[layer] if getattr(config, "is_heterogeneous", False) else config


def _kv_heads(config, n_heads: int) -> int:
    """The number of key/value heads a (layer's) config gives: one with multi-query attention
    (GPT-BigCode), else ``num_key_value_heads`` or, without it, one per query head."""
    if getattr(config, "multi_query", False):
        return 1
    return getattr(config, "num_key_value_heads", None) or n_heads


def position_ids(mask: Tensor) -> Tensor:
    """Positions counting real tokens only ([batch, pos]), as ``generate`` uses for left padding."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _position_ids(mask: Tensor) -> Tensor | None:
    """:func:`position_ids` when any sequence is left-padded; else None (the model's default).
    A batch of no tokens (an empty text) is a one-line error, before any forward."""
    if mask.shape[-1] == 0:
        raise LmscopeError("no tokens to run (an empty text?)")
    return None if bool(mask[:, 0].all()) else position_ids(mask)

"""Dictionaries: sparse autoencoders and transcoders, one module for every architecture.

A :class:`Dictionary` maps an activation ``x`` [..., d_in] to sparse features ``f`` [..., d_sae] and
back to ``x_hat`` [..., d_out]::

    x'    = normalise(x) - b_dec            (b_dec subtracted only with ``apply_b_dec_to_input``)
    pre   = x' @ W_enc + b_enc              W_enc [d_in, d_sae], b_enc [d_sae]
    f     = act(pre)
    x_hat = unnormalise(f @ W_dec + b_dec) + x @ W_skip^T      W_dec [d_sae, d_out], W_skip [d_out, d_in]

with ``act`` by architecture (``arch``; definitions as SAELens 6 implements them):

- ``standard``: ReLU; trained with the decoder-norm-weighted L1 penalty (:meth:`Dictionary.l1_penalty`);
- ``topk``: the ``k`` largest of relu(pre) (with ``rescale_by_decoder_norm``, of
  ``pre * ||W_dec[i]||``, the decoder then reading ``f / ||W_dec[i]||``: sparsify's and SAELens's
  option); ``groupmax``: the largest of each of ``k`` groups (sparsify);
- ``jumprelu``: ``relu(pre) * (pre > threshold)``, threshold [d_sae];
- ``batchtopk``: trained with the batch top-k (:meth:`Dictionary.encode_batch_topk`), read as a JumpReLU with
  its learned threshold (:meth:`encode`), and saved as one;
- ``gated`` (Rajamanoharan et al. 2024, "Improving dictionary learning with gated sparse
  autoencoders"; SAELens's weight tying): ``f = (x' @ W_enc + b_gate > 0) * relu(x' @ (W_enc *
  exp(r_mag)) + b_mag)``, no b_enc.

A transcoder (``transcoder=True``) reads one site and writes another (``site`` -> ``out_site``,
e.g. ``mlp.in`` -> ``mlp.out``; ``d_out`` may differ from ``d_in``), never subtracts ``b_dec``
from its input, and may add a skip matrix (``skip=True``). ``normalize``: SAELens's run-time input
normalisations, ``constant_norm_rescale`` (each token scaled to norm sqrt(d_in)) and
``layer_norm`` (centred and divided by its standard deviation + 1e-5); a sparse autoencoder undoes
them on its reconstruction, a transcoder does not (as SAELens).

The **error term** is ``target - decode(encode(x))`` (:meth:`Dictionary.error`): spliced into a model
as ``decode(encode(x)) + error`` the model computes exactly what it did without the dictionary.

:class:`CrossLayerTranscoder` (circuit-tracer's CLT): an encoder per layer, each layer's features
writing to its own and every later layer's output site.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lmscope.core.errors import LmscopeError
from lmscope.features.activations import batch_topk, groupmax, jumprelu, topk

ARCHS = ("standard", "topk", "groupmax", "batchtopk", "jumprelu", "gated")
NORMALIZE = ("none", "constant_norm_rescale", "layer_norm")
_LN_EPS = 1e-5  # SAELens's layer_norm: (x - mean) / (std + eps), std unbiased


class Dictionary(nn.Module):
    """A sparse autoencoder or transcoder (see the module docstring for the computation).

    Weights start at zero (a loader assigns them; :meth:`init_` draws random ones). ``site`` /
    ``out_site``: the lmscope sites it reads and writes (``out_site`` is ``site`` for an
    autoencoder), None where unknown; ``norm_folded``: it reads the MLP norm's output with the
    norm's gain divided out and bias subtracted (a TransformerLens ``ln2.hook_normalized`` of a model
    loaded with ``fold_ln``); ``info``: where it came from (format, their hook names, model name).
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        arch: str = "standard",
        *,
        d_out: int | None = None,
        k: float | None = None,
        transcoder: bool = False,
        skip: bool = False,
        apply_b_dec_to_input: bool | None = None,
        rescale_by_decoder_norm: bool = False,
        normalize: str = "none",
        site: str | None = None,
        out_site: str | None = None,
        norm_folded: bool = False,
        info: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise LmscopeError(f"unknown dictionary architecture '{arch}' (known: {', '.join(ARCHS)})")
        if normalize not in NORMALIZE:
            raise LmscopeError(f"unknown input normalisation '{normalize}' (known: {', '.join(NORMALIZE)})")
        if arch in ("topk", "groupmax", "batchtopk") and not k:
            raise LmscopeError(f"a {arch} dictionary needs k")
        if arch == "groupmax" and d_sae % int(k) != 0:
            raise LmscopeError(f"groupmax: d_sae {d_sae} is not a multiple of k={k}")
        d_out = d_in if d_out is None else d_out
        if not transcoder and d_out != d_in:
            raise LmscopeError(f"an autoencoder reconstructs its input: d_out {d_out} != d_in {d_in}")
        if apply_b_dec_to_input is None:
            apply_b_dec_to_input = not transcoder
        if transcoder and apply_b_dec_to_input:
            raise LmscopeError("a transcoder cannot subtract b_dec (of its output site) from its input")
        self.d_in, self.d_sae, self.d_out, self.arch = d_in, d_sae, d_out, arch
        self.k = k
        self.transcoder, self.skip = transcoder, skip
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.rescale_by_decoder_norm = rescale_by_decoder_norm
        self.normalize = normalize
        self.site = site
        self.out_site = out_site if out_site is not None else (None if transcoder else site)
        self.norm_folded = norm_folded
        self.info = dict(info or {})

        def zeros(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=dtype))

        self.W_enc = zeros(d_in, d_sae)
        self.W_dec = zeros(d_sae, d_out)
        self.b_dec = zeros(d_out)
        if arch == "gated":
            self.b_gate, self.r_mag, self.b_mag = zeros(d_sae), zeros(d_sae), zeros(d_sae)
        else:
            self.b_enc = zeros(d_sae)
        if arch in ("jumprelu", "batchtopk"):
            self.threshold = zeros(d_sae)
        if skip:
            self.W_skip = zeros(d_out, d_in)

    def extra_repr(self) -> str:
        parts = [f"{self.arch}", f"d_in={self.d_in}", f"d_sae={self.d_sae}"]
        if self.transcoder:
            parts.append(f"d_out={self.d_out}")
        if self.k:
            parts.append(f"k={self.k}")
        if self.site:
            parts.append(f"site={self.site}" + (f" -> {self.out_site}" if self.transcoder else ""))
        return ", ".join(parts)

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def inference_arch(self) -> str:
        """The architecture it is read and saved as (a batch top-k dictionary is a JumpReLU one)."""
        return "jumprelu" if self.arch == "batchtopk" else self.arch

    @torch.no_grad()
    def init_(self, seed: int = 0, scale: float = 1.0) -> Dictionary:
        """Random weights (SAELens's initialisation): decoder rows drawn Kaiming-uniform times
        ``scale``, the encoder their transpose (for a transcoder, drawn alike on its own), biases,
        thresholds and the skip matrix zero. Returns self."""
        g = torch.Generator().manual_seed(seed)
        bound = math.sqrt(6 / self.d_out)  # kaiming_uniform_ of a [d_sae, d_out] tensor: fan_in d_out
        self.W_dec.copy_((torch.rand(self.d_sae, self.d_out, generator=g) * 2 - 1) * bound * scale)
        if self.transcoder:
            bound = math.sqrt(6 / self.d_sae)
            self.W_enc.copy_((torch.rand(self.d_in, self.d_sae, generator=g) * 2 - 1) * bound * scale)
        else:
            self.W_enc.copy_(self.W_dec.T)
        return self

    # -- encoding ---------------------------------------------------------------------------

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """Per-token statistics of the run-time normalisation: (shift, divisor) [..., 1]."""
        if self.normalize == "constant_norm_rescale":
            return torch.zeros_like(x[..., :1]), x.norm(dim=-1, keepdim=True) / math.sqrt(self.d_in)
        if self.normalize == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            return mu, (x - mu).std(dim=-1, keepdim=True)
        return None

    def _normalized(self, x: Tensor) -> Tensor:
        if self.normalize == "constant_norm_rescale":
            return x * (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True))
        if self.normalize == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            return x / (x.std(dim=-1, keepdim=True) + _LN_EPS)
        return x

    def _input(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_in:
            raise LmscopeError(f"dictionary reads vectors of {self.d_in}, got {x.shape[-1]}")
        x = self._normalized(x.to(self.dtype))
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def pre_acts(self, x: Tensor) -> Tensor:
        """The pre-activations ``x' @ W_enc + b_enc`` [..., d_sae] (a gated dictionary's
        magnitude path; with ``rescale_by_decoder_norm``, times the decoder row norms)."""
        x = self._input(x)
        if self.arch == "gated":
            return x @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        pre = x @ self.W_enc + self.b_enc
        return pre * self.W_dec.norm(dim=-1) if self.rescale_by_decoder_norm else pre

    def encode(self, x: Tensor) -> Tensor:
        """The features of ``x`` [..., d_in]: [..., d_sae] (a batch top-k dictionary applies its
        threshold, as at inference)."""
        if self.arch == "gated":
            gate = (self._input(x) @ self.W_enc + self.b_gate > 0).to(self.dtype)
            return gate * torch.relu(self.pre_acts(x))
        pre = self.pre_acts(x)
        if self.arch == "standard":
            return torch.relu(pre)
        if self.arch == "topk":
            return topk(pre, int(self.k))
        if self.arch == "groupmax":
            return groupmax(pre, int(self.k))
        return jumprelu(pre, self.threshold)

    def encode_batch_topk(self, x: Tensor) -> Tensor:
        """Features by the batch top-k over all of ``x``'s tokens (how a batch top-k dictionary trains)."""
        return batch_topk(self.pre_acts(x), self.k)

    # -- decoding ---------------------------------------------------------------------------

    def _times_decoder(self, f: Tensor) -> Tensor:
        f = f.to(self.dtype)
        if self.rescale_by_decoder_norm:
            f = f / self.W_dec.norm(dim=-1)
        return f @ self.W_dec

    def _needs_input(self, x: Tensor | None, what: str) -> Tensor:
        if x is None:
            raise LmscopeError(f"this dictionary's {what} depends on its input: pass x")
        return x.to(self.dtype)

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """The reconstruction from features ``f`` [..., d_sae]: [..., d_out]. ``x``, the input the
        features came from, is needed where the dictionary undoes a per-token normalisation of its
        input or has a skip matrix."""
        y = self._times_decoder(f) + self.b_dec
        if self.normalize != "none" and not self.transcoder:
            shift, divisor = self._stats(self._needs_input(x, "normalisation"))
            y = y * divisor + shift
        if self.skip:
            y = y + self._needs_input(x, "skip connection") @ self.W_skip.T
        return y

    def decode_delta(self, df: Tensor, x: Tensor | None = None) -> Tensor:
        """What changing the features by ``df`` [..., d_sae] changes in the reconstruction
        [..., d_out]: the linear part of :meth:`decode` (no bias, no skip)."""
        y = self._times_decoder(df)
        if self.normalize != "none" and not self.transcoder:
            y = y * self._stats(self._needs_input(x, "normalisation"))[1]
        return y

    def forward(self, x: Tensor) -> Tensor:
        """``decode(encode(x), x)``."""
        return self.decode(self.encode(x), x)

    def error(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        """The error term ``target - decode(encode(x))`` (``target``: x for an autoencoder, the
        output site's activation for a transcoder)."""
        if target is None:
            if self.transcoder:
                raise LmscopeError("a transcoder's error term needs the output site's activation (target)")
            target = x
        return target.to(self.dtype) - self(x)

    # -- training helpers -------------------------------------------------------------------

    def l1_penalty(self, f: Tensor) -> Tensor:
        """The decoder-norm-weighted L1 penalty per token, ``sum_i f_i ||W_dec[i]||`` [...]
        (SAELens's standard sparsity loss before its coefficient)."""
        return (f * self.W_dec.norm(dim=-1)).sum(-1)


class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder over ``n_layers`` layers (circuit-tracer's CLT): layer ``l``'s
    features ``f_l = act(x_l @ W_enc[l] + b_enc[l])`` [..., d_sae] read its input site, and the
    output site of layer ``j`` is reconstructed from every layer at or before it::

        out_j = sum_{l <= j} f_l @ W_dec[l][:, j - l] + b_dec[j]

    ``W_enc`` [n_layers, d_in, d_sae]; ``W_dec[l]`` [d_sae, n_layers - l, d_out]; ``act`` ReLU or,
    with ``jumprelu``, ``relu(pre) * (pre > threshold[l])``. ``site`` / ``out_site``: the site
    kinds it reads and writes at each layer (e.g. ``resid_mid`` -> ``mlp.out``)."""

    def __init__(
        self,
        n_layers: int,
        d_in: int,
        d_sae: int,
        *,
        d_out: int | None = None,
        jump: bool = False,
        site: str | None = None,
        out_site: str | None = None,
        info: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        d_out = d_in if d_out is None else d_out
        self.n_layers, self.d_in, self.d_sae, self.d_out = n_layers, d_in, d_sae, d_out
        self.jump = jump
        self.site, self.out_site = site, out_site
        self.info = dict(info or {})
        self.W_enc = nn.Parameter(torch.zeros(n_layers, d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n_layers, d_sae, dtype=dtype))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.zeros(d_sae, n_layers - layer, d_out, dtype=dtype)) for layer in range(n_layers)]
        )
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_out, dtype=dtype))
        if jump:
            self.threshold = nn.Parameter(torch.zeros(n_layers, d_sae, dtype=dtype))

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def encode_layer(self, x: Tensor, layer: int) -> Tensor:
        """Layer ``layer``'s features of its input ``x`` [..., d_in]: [..., d_sae]."""
        pre = x.to(self.dtype) @ self.W_enc[layer] + self.b_enc[layer]
        return jumprelu(pre, self.threshold[layer]) if self.jump else torch.relu(pre)

    def encode(self, x: Tensor) -> Tensor:
        """Every layer's features of its input, ``x`` [n_layers, ..., d_in] -> [n_layers, ..., d_sae]."""
        return torch.stack([self.encode_layer(x[layer], layer) for layer in range(self.n_layers)])

    def decode_delta_layer(self, df: Tensor, layer: int) -> Tensor:
        """What changing the features by ``df`` [n_layers or more, ..., d_sae] changes in output
        ``layer``'s reconstruction: ``sum_{l <= layer} df_l @ W_dec[l][:, layer - l]`` [..., d_out]."""
        y = df[0].to(self.dtype) @ self.W_dec[0][:, layer]
        for source in range(1, layer + 1):
            y = y + df[source].to(self.dtype) @ self.W_dec[source][:, layer - source]
        return y

    def decode_layer(self, f: Tensor, layer: int) -> Tensor:
        """Output ``layer``'s reconstruction [..., d_out] from the features of every layer up to it."""
        return self.decode_delta_layer(f, layer) + self.b_dec[layer]

    def decode(self, f: Tensor) -> Tensor:
        """Every layer's reconstruction, ``f`` [n_layers, ..., d_sae] -> [n_layers, ..., d_out]."""
        return torch.stack([self.decode_layer(f, layer) for layer in range(self.n_layers)])

    def forward(self, x: Tensor) -> Tensor:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x))

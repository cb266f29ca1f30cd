"""Logit lens and direct logit attribution: what the residual stream after each layer, and what
each component writing to it, says about the next token.

**Logit lens** (nostalgebraist 2020, "interpreting GPT: the logit lens"). The residual stream
entering the first layer (``blocks.0.resid_pre``: the embedding) and leaving every layer
(``blocks.{L}.resid_post``), at one position per prompt, is read as if it were the final one:
through the final norm and the unembedding, as :meth:`Model.unembed` applies them (norm
statistics recomputed from that residual, the norm's weight and bias, the unembedding's bias,
Gemma 2/3's soft-capping). Per layer: the rank (1 = top token) and probability of the answer
token(s), and the top-k tokens. After the last layer this is the model's own output.

``norm="final"`` reproduces instead what ``ActivationCache.accumulated_resid(apply_ln=True)``
computed in TransformerLens before its 2026 fix (PR #1180), which the Temporal Heads notebook
(Park et al. 2025, ``3.logit_lens.ipynb``) used with ``fold_ln=True``: every layer's residual is
divided by the FINAL residual's cached norm scale (centred first under LayerNorm), times the
norm's weight, then the unembedding without any bias and without soft-capping. That lens is
linear in the residual (at layer L it is the sum of the direct logit attributions of all
components before L). In RMSNorm models without an unembedding bias its ranks equal the standard
lens's (the two differ by a positive factor per layer); its probabilities do not (the factor
acts as a temperature).

**Direct logit attribution** (Elhage et al. 2021, "A Mathematical Framework for Transformer
Circuits"; TransformerLens's ``cache.stack_head_results(apply_ln=True)`` and
``cache.decompose_resid(apply_ln=True)`` followed by the answer's unembedding direction). The
final residual stream x at the chosen position is the sum of its components: the embedding
(``blocks.0.resid_pre``, positional embedding included), what each head writes (``z_h W_O[h]``,
:func:`lmscope.core.anatomy.head_contributions`), what attention adds beyond its heads (the
output projection's bias), and what each MLP writes (the ``mlp.contrib`` point). With the final
norm's scale computed from the full x and held fixed, the norm is linear, and component c gets::

    DLA(c) = (c - mean(c)) * g / s . d        LayerNorm, s = sqrt(var(x) + eps)
    DLA(c) = c * g / s . d                    RMSNorm,   s = sqrt(mean(x^2) + eps)

with g the norm's weight (``1 + w`` in Gemma) and d the answer's unembedding row (minus the wrong
answer's). TransformerLens divides by the cached ``ln_final.hook_scale`` (centring each
component only for LayerNorm) and leaves g to ``fold_ln=True``, which folds it into ``W_U`` (and
the LayerNorm bias into ``b_U``, attributed to no component); here g is applied explicitly, so
the numbers are those of TransformerLens with ``fold_ln=True``. The components then sum exactly
to the model's logit (difference) before soft-capping, minus ``constant`` (the norm's bias along
d plus the unembedding's bias). ``center_unembed=True`` subtracts the mean unembedding row from
d (TransformerLens's ``center_unembed=True``, the notebook's setting); it changes single-answer
attributions, not differences. Two more differences from TransformerLens's defaults, where they
apply: a head's output here includes the share of the constant part of its values,
``(b_ln W_V[h] + b_V[h]) W_O[h]`` (constant since attention weights sum to 1; ``b_ln`` the bias
of a LayerNorm before attention, which ``fold_ln`` folds into ``b_V``), which TransformerLens's
default ``fold_value_biases=True`` moves into the attention bias, as ``fold_value_biases=True``
here does (GPT-2, GPT-NeoX, Qwen 2: models with a value bias or a LayerNorm); and in Gemma 2/3 and OLMo 2, whose post-attention norm scales the
attention output, a head's output is scaled by that norm's factor (held fixed), so the heads
and the bias sum to what attention adds, where TransformerLens's per-head results are taken
before that norm.

Positions count each prompt's real tokens (``-1``: its last token), whatever the padding.
Results (:class:`LogitLens`, :class:`LogitAttribution`, :class:`ComponentTokens`) are
:class:`~lmscope.reports.results.Result` objects; :func:`compare` puts several prompt sets
(e.g. numeric-year vs alias prompts) side by side.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmscope.core.anatomy import head_contributions, head_params, mlp_contributions
from lmscope.core.errors import LmscopeError
from lmscope.core.hooks import Hook, hooked
from lmscope.core.model import Inputs, Model
from lmscope.core.weights import parameter
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table

Token = int | str
Answers = Token | Sequence[Token | Sequence[Token]] | Tensor
Position = int | Sequence[int] | Tensor

NORMS = ("recompute", "final")


# -- inputs ----------------------------------------------------------------------------------


def answer_ids(model: Model, answers: Answers, n_prompts: int) -> Tensor:
    """Answer token ids [n_prompts, n_answers] from one answer for every prompt, or one entry
    per prompt (an answer or a list of answers, the same number for every prompt). An answer is
    a token id or a string, tokenised without special tokens, of which the first token is used
    (give BPE tokenizers the leading space: ``" Arsenal"``)."""
    if isinstance(answers, Tensor):
        ids = answers.long().cpu()
        ids = ids.expand(n_prompts) if ids.ndim == 0 else ids
        ids = ids[:, None] if ids.ndim == 1 else ids
        if ids.ndim != 2 or ids.shape[0] != n_prompts:
            raise LmscopeError(
                f"answers: expected [{n_prompts}] or [{n_prompts}, n_answers], got {list(answers.shape)}"
            )
    elif _is_token(answers):
        ids = torch.tensor([[_token_id(model, answers)]] * n_prompts)
    else:
        entries = list(answers)
        if len(entries) != n_prompts:
            raise LmscopeError(f"answers: {len(entries)} entries for {n_prompts} prompts")
        rows = [[_token_id(model, a)] if _is_token(a) else [_token_id(model, t) for t in a] for a in entries]
        if len({len(r) for r in rows}) != 1 or not rows[0]:
            raise LmscopeError("answers: every prompt needs the same number of answers (at least one)")
        ids = torch.tensor(rows)
    vocab = model.module(model.family.unembed).weight.shape[0]
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise LmscopeError(f"answers: token ids must lie in [0, {vocab})")
    return ids


def _is_token(a) -> bool:
    return isinstance(a, str) or (not isinstance(a, Sequence) and not (isinstance(a, Tensor) and a.ndim > 0))


def _token_id(model: Model, a: Token) -> int:
    if not isinstance(a, str):
        return operator.index(a.item() if isinstance(a, Tensor) else a)
    if model.tokenizer is None:
        raise LmscopeError(f"model {model.name} has no tokenizer: give answers as token ids")
    ids = model.tokenizer(a, add_special_tokens=False)["input_ids"]
    if not ids:
        raise LmscopeError(f"answer {a!r} tokenises to no tokens")
    return int(ids[0])


def _decode(model: Model, ids: Tensor) -> list:
    """Nested lists of token strings (the ids as strings without a tokenizer)."""
    if ids.ndim > 1:
        return [_decode(model, row) for row in ids]
    if model.tokenizer is None:
        return [str(int(t)) for t in ids]
    return [model.tokenizer.decode([int(t)]) for t in ids]


def _positions(mask: Tensor, position: Position) -> tuple[Tensor, Tensor]:
    """For each prompt, the column of the padded batch to read [batch] and its index among the
    prompt's real tokens [batch]. ``position`` counts real tokens (negative: from the end)."""
    lengths = mask.sum(1)
    pos = torch.as_tensor(position, dtype=torch.long, device=mask.device)
    pos = pos.expand(len(mask)) if pos.ndim == 0 else pos
    if pos.shape != lengths.shape:
        raise LmscopeError(f"position: one for every prompt or one per prompt ({len(mask)}), got {list(pos.shape)}")
    index = torch.where(pos < 0, lengths + pos, pos)
    if bool(((index < 0) | (index >= lengths)).any()):
        raise LmscopeError(f"position {position} out of range for prompts of {lengths.tolist()} tokens")
    count = mask.long().cumsum(1) - 1
    column = ((count == index[:, None]) & mask.bool()).long().argmax(1)
    return column, index


def _chunks(ids: Tensor, mask: Tensor, column: Tensor, batch_size: int) -> Iterator[tuple[slice, dict, Tensor]]:
    """Batches of at most ``batch_size`` prompts, without the columns that are padding in all of
    them: ``(rows, inputs for Model.run, column to read)``."""
    if batch_size < 1:
        raise LmscopeError(f"batch_size must be at least 1, not {batch_size}")
    for start in range(0, len(ids), batch_size):
        rows = slice(start, start + batch_size)
        real = mask[rows].any(0).nonzero().flatten()
        lo, hi = int(real[0]), int(real[-1]) + 1
        yield rows, {"input_ids": ids[rows, lo:hi], "attention_mask": mask[rows, lo:hi]}, column[rows] - lo


# -- the final norm, linearised --------------------------------------------------------------


@dataclass
class FinalNorm:
    """The final norm as ``norm(x) = (x - mean(x) [LayerNorm]) * gain / scale(x) + bias``:
    ``gain`` [d_model] (float32; RMSNorm's effective weight, ``1 + w`` in Gemma), ``bias``
    [d_model] or None, ``eps``."""

    layer_norm: bool
    gain: Tensor
    bias: Tensor | None
    eps: float

    @classmethod
    def of(cls, model: Model) -> FinalNorm:
        """The final norm of ``model`` (``nn.LayerNorm``, or an RMS norm of any family)."""
        norm = model.module(model.family.final_norm)
        if isinstance(norm, nn.LayerNorm):
            d = norm.normalized_shape[-1]
            weight, bias = parameter(norm), parameter(norm, "bias")
            gain = weight.float() if weight is not None else torch.ones(d, device=model.device)
            bias = bias.float() if bias is not None else None
            return cls(True, gain.detach(), None if bias is None else bias.detach(), float(norm.eps))
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-6
        ones = torch.ones(model.d_model, dtype=torch.float32, device=model.device)
        with torch.no_grad():  # norm(1) = gain / sqrt(1 + eps), whatever the family's formula for the gain
            gain = norm(ones).float() * (1 + eps) ** 0.5
        return cls(False, gain, None, float(eps))

    def scale(self, x: Tensor) -> Tensor:
        """The norm's divisor for residual ``x`` [..., d_model]: [..., 1] (float32)."""
        x = x.float()
        spread = x.var(-1, unbiased=False, keepdim=True) if self.layer_norm else x.pow(2).mean(-1, keepdim=True)
        return torch.sqrt(spread + self.eps)

    def linear(self, c: Tensor, scale: Tensor) -> Tensor:
        """Component ``c`` [..., d_model] as the norm passes it on with the divisor ``scale`` held
        fixed: ``(c - mean(c)) * gain / scale`` (no centring for RMSNorm), float32, no bias."""
        c = c.float()
        if self.layer_norm:
            c = c - c.mean(-1, keepdim=True)
        return c * self.gain / scale


# -- logit lens ------------------------------------------------------------------------------


def layer_labels(model: Model) -> list[str]:
    """Labels of the residual streams the lens reads: ``"embed"`` (entering layer 0), then
    ``"0"`` ... ``"{n_layers - 1}"`` (leaving each layer)."""
    return ["embed", *(str(layer) for layer in range(model.n_layers))]


@dataclass
class LogitLens(Result):
    """The logit lens of a batch of prompts at one position each.

    ``layers``: n_resid = n_layers + 1 labels (:func:`layer_labels`); ``positions`` [batch]: the
    position read, among each prompt's tokens; ``answers`` [batch, n_answers] with their
    strings ``answer_tokens`` and column names ``labels``; ``rank`` [n_resid, batch, n_answers]
    (1 = the top token), ``prob`` and ``logit`` (same shape); ``top_ids``, ``top_probs``
    [n_resid, batch, k] and ``top_tokens`` (their strings); ``norm``: ``"recompute"`` (the logit
    lens) or ``"final"`` (the final residual's norm scale for every layer); ``name``: the prompt
    set's name."""

    layers: list[str]
    positions: Tensor
    answers: Tensor
    answer_tokens: list[list[str]]
    labels: list[str]
    rank: Tensor
    prob: Tensor
    logit: Tensor
    top_ids: Tensor
    top_probs: Tensor
    top_tokens: list
    norm: str = "recompute"
    name: str = ""

    @property
    def n_prompts(self) -> int:
        return len(self.positions)

    def median_rank(self) -> Tensor:
        """Median rank over prompts, per layer and answer: [n_resid, n_answers]."""
        return self.rank.float().median(dim=1).values

    def mean_prob(self) -> Tensor:
        """Mean probability over prompts, per layer and answer: [n_resid, n_answers]."""
        return self.prob.mean(dim=1)

    def top1(self) -> Tensor:
        """Share of prompts whose answer is the top token, per layer and answer: [n_resid, n_answers]."""
        return (self.rank == 1).float().mean(dim=1)

    def first_layer(self, answer: int = 0, top: int = 1) -> Tensor:
        """Per prompt, the index into ``layers`` from which answer column ``answer`` stays within
        the top ``top`` tokens through the last layer; -1 where it is not there at the end: [batch]."""
        inside = self.rank[:, :, answer] <= top  # [n_resid, batch]
        stays = inside.flip(0).long().cumprod(0).flip(0).bool()  # inside here and at every later layer
        first = stays.long().argmax(0)
        return torch.where(stays[-1], first, torch.full_like(first, -1))

    def _suffix(self) -> str:
        return f"_{_slug(self.name)}" if self.name else ""

    def text(self) -> str:
        what = f" ({self.name})" if self.name else ""
        final = self.median_rank()[-1]
        parts = [f"{label}: median final rank {float(r):g}" for label, r in zip(self.labels, final)]
        return f"Logit lens{what} over {self.n_prompts} prompts; " + "; ".join(parts) + "." if parts else ""

    def tables(self) -> list[Table]:
        """Per layer: median rank, mean probability and top-1 share of each answer; then the top
        tokens of the first prompt at every layer."""
        med, mean, top1 = self.median_rank(), self.mean_prob(), self.top1()
        rows = []
        for i, layer in enumerate(self.layers):
            row: dict = {"layer": layer}
            for j, label in enumerate(self.labels):
                row[f"{label} median rank"] = float(med[i, j])
                row[f"{label} mean prob"] = round(float(mean[i, j]), 6)
                row[f"{label} top-1 share"] = round(float(top1[i, j]), 4)
            rows.append(row)
        what = f" ({self.name})" if self.name else ""
        tables = [Table(f"logit lens{what}: answers per layer over {self.n_prompts} prompts", rows)]
        tokens = [
            {
                "layer": layer,
                "top tokens": " | ".join(
                    f"{tok!r} {float(p):.3f}" for tok, p in zip(self.top_tokens[i][0], self.top_probs[i, 0])
                ),
            }
            for i, layer in enumerate(self.layers)
        ]
        tables.append(Table(f"logit lens{what}: top tokens of prompt 0 at position {int(self.positions[0])}", tokens))
        return tables

    def figures(self) -> list[Figure]:
        """The median rank (log scale) and the mean probability of each answer per layer."""
        if not self.labels:
            return []
        med, mean = self.median_rank(), self.mean_prob()
        what = f" ({self.name})" if self.name else ""
        return [
            Figure(
                f"logit_lens_rank{self._suffix()}",
                "lines",
                f"logit lens{what}: median rank of the answer (1 = top)",
                "layer",
                "rank",
                x=self.layers,
                series={label: med[:, j].tolist() for j, label in enumerate(self.labels)},
                log=True,
            ),
            Figure(
                f"logit_lens_prob{self._suffix()}",
                "lines",
                f"logit lens{what}: mean probability of the answer",
                "layer",
                "probability",
                x=self.layers,
                series={label: mean[:, j].tolist() for j, label in enumerate(self.labels)},
            ),
        ]


def logit_lens(
    model: Model,
    prompts: Inputs,
    answers: Answers | None = None,
    *,
    position: Position = -1,
    top_k: int = 10,
    norm: str = "recompute",
    labels: Sequence[str] | None = None,
    name: str = "",
    batch_size: int = 16,
) -> LogitLens:
    """The logit lens (nostalgebraist 2020) of ``prompts`` at ``position`` (per prompt, counting
    its real tokens; -1: the last): the residual stream entering layer 0 and leaving every
    layer, through the final norm and the unembedding (:meth:`Model.unembed`), with the rank and
    probability of ``answers`` (see :func:`answer_ids`; none: only the top tokens) and the
    ``top_k`` tokens at each layer. ``norm="final"`` divides every layer's residual by the final
    residual's norm scale instead (the linear lens of TransformerLens before 2026, see the module
    docstring). ``labels`` name the answer columns; ``name`` the prompt set. Prompts run
    ``batch_size`` at a time."""
    if norm not in NORMS:
        raise LmscopeError(f"norm must be one of {', '.join(NORMS)}, not '{norm}'")
    ids, mask = model.tokenize(prompts, padding_side="right")
    n = len(ids)
    answer = answer_ids(model, answers, n) if answers is not None else torch.empty(n, 0, dtype=torch.long)
    labels = _labels(labels, answer.shape[1])
    column, index = _positions(mask, position)
    sites = ["blocks.0.resid_pre", *(f"blocks.{layer}.resid_post" for layer in range(model.n_layers))]
    final_norm = FinalNorm.of(model) if norm == "final" else None
    weight = parameter(model.module(model.family.unembed))
    k = min(top_k, weight.shape[0])
    parts: dict[str, list[Tensor]] = {key: [] for key in ("rank", "prob", "logit", "top_ids", "top_probs")}
    with torch.no_grad():
        for rows, inputs, col in _chunks(ids, mask, column, batch_size):
            cache = model.run(inputs, capture=sites, logits=False).cache
            b = torch.arange(len(col), device=col.device)
            resid = torch.stack([cache[site][b, col] for site in sites])  # [n_resid, b, d_model]
            scale = None if final_norm is None else final_norm.scale(resid[-1])
            ans = answer[rows].to(model.device)  # [b, n_answers]
            chunk: dict[str, list[Tensor]] = {key: [] for key in parts}
            for x in resid:
                if final_norm is None:
                    logits = model.unembed(x).float()  # [b, vocab]
                else:
                    logits = (final_norm.linear(x, scale).to(weight.dtype) @ weight.T).float()
                logp = logits.log_softmax(-1)
                picked = logits.gather(-1, ans)  # [b, n_answers]
                chunk["logit"].append(picked)
                chunk["prob"].append(logp.gather(-1, ans).exp())
                chunk["rank"].append(1 + (logits[:, None, :] > picked[:, :, None]).sum(-1))
                top = logits.topk(k, dim=-1)
                chunk["top_ids"].append(top.indices)
                chunk["top_probs"].append(logp.gather(-1, top.indices).exp())
            for key, values in chunk.items():
                parts[key].append(torch.stack(values).cpu())  # [n_resid, b, ...]
    out = {key: torch.cat(values, dim=1) for key, values in parts.items()}
    return LogitLens(
        layers=layer_labels(model),
        positions=index.cpu(),
        answers=answer,
        answer_tokens=_decode(model, answer),
        labels=labels,
        rank=out["rank"],
        prob=out["prob"],
        logit=out["logit"],
        top_ids=out["top_ids"],
        top_probs=out["top_probs"],
        top_tokens=_decode(model, out["top_ids"]),
        norm=norm,
        name=name,
    )


def _labels(labels: Sequence[str] | None, n: int) -> list[str]:
    if labels is None:
        return ["answer"] if n == 1 else [f"answer {j + 1}" for j in range(n)]
    if len(labels) != n:
        raise LmscopeError(f"labels: {len(labels)} names for {n} answer columns")
    return list(labels)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "set"


# -- direct logit attribution ----------------------------------------------------------------


@dataclass
class Components:
    """The final residual stream at one position per prompt, split into what wrote it (float32):
    ``embed`` [batch, d_model] (``blocks.0.resid_pre``), ``heads`` [n_layers, n_heads, batch,
    d_model] (``z_h W_O[h]``, with the post-attention norm's scale where there is one),
    ``attn_bias`` [n_layers, batch, d_model] (what attention adds beyond its heads: the output
    projection's bias), ``mlps`` [n_layers, batch, d_model]; ``final`` [batch, d_model], the
    final residual stream they sum to."""

    embed: Tensor
    heads: Tensor
    attn_bias: Tensor
    mlps: Tensor
    final: Tensor


def decompose(model: Model, inputs: Inputs, column: Tensor, fold_value_biases: bool = False) -> Components:
    """One forward of ``inputs``, read at ``column`` [batch] (a column of the padded batch):
    the components of the final residual stream (:class:`Components`). With
    ``fold_value_biases``, the share of each head's constant value part (:func:`_value_bias_output`;
    constant since attention weights sum to 1) moves from the head to ``attn_bias``, as with
    TransformerLens's ``fold_ln=True, fold_value_biases=True``."""
    n, b = model.n_layers, torch.arange(len(column), device=model.device)
    column = column.to(model.device)
    attn: list[Tensor | None] = [None] * n

    def keep(layer: int):
        def fn(x: Tensor) -> None:
            attn[layer] = x[b, column]

        return fn

    last = f"blocks.{n - 1}.resid_post"
    sites = ["blocks.0.resid_pre", *(f"blocks.{layer}.attn.z" for layer in range(n)), last]
    with torch.no_grad(), mlp_contributions(model) as mlps:
        with hooked(model, [Hook("attn.contrib", layer, keep(layer)) for layer in range(n)]):
            cache = model.run(inputs, capture=sites, logits=False).cache
        heads = torch.stack(
            [head_contributions(model, layer, cache[f"blocks.{layer}.attn.z"][b, column]) for layer in range(n)]
        ).float()  # [n_layers, n_heads, batch, d_model]
        if fold_value_biases:
            heads = heads - torch.stack([_value_bias_output(model, layer) for layer in range(n)])[:, :, None]
        attn_out = torch.stack([a for a in attn if a is not None]).float()
        return Components(
            embed=cache["blocks.0.resid_pre"][b, column].float(),
            heads=heads,
            attn_bias=attn_out - heads.sum(1),
            mlps=torch.stack([m[b, column] for m in mlps if m is not None]).float(),
            final=cache[last][b, column].float(),
        )


def _value_bias_output(model: Model, layer: int) -> Tensor:
    """What each head of ``layer`` writes because of the constant part of its values alone,
    ``(b_ln W_V[h] + b_V[h]) W_O[h]`` with ``b_ln`` the bias of a LayerNorm before attention
    (which TransformerLens's ``fold_ln`` folds into ``b_V``): [n_heads, d_model] (float32)."""
    fam, H, D = model.family, model.n_heads, model.d_head_of(layer)
    w_v, b_v = head_params(model, layer, "v")  # [n_heads, d_head, d_model], [n_heads, d_head]: per query head
    const = torch.zeros(H, D, device=model.device) if b_v is None else b_v.float()
    norm = model.layer_module(layer, fam.attn_norm) if fam.attn_norm else None
    if isinstance(norm, nn.LayerNorm) and norm.bias is not None:
        const = const + torch.einsum("hdm,m->hd", w_v.float(), parameter(norm, "bias").float())
    if "norm" in fam.attn_contrib and bool(const.any()):
        raise LmscopeError("fold_value_biases: not defined for a model that normalises the attention output")
    o = model.layer_module(layer, fam.o_proj)
    weight = parameter(o)
    w_o = (weight if fam.conv1d else weight.T).unflatten(0, (H, D))  # [n_heads, d_head, d_model]
    return torch.einsum("hd,hde->he", const, w_o.float())


def _dla(norm: FinalNorm, c: Tensor, scale: Tensor, d: Tensor) -> Tensor:
    """Components ``c`` [..., batch, d_model] through the linearised final norm (divisor
    ``scale`` [batch, 1]) along directions ``d`` [batch, d_model]: [..., batch]."""
    return (norm.linear(c, scale) * d).sum(-1)


def _direction(model: Model, answer: Tensor, wrong: Tensor | None, center: bool) -> tuple[Tensor, Tensor]:
    """The unembedding direction d [batch, d_model] of answer (minus wrong answer, or minus the
    mean row with ``center``) and the unembedding bias along it [batch] (float32)."""
    head = model.module(model.family.unembed)
    weight, bias = parameter(head), parameter(head, "bias")
    d = weight[answer].float()
    c = bias[answer].float() if bias is not None else torch.zeros(len(answer), device=d.device)
    if wrong is not None:
        d = d - weight[wrong].float()
        c = c - (bias[wrong].float() if bias is not None else 0)
    elif center:
        d = d - weight.mean(0, dtype=torch.float32)
        c = c - (bias.mean(dtype=torch.float32) if bias is not None else 0)
    return d.detach(), c.detach()


@dataclass
class LogitAttribution(Result):
    """Direct logit attribution at one position per prompt (float32, per prompt): ``heads``
    [n_layers, n_heads, batch], ``attn_bias`` [n_layers, batch] (the output projection's bias,
    and the heads' value-bias shares with ``fold_value_biases``),
    ``mlps`` [n_layers, batch], ``embed`` [batch], ``constant`` [batch] (final norm bias and
    unembedding bias along the direction) and ``logit`` [batch]: the model's logit of the answer
    (minus the wrong answer's, or minus the mean logit with ``center_unembed``) before
    soft-capping, which all of the above sum to. ``answers``/``wrong_answers`` [batch] with their
    strings, ``positions`` [batch] among each prompt's tokens, ``name`` of the prompt set."""

    heads: Tensor
    attn_bias: Tensor
    mlps: Tensor
    embed: Tensor
    constant: Tensor
    logit: Tensor
    answers: Tensor
    wrong_answers: Tensor | None
    answer_tokens: list[str]
    wrong_tokens: list[str] | None
    positions: Tensor
    center_unembed: bool = False
    fold_value_biases: bool = False
    name: str = ""

    @property
    def n_prompts(self) -> int:
        return len(self.positions)

    def total(self) -> Tensor:
        """The sum of every component's attribution and the constant [batch] (equals ``logit``)."""
        return self.heads.sum((0, 1)) + self.attn_bias.sum(0) + self.mlps.sum(0) + self.embed + self.constant

    def mean_heads(self) -> Tensor:
        """Mean over prompts of each head's attribution: [n_layers, n_heads]."""
        return self.heads.mean(-1)

    def top_heads(self, n: int = 10) -> list[tuple[int, int, float]]:
        """The ``n`` heads of largest mean |attribution|, as ``(layer, head, mean attribution)``."""
        mean = self.mean_heads()
        index = mean.abs().flatten().topk(min(n, mean.numel())).indices
        return [(int(i) // mean.shape[1], int(i) % mean.shape[1], float(mean.flatten()[i])) for i in index]

    def _what(self) -> str:
        answer = _common(self.answer_tokens, "answer")
        if self.wrong_tokens is not None:
            return f"logit({answer}) - logit({_common(self.wrong_tokens, 'wrong answer')})"
        return f"logit({answer})" + (" - mean logit" if self.center_unembed else "")

    def _suffix(self) -> str:
        return f"_{_slug(self.name)}" if self.name else ""

    def to_json(self) -> dict:
        out = super().to_json()
        out["top_heads"] = [list(t) for t in self.top_heads()]
        return out

    def text(self) -> str:
        heads = ", ".join(f"L{layer}H{head} ({value:+.3f})" for layer, head, value in self.top_heads(5))
        what = f" ({self.name})" if self.name else ""
        return (
            f"Direct logit attribution{what} of {self._what()}, mean over {self.n_prompts} prompts "
            f"(mean value {float(self.logit.mean()):.3f}); top heads: {heads}."
        )

    def tables(self) -> list[Table]:
        """The top heads; per layer the heads' sum, the attention bias and the MLP; the embedding,
        the constant and the logit (means over prompts)."""
        what = f" ({self.name})" if self.name else ""
        top = [{"head": f"L{layer}H{head}", "mean attribution": value} for layer, head, value in self.top_heads(20)]
        layers = [
            {
                "layer": layer,
                "heads": float(self.heads[layer].sum(0).mean()),
                "attention bias": float(self.attn_bias[layer].mean()),
                "MLP": float(self.mlps[layer].mean()),
            }
            for layer in range(self.heads.shape[0])
        ]
        summary = [
            {"part": "embedding", "mean": float(self.embed.mean())},
            {"part": "all heads", "mean": float(self.heads.sum((0, 1)).mean())},
            {"part": "attention biases", "mean": float(self.attn_bias.sum(0).mean())},
            {"part": "all MLPs", "mean": float(self.mlps.sum(0).mean())},
            {"part": "constant (biases after the residual stream)", "mean": float(self.constant.mean())},
            {"part": f"{self._what()} (the sum)", "mean": float(self.logit.mean())},
        ]
        return [
            Table(f"direct logit attribution{what}: top heads by |mean|", top),
            Table(f"direct logit attribution{what} per layer", layers),
            Table(f"direct logit attribution{what}: the parts of {self._what()}", summary),
        ]

    def figures(self) -> list[Figure]:
        """The [layer, head] heatmap of mean attributions and the per-layer attention / MLP curve."""
        what = f" ({self.name})" if self.name else ""
        mean = self.mean_heads()
        return [
            _heads_figure(f"dla_heads{self._suffix()}", f"direct logit attribution{what}: {self._what()}", mean),
            Figure(
                f"dla_layers{self._suffix()}",
                "lines",
                f"direct logit attribution{what} per layer: {self._what()}",
                "layer",
                "mean attribution",
                x=list(range(mean.shape[0])),
                series={
                    "attention (heads + bias)": (self.heads.sum(1) + self.attn_bias).mean(-1).tolist(),
                    "MLP": self.mlps.mean(-1).tolist(),
                },
            ),
        ]


def _heads_figure(name: str, title: str, grid: Tensor) -> Figure:
    return Figure(
        name,
        "heatmap",
        title,
        "head",
        "layer",
        z=grid.tolist(),
        x=list(range(grid.shape[1])),
        y=list(range(grid.shape[0])),
        diverging=True,
        value_label="logit attribution",
    )


def _common(tokens: Sequence[str], fallback: str) -> str:
    return repr(tokens[0]) if len(set(tokens)) == 1 else fallback


def direct_logit_attribution(
    model: Model,
    prompts: Inputs,
    answers: Answers,
    wrong_answers: Answers | None = None,
    *,
    position: Position = -1,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
    name: str = "",
    batch_size: int = 16,
) -> LogitAttribution:
    """Direct logit attribution (Elhage et al. 2021; TransformerLens's ``stack_head_results`` /
    ``decompose_resid`` with ``apply_ln=True``) of every head, attention bias and MLP, and the
    embedding, to the logit of ``answers`` (minus ``wrong_answers``) at ``position``: each
    component divided by the final norm's scale of the full final residual stream (centred for
    LayerNorm), times the norm's weight, dotted with the unembedding direction (see the module
    docstring). One answer (and wrong answer) per prompt (:func:`answer_ids`, first column).
    ``fold_value_biases`` moves each head's value-bias share to ``attn_bias`` (:func:`decompose`),
    as TransformerLens does by default; ``center_unembed`` see the module docstring."""
    ids, mask = model.tokenize(prompts, padding_side="right")
    n = len(ids)
    answer = answer_ids(model, answers, n)[:, 0]
    wrong = None if wrong_answers is None else answer_ids(model, wrong_answers, n)[:, 0]
    column, index = _positions(mask, position)
    norm = FinalNorm.of(model)
    final_norm = model.module(model.family.final_norm)
    keys = ("heads", "attn_bias", "mlps", "embed", "constant", "logit")
    parts: dict[str, list[Tensor]] = {key: [] for key in keys}
    with torch.no_grad():
        for rows, inputs, col in _chunks(ids, mask, column, batch_size):
            comp = decompose(model, inputs, col, fold_value_biases)
            d, unembed_bias = _direction(
                model,
                answer[rows].to(model.device),
                None if wrong is None else wrong[rows].to(model.device),
                center_unembed,
            )
            scale = norm.scale(comp.final)  # [b, 1]
            constant = unembed_bias + ((norm.bias * d).sum(-1) if norm.bias is not None else 0)
            logit = (final_norm(comp.final.to(model.hf.dtype)).float() * d).sum(-1) + unembed_bias
            values = {
                "heads": _dla(norm, comp.heads, scale, d),
                "attn_bias": _dla(norm, comp.attn_bias, scale, d),
                "mlps": _dla(norm, comp.mlps, scale, d),
                "embed": _dla(norm, comp.embed, scale, d),
                "constant": constant,
                "logit": logit,
            }
            for key, value in values.items():
                parts[key].append(value.cpu())
    out = {key: torch.cat(values, dim=-1) for key, values in parts.items()}
    return LogitAttribution(
        **out,
        answers=answer,
        wrong_answers=wrong,
        answer_tokens=_decode(model, answer),
        wrong_tokens=None if wrong is None else _decode(model, wrong),
        positions=index.cpu(),
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
        name=name,
    )


# -- what one component promotes -------------------------------------------------------------

_COMPONENT = re.compile(r"^(?:a(\d+)\.h(\d+)|m(\d+)|a(\d+)\.bias|embed)$")


@dataclass
class ComponentTokens(Result):
    """The tokens each component's output promotes most, at one position per prompt:
    ``components`` names (``a{L}.h{H}``, ``a{L}.bias``, ``m{L}``, ``embed``); ``ids``,
    ``logits`` [n_components, batch, k] (the component's output through the linearised final norm
    and the unembedding, without biases) and ``tokens`` (strings); ``positions`` [batch]."""

    components: list[str]
    ids: Tensor
    logits: Tensor
    tokens: list
    positions: Tensor
    center_unembed: bool = False

    def tables(self) -> list[Table]:
        """Per component, its top tokens for every prompt."""
        rows = [
            {
                "component": name,
                "prompt": p,
                "top tokens": " | ".join(f"{t!r} {float(v):.2f}" for t, v in zip(self.tokens[i][p], self.logits[i, p])),
            }
            for i, name in enumerate(self.components)
            for p in range(self.logits.shape[1])
        ]
        return [Table("tokens each component promotes (direct logits)", rows)]


def component_top_tokens(
    model: Model,
    prompts: Inputs,
    components: Sequence[str],
    *,
    position: Position = -1,
    k: int = 10,
    center_unembed: bool = False,
    batch_size: int = 16,
) -> ComponentTokens:
    """The ``k`` tokens whose logits each component raises most at ``position`` (as the Temporal
    Heads notebook's ``draw_output_pattern_with_text``): the component's output, divided by the
    final norm's scale of the full final residual (centred for LayerNorm), times the norm's
    weight, times the unembedding (minus its mean row with ``center_unembed``). Components:
    ``a{L}.h{H}`` (a head), ``a{L}.bias`` (attention's output beyond its heads), ``m{L}`` (an
    MLP), ``embed``."""
    for c in components:
        match = _COMPONENT.match(c)
        if match is None:
            raise LmscopeError(f"component '{c}': expected a{{L}}.h{{H}}, a{{L}}.bias, m{{L}} or embed")
        layer = next((int(g) for g in (match[1], match[3], match[4]) if g is not None), 0)
        if not 0 <= layer < model.n_layers or (match[2] is not None and not 0 <= int(match[2]) < model.n_heads):
            raise LmscopeError(f"component '{c}' out of range ({model.n_layers} layers, {model.n_heads} heads)")
    ids, mask = model.tokenize(prompts, padding_side="right")
    column, index = _positions(mask, position)
    norm = FinalNorm.of(model)
    weight = parameter(model.module(model.family.unembed))
    shift = weight.mean(0, dtype=torch.float32) if center_unembed else None
    k = min(k, weight.shape[0])
    got_ids, got_logits = [], []
    with torch.no_grad():
        for _, inputs, col in _chunks(ids, mask, column, batch_size):
            comp = decompose(model, inputs, col)
            scale = norm.scale(comp.final)
            outputs = torch.stack([_component(comp, c) for c in components])  # [n_comp, b, d_model]
            x = norm.linear(outputs, scale)
            logits = (x.to(weight.dtype) @ weight.T).float()
            if shift is not None:
                logits = logits - (x * shift).sum(-1, keepdim=True)
            top = logits.topk(k, dim=-1)
            got_ids.append(top.indices.cpu())
            got_logits.append(top.values.cpu())
    top_ids = torch.cat(got_ids, dim=1)
    return ComponentTokens(
        components=list(components),
        ids=top_ids,
        logits=torch.cat(got_logits, dim=1),
        tokens=_decode(model, top_ids),
        positions=index.cpu(),
        center_unembed=center_unembed,
    )


def _component(comp: Components, name: str) -> Tensor:
    match = _COMPONENT.match(name)
    assert match is not None
    if match[1] is not None:
        return comp.heads[int(match[1]), int(match[2])]
    if match[3] is not None:
        return comp.mlps[int(match[3])]
    if match[4] is not None:
        return comp.attn_bias[int(match[4])]
    return comp.embed


# -- prompt sets side by side ----------------------------------------------------------------


@dataclass
class LensComparison(Result):
    """Logit lenses of several prompt sets of one model (e.g. numeric-year vs alias prompts),
    compared on answer column ``answer``: ``sets`` name -> :class:`LogitLens`."""

    sets: dict[str, LogitLens]
    answer: int = 0

    def to_json(self) -> dict:
        return {
            "answer": self.answer,
            "layers": self._layers(),
            "median_rank": {k: v.median_rank()[:, self.answer].tolist() for k, v in self.sets.items()},
            "mean_prob": {k: v.mean_prob()[:, self.answer].tolist() for k, v in self.sets.items()},
            "sets": {k: v.to_json() for k, v in self.sets.items()},
        }

    def _layers(self) -> list[str]:
        return next(iter(self.sets.values())).layers

    def text(self) -> str:
        parts = []
        for k, lens in self.sets.items():
            first = lens.first_layer(self.answer)
            reached = first[first >= 0]
            where = f"median first layer {lens.layers[int(reached.float().median())]}" if len(reached) else "never"
            parts.append(f"{k}: answer top-1 to the end in {len(reached)}/{lens.n_prompts} prompts ({where})")
        return "; ".join(parts) + "."

    def tables(self) -> list[Table]:
        """Per layer, each set's median rank and mean probability of the answer."""
        rows = []
        for i, layer in enumerate(self._layers()):
            row: dict = {"layer": layer}
            for k, lens in self.sets.items():
                row[f"{k} median rank"] = float(lens.median_rank()[i, self.answer])
                row[f"{k} mean prob"] = round(float(lens.mean_prob()[i, self.answer]), 6)
            rows.append(row)
        return [Table("logit lens: " + " vs ".join(self.sets), rows)]

    def figures(self) -> list[Figure]:
        """The median rank (log scale) and mean probability per layer, one curve per set."""
        x = self._layers()
        return [
            Figure(
                "logit_lens_rank_compare",
                "lines",
                "logit lens: median rank of the answer (1 = top)",
                "layer",
                "rank",
                x=x,
                series={k: v.median_rank()[:, self.answer].tolist() for k, v in self.sets.items()},
                log=True,
            ),
            Figure(
                "logit_lens_prob_compare",
                "lines",
                "logit lens: mean probability of the answer",
                "layer",
                "probability",
                x=x,
                series={k: v.mean_prob()[:, self.answer].tolist() for k, v in self.sets.items()},
            ),
        ]


@dataclass
class AttributionComparison(Result):
    """Direct logit attributions of several prompt sets of one model, side by side: ``sets``
    name -> :class:`LogitAttribution`. With two sets, the difference is first minus second."""

    sets: dict[str, LogitAttribution]

    def difference(self) -> Tensor | None:
        """Mean head attributions of the first set minus the second's [n_layers, n_heads] (two sets only)."""
        if len(self.sets) != 2:
            return None
        a, b = self.sets.values()
        return a.mean_heads() - b.mean_heads()

    def to_json(self) -> dict:
        diff = self.difference()
        return {
            "mean_heads": {k: v.mean_heads().tolist() for k, v in self.sets.items()},
            "difference": None if diff is None else diff.tolist(),
            "sets": {k: v.to_json() for k, v in self.sets.items()},
        }

    def tables(self) -> list[Table]:
        """The heads of largest |mean attribution| in any set (or of largest |difference|), with
        each set's value."""
        means = {k: v.mean_heads() for k, v in self.sets.items()}
        diff = self.difference()
        key = diff.abs() if diff is not None else torch.stack(list(means.values())).abs().amax(0)
        n_heads = key.shape[1]
        rows = []
        for i in key.flatten().topk(min(20, key.numel())).indices.tolist():
            layer, head = divmod(i, n_heads)
            row: dict = {"head": f"L{layer}H{head}", **{k: float(m[layer, head]) for k, m in means.items()}}
            if diff is not None:
                row["difference"] = float(diff[layer, head])
            rows.append(row)
        order = "|difference|" if diff is not None else "|mean attribution|"
        return [Table(f"direct logit attribution: {' vs '.join(self.sets)}, top heads by {order}", rows)]

    def figures(self) -> list[Figure]:
        """One [layer, head] heatmap per set, and the difference for two sets."""
        figures = [
            _heads_figure(f"dla_heads_{_slug(k)}", f"direct logit attribution ({k}): {v._what()}", v.mean_heads())
            for k, v in self.sets.items()
        ]
        diff = self.difference()
        if diff is not None:
            a, b = self.sets
            figures.append(_heads_figure("dla_heads_difference", f"direct logit attribution: {a} - {b}", diff))
        return figures


def compare(
    sets: Mapping[str, LogitLens] | Mapping[str, LogitAttribution], answer: int = 0
) -> LensComparison | AttributionComparison:
    """Several prompt sets side by side: ``{"numeric": lens_a, "alias": lens_b}`` gives a
    :class:`LensComparison` (on answer column ``answer``), attributions an
    :class:`AttributionComparison`."""
    if not sets:
        raise LmscopeError("compare: no prompt sets")
    values = list(sets.values())
    if all(isinstance(v, LogitLens) for v in values):
        if len({tuple(v.layers) for v in values}) != 1:
            raise LmscopeError("compare: the lenses read different layers (different models?)")
        if any(not 0 <= answer < len(v.labels) for v in values):
            raise LmscopeError(f"compare: answer column {answer} missing from a lens")
        return LensComparison(dict(sets), answer)
    if all(isinstance(v, LogitAttribution) for v in values):
        if len({tuple(v.heads.shape[:2]) for v in values}) != 1:
            raise LmscopeError("compare: the attributions have different layers or heads (different models?)")
        return AttributionComparison(dict(sets))
    raise LmscopeError("compare: give only LogitLens results or only LogitAttribution results")

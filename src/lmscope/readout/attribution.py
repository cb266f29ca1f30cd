"""Direct logit attribution and what single components promote: how each component writing
to the final residual stream moves the logits.

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


Positions are absolute indices into each prompt's token sequence, negative from its end
(``-1``: its last token), whatever the padding (:mod:`lmscope.readout.prompts`). Results
(:class:`LogitAttribution`, :class:`ComponentTokens`) are
:class:`~lmscope.reports.results.Result` objects; :func:`lmscope.readout.comparison.compare`
puts several prompt sets (e.g. numeric-year vs alias prompts) side by side.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmscope.core.anatomy import head_contributions, head_params, mlp_contributions
from lmscope.core.errors import LmscopeError
from lmscope.core.hooks import Hook, hooked
from lmscope.core.model import Inputs, Model
from lmscope.core.weights import parameter
from lmscope.readout.norm import FinalNorm
from lmscope.readout.prompts import Answers, Position, answer_ids, batches, read_prompts, slug, token_strings
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table


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
    """One forward of ``inputs`` ([batch, pos] ids with their mask), read at ``column`` [batch]
    (a column of the padded batch, e.g. from :func:`lmscope.readout.prompts.read_prompts`):
    the components of the final residual stream (:class:`Components`, Elhage et al. 2021). With
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
        return f"_{slug(self.name)}" if self.name else ""

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
            heads_figure(f"dla_heads{self._suffix()}", f"direct logit attribution{what}: {self._what()}", mean),
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


def heads_figure(name: str, title: str, grid: Tensor) -> Figure:
    """A diverging [layer, head] heatmap of attributions ``grid`` [n_layers, n_heads]."""
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
    ``position``: one, or one per prompt [n_prompts], as :mod:`lmscope.readout.prompts` states
    (texts: an index into each text's tokens; token ids: into the given columns; negative from
    the end, -1: the last token). ``fold_value_biases`` moves each head's
    value-bias share to ``attn_bias`` (:func:`decompose`), as TransformerLens does by default;
    ``center_unembed`` see the module docstring. Result: :class:`LogitAttribution`, ``heads``
    [n_layers, n_heads, n_prompts] etc."""
    ids, mask, column, index = read_prompts(model, prompts, position)
    n = len(ids)
    answer = answer_ids(model, answers, n)[:, 0]
    wrong = None if wrong_answers is None else answer_ids(model, wrong_answers, n)[:, 0]
    norm = FinalNorm.of(model)
    final_norm = model.module(model.family.final_norm)
    keys = ("heads", "attn_bias", "mlps", "embed", "constant", "logit")
    parts: dict[str, list[Tensor]] = {key: [] for key in keys}
    with torch.no_grad():
        for rows, inputs, col in batches(ids, mask, column, batch_size):
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
        answer_tokens=token_strings(model, answer),
        wrong_tokens=None if wrong is None else token_strings(model, wrong),
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
    MLP), ``embed``. ``position``: as in :func:`direct_logit_attribution`. Result:
    :class:`ComponentTokens`, ``ids`` and ``logits`` [n_components, n_prompts, k]."""
    for c in components:
        match = _COMPONENT.match(c)
        if match is None:
            raise LmscopeError(f"component '{c}': expected a{{L}}.h{{H}}, a{{L}}.bias, m{{L}} or embed")
        layer = next((int(g) for g in (match[1], match[3], match[4]) if g is not None), 0)
        if not 0 <= layer < model.n_layers or (match[2] is not None and not 0 <= int(match[2]) < model.n_heads):
            raise LmscopeError(f"component '{c}' out of range ({model.n_layers} layers, {model.n_heads} heads)")
    ids, mask, column, index = read_prompts(model, prompts, position)
    norm = FinalNorm.of(model)
    weight = parameter(model.module(model.family.unembed))
    shift = weight.mean(0, dtype=torch.float32) if center_unembed else None
    k = min(k, weight.shape[0])
    got_ids, got_logits = [], []
    with torch.no_grad():
        for _, inputs, col in batches(ids, mask, column, batch_size):
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
        tokens=token_strings(model, top_ids),
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

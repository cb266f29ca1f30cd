"""The logit lens: what the residual stream entering the first layer and leaving every layer
says about the next token, read as if it were the last one.

**Logit lens** (nostalgebraist 2020, "interpreting GPT: the logit lens"). The residual stream
entering the first layer (``blocks.0.resid_pre``: the embedding, label ``"embed"``) and leaving
every layer L (``blocks.{L}.resid_post``, label ``"L"``) is read through the final norm and the
unembedding, as :meth:`Model.unembed` applies them (norm statistics recomputed from that
residual, the norm's weight and bias, the unembedding's bias, Gemma 2/3's soft-capping). After
the last layer this is the model's own output. :func:`stream_logits` is that readout, the one
implementation every lens here uses; :func:`ranks_and_probs` the one rank and probability of
chosen tokens in the logits it gives (rank 1 = the top token: one plus the number of tokens of
strictly larger logit).

**Tuned lens** (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the
Tuned Lens"): the same readout after a learned affine translator per residual stream
(:mod:`lmscope.readout.tuned`); pass ``tuned=`` to :func:`stream_logits` or :func:`lens`.

``norm="final"`` (:func:`logit_lens`) reproduces instead what
``ActivationCache.accumulated_resid(apply_ln=True)`` computed in TransformerLens before its 2026
fix (PR #1180), which the Temporal Heads notebook (Park et al. 2025, ``3.logit_lens.ipynb``)
used with ``fold_ln=True``: every layer's residual is divided by the FINAL residual's cached
norm scale (centred first under LayerNorm), times the norm's weight, then the unembedding
without any bias and without soft-capping. That lens is linear in the residual (at layer L it
is the sum of the direct logit attributions of all components before L). In RMSNorm models
without an unembedding bias its ranks equal the standard lens's (the two differ by a positive
factor per layer); its probabilities do not (the factor acts as a temperature).

Two readings, one result type each:

- :func:`logit_lens` -> :class:`LogitLens`: a batch of prompts at one position each, with the
  rank and probability of answer tokens (the form the circuit and Temporal Heads analyses use);
- :func:`lens` -> :class:`LensResult`: one text at every position, with the rank and
  probability of the next token (or chosen tokens), KL to the final logits, and the top tokens
  at one position (``lmscope lens``).

Positions are absolute indices into each prompt's token sequence, negative from its end
(``-1``: the last token), as in :mod:`lmscope.core.interventions`; see
:mod:`lmscope.readout.prompts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.core.model import Inputs, Model
from lmscope.core.stats import kl_divergence
from lmscope.core.weights import parameter
from lmscope.readout.norm import FinalNorm
from lmscope.readout.prompts import Answers, Position, answer_ids, batches, read_prompts, slug, token_strings
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table

if TYPE_CHECKING:
    from lmscope.readout.tuned import TunedLens

NORMS = ("recompute", "final")


# -- the residual streams and their readout --------------------------------------------------


def layer_labels(model: Model) -> list[str]:
    """Labels of the n_resid = n_layers + 1 residual streams a lens reads: ``"embed"``
    (entering layer 0), then ``"0"`` ... ``"{n_layers - 1}"`` (leaving each layer)."""
    return ["embed", *(str(layer) for layer in range(model.n_layers))]


def resid_sites(model: Model) -> list[str]:
    """The sites of those streams, in the order of :func:`layer_labels`: ``blocks.0.resid_pre``
    (the embedding), then every layer's ``resid_post``."""
    return ["blocks.0.resid_pre", *(f"blocks.{layer}.resid_post" for layer in range(model.n_layers))]


def stream_index(model: Model, layer: int | str) -> int:
    """Index into :func:`layer_labels` of ``layer``: ``"embed"`` (0), or a layer L whose
    ``resid_post`` is read (L + 1; negative L counts from the end)."""
    if layer == "embed":
        return 0
    layer = int(layer)
    if not -model.n_layers <= layer < model.n_layers:
        raise LmscopeError(f"layer {layer} out of range (model has {model.n_layers} layers)")
    return layer % model.n_layers + 1


def stream_logits(
    model: Model,
    index: int,
    resid: Tensor,
    *,
    tuned: TunedLens | None = None,
    norm: FinalNorm | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """The logit lens readout of residual stream ``index`` (into :func:`layer_labels`):
    ``resid`` [..., d_model] -> logits [..., vocab] (float32), through the final norm and the
    unembedding (:meth:`Model.unembed`). With ``tuned`` (Belrose et al. 2023), through the
    stream's translator first. With ``norm`` (the linearised final norm) and its divisor
    ``scale`` [..., 1]: ``norm.linear(resid, scale)`` times the unembedding, without biases or
    soft-capping (``norm="final"`` of :func:`logit_lens`)."""
    if norm is not None:
        if scale is None:
            raise LmscopeError("stream_logits: a fixed final norm needs its divisor (scale)")
        weight = parameter(model.module(model.family.unembed))
        return (norm.linear(resid, scale).to(weight.dtype) @ weight.T).float()
    if tuned is not None:
        resid = tuned.translators(index, resid).to(model.hf.dtype)
    return model.unembed(resid).float()


def ranks_and_probs(logits: Tensor, targets: Tensor, logp: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The logit, probability and rank (1 = the top token: one plus the number of tokens of
    strictly larger logit) of ``targets`` [..., n] in ``logits`` [..., vocab]: three tensors
    [..., n]. ``logp``: ``logits.log_softmax(-1)`` if already computed."""
    logp = logits.log_softmax(-1) if logp is None else logp
    picked = logits.gather(-1, targets)
    rank = 1 + (logits.unsqueeze(-2) > picked.unsqueeze(-1)).sum(-1)
    return picked, logp.gather(-1, targets).exp(), rank


def top_tokens(logits: Tensor, k: int, logp: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` tokens of largest logit in ``logits`` [..., vocab] (at most the vocabulary):
    ids and probabilities, [..., k] each. ``logp``: ``logits.log_softmax(-1)`` if already computed."""
    logp = logits.log_softmax(-1) if logp is None else logp
    top = logits.topk(min(k, logits.shape[-1]), dim=-1)
    return top.indices, logp.gather(-1, top.indices).exp()


def kl_to_final(lens_logits: Tensor, final_logits: Tensor) -> Tensor:
    """``KL(p_final || p_lens)`` per position, in nats: logits [..., vocab] -> [...]
    (:func:`lmscope.core.stats.kl_divergence`)."""
    return kl_divergence(final_logits, lens_logits, logits=True)


# -- a batch of prompts at one position each --------------------------------------------------


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
        return f"_{slug(self.name)}" if self.name else ""

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
    """The logit lens (nostalgebraist 2020) of ``prompts`` (n_prompts texts, or ids with an
    attention mask) at ``position`` (one, or one per prompt, as :mod:`lmscope.readout.prompts`
    states: texts are indexed by their own tokens, token ids by their columns; negative from
    the end, -1: the last token): the residual stream entering layer 0
    and leaving every layer, through the final norm and the unembedding (:func:`stream_logits`),
    with the rank and probability of ``answers`` [n_prompts, n_answers] (see :func:`answer_ids`;
    none: only the top tokens) and the ``top_k`` tokens at each layer. ``norm="final"`` divides
    every layer's residual by the final residual's norm scale instead (the linear lens of
    TransformerLens before 2026, see the module docstring). ``labels`` name the answer columns;
    ``name`` the prompt set. Prompts run ``batch_size`` at a time."""
    if norm not in NORMS:
        raise LmscopeError(f"norm must be one of {', '.join(NORMS)}, not '{norm}'")
    ids, mask, column, index = read_prompts(model, prompts, position)
    n = len(ids)
    answer = answer_ids(model, answers, n) if answers is not None else torch.empty(n, 0, dtype=torch.long)
    labels = _labels(labels, answer.shape[1])
    sites = resid_sites(model)
    final_norm = FinalNorm.of(model) if norm == "final" else None
    parts: dict[str, list[Tensor]] = {key: [] for key in ("rank", "prob", "logit", "top_ids", "top_probs")}
    with torch.no_grad():
        for rows, inputs, col in batches(ids, mask, column, batch_size):
            cache = model.run(inputs, capture=sites, logits=False).cache
            b = torch.arange(len(col), device=col.device)
            resid = torch.stack([cache[site][b, col] for site in sites])  # [n_resid, b, d_model]
            scale = None if final_norm is None else final_norm.scale(resid[-1])
            ans = answer[rows].to(model.device)  # [b, n_answers]
            chunk: dict[str, list[Tensor]] = {key: [] for key in parts}
            for i, x in enumerate(resid):
                logits = stream_logits(model, i, x, norm=final_norm, scale=scale)  # [b, vocab]
                logp = logits.log_softmax(-1)
                logit, prob, rank = ranks_and_probs(logits, ans, logp)  # [b, n_answers] each
                top_ids, top_probs = top_tokens(logits, top_k, logp)  # [b, k] each
                for key, value in zip(parts, (rank, prob, logit, top_ids, top_probs)):
                    chunk[key].append(value)
            for key, values in chunk.items():
                parts[key].append(torch.stack(values).cpu())  # [n_resid, b, ...]
    out = {key: torch.cat(values, dim=1) for key, values in parts.items()}
    return LogitLens(
        layers=layer_labels(model),
        positions=index.cpu(),
        answers=answer,
        answer_tokens=token_strings(model, answer),
        labels=labels,
        rank=out["rank"],
        prob=out["prob"],
        logit=out["logit"],
        top_ids=out["top_ids"],
        top_probs=out["top_probs"],
        top_tokens=token_strings(model, out["top_ids"]),
        norm=norm,
        name=name,
    )


def _labels(labels: Sequence[str] | None, n: int) -> list[str]:
    if labels is None:
        return ["answer"] if n == 1 else [f"answer {j + 1}" for j in range(n)]
    if len(labels) != n:
        raise LmscopeError(f"labels: {len(labels)} names for {n} answer columns")
    return list(labels)


# -- one text at every position ---------------------------------------------------------------


@dataclass
class LensResult(Result):
    """A lens over one text. ``lens``: ``"logit"`` or ``"tuned"``; ``tokens``: the text's token
    strings [n_pos]; ``layers``: n_resid labels (:func:`layer_labels`); ``targets`` [n_pos,
    n_targets] with ``target_tokens`` and column ``labels`` (``"next token"``: the actual next
    token, the model's own top prediction at the last position; or chosen tokens); ``prob``,
    ``rank`` [n_resid, n_pos, n_targets] (rank 1 = the top token); ``kl`` [n_resid, n_pos]:
    KL(p_final || p_lens) in nats; ``position``: where ``top_ids``, ``top_probs`` [n_resid, k]
    and ``top_tokens`` are read."""

    model: str
    lens: str
    tokens: list[str]
    layers: list[str]
    targets: Tensor
    target_tokens: list
    labels: list[str]
    prob: Tensor
    rank: Tensor
    kl: Tensor
    position: int
    top_ids: Tensor
    top_probs: Tensor
    top_tokens: list

    def text(self) -> str:
        p = self.position
        first = (self.rank[:, p, 0] == 1).flip(0).long().cumprod(0).sum()  # streams at the end with rank 1
        where = f"from layer {self.layers[len(self.layers) - int(first)]}" if int(first) else "at no stream"
        return (
            f"{self.lens.capitalize()} lens of {self.model}: at position {p} ({self.tokens[p]!r}), "
            f"{self.labels[0]} {self.target_tokens[p][0]!r} is the top token {where} to the end; "
            f"mean KL to the final logits per stream {[round(float(v), 3) for v in self.kl.mean(1)]}."
        )

    def tables(self) -> list[Table]:
        """Per stream: the target's probability and rank at every position (first target); then
        the top tokens per stream at ``position``."""
        cols = [f"{i}:{t!r}" for i, t in enumerate(self.tokens)]
        rows = [
            {
                "layer": layer,
                **{c: f"{float(self.prob[i, p, 0]):.3f} #{int(self.rank[i, p, 0])}" for p, c in enumerate(cols)},
            }
            for i, layer in enumerate(self.layers)
        ]
        tops = [
            {
                "layer": layer,
                "KL": round(float(self.kl[i, self.position]), 4),
                "top tokens": " | ".join(
                    f"{t!r} {float(q):.3f}" for t, q in zip(self.top_tokens[i], self.top_probs[i])
                ),
            }
            for i, layer in enumerate(self.layers)
        ]
        what = f"{self.lens} lens"
        return [
            Table(f"{what}: probability and rank of the {self.labels[0]} (target of each position)", rows),
            Table(f"{what}: top tokens at position {self.position} ({self.tokens[self.position]!r})", tops),
        ]

    def figures(self) -> list[Figure]:
        """Layer x position heatmaps: the probability of each target, and the rank (log colour)
        of the first."""
        x = [f"{i}:{t}" for i, t in enumerate(self.tokens)]
        figures = [
            Figure(
                f"{self.lens}_lens_prob_{slug(label)}",
                "heatmap",
                f"{self.lens} lens: probability of the {label}",
                "position",
                "layer",
                x=x,
                y=self.layers,
                z=self.prob[:, :, j].tolist(),
                value_label="probability",
            )
            for j, label in enumerate(self.labels)
        ]
        figures.append(
            Figure(
                f"{self.lens}_lens_rank",
                "heatmap",
                f"{self.lens} lens: rank of the {self.labels[0]} (1 = top)",
                "position",
                "layer",
                x=x,
                y=self.layers,
                z=self.rank[:, :, 0].float().tolist(),
                log=True,
                value_label="rank",
            )
        )
        return figures


def lens(
    model: Model,
    text: str | Tensor,
    *,
    tuned: TunedLens | None = None,
    tokens: Sequence[int | str] | None = None,
    position: int = -1,
    top_k: int = 5,
) -> LensResult:
    """The logit lens (nostalgebraist 2020), or the ``tuned`` lens (Belrose et al. 2023), of one
    ``text`` (a string or token ids [n_pos] / [1, n_pos]) at every position: per residual stream
    (:func:`stream_logits`) and position, the probability and rank of the next token (the
    model's top prediction at the last position), or of ``tokens`` (ids or strings, first token
    of each; the same at every position), and ``KL(p_final || p_lens)``; the ``top_k`` tokens
    per stream at ``position`` (an index into the text's tokens, negative from its end)."""
    if isinstance(text, Tensor) and text.ndim == 1:
        text = text[None]
    sites = resid_sites(model)
    with torch.no_grad():
        run = model.run(text, capture=sites)
    if run.input_ids.shape[0] != 1:
        raise LmscopeError(f"lens reads one text, not {run.input_ids.shape[0]}")
    ids = run.input_ids[0].cpu()  # [n_pos]
    final = run.logits[0].float()  # [n_pos, vocab]
    resid = [run.cache[site][0] for site in sites]  # n_resid x [n_pos, d_model]
    n_pos = final.shape[0]
    if not -n_pos <= position < n_pos:
        raise LmscopeError(f"position {position} out of range for a text of {n_pos} tokens")
    position %= n_pos
    if tokens:
        targets = answer_ids(model, [list(tokens)], 1).expand(n_pos, -1)  # [n_pos, n_targets]
        labels = [f"token {t!r}" for t in token_strings(model, targets[0])]
    else:
        nxt = torch.cat([ids[1:], final[-1:].argmax(-1).cpu()])  # [n_pos]
        targets, labels = nxt[:, None], ["next token"]
    targets = targets.to(model.device)
    probs, ranks, kls, top_ids, top_probs = [], [], [], [], []
    with torch.no_grad():
        for i in range(len(sites)):
            logits = stream_logits(model, i, resid[i], tuned=tuned)  # [n_pos, vocab]
            logp = logits.log_softmax(-1)
            _, prob, rank = ranks_and_probs(logits, targets, logp)  # [n_pos, n_targets] each
            probs.append(prob)
            ranks.append(rank)
            kls.append(kl_to_final(logits, final))
            top_id, top_prob = top_tokens(logits[position], top_k, logp[position])  # [k] each
            top_ids.append(top_id)
            top_probs.append(top_prob)
    top = torch.stack(top_ids).cpu()
    return LensResult(
        model=model.name,
        lens="tuned" if tuned is not None else "logit",
        tokens=token_strings(model, ids),
        layers=layer_labels(model),
        targets=targets.cpu(),
        target_tokens=token_strings(model, targets.cpu()),
        labels=labels,
        prob=torch.stack(probs).cpu(),
        rank=torch.stack(ranks).cpu(),
        kl=torch.stack(kls).cpu(),
        position=position,
        top_ids=top,
        top_probs=torch.stack(top_probs).cpu(),
        top_tokens=token_strings(model, top),
    )

"""Logit lens and tuned lens over one text: per layer and position, the probability and rank of
the next token, and the top tokens per layer at one position.

**Logit lens** (nostalgebraist 2020): the residual stream entering layer 0 (``"embed"``) and
leaving every layer, read through the final norm and the unembedding (:meth:`Model.unembed`).

**Tuned lens** (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the
Tuned Lens"): before that read-out, an affine translator per residual stream,
``h -> h + A_L h + b_L``, initialised at zero (the identity: the logit lens), trained with Adam
on corpus tokens to minimise ``KL(p_final || p_lens(L))``, the final logits of the frozen model
being the targets. The last residual stream's translator stays the identity (its logit lens is
the model's output). :func:`train_tuned_lens` trains one, :meth:`TunedLens.save` and
:func:`load_tuned_lens` store and reload it (safetensors: the translators with a header:
model name, d_model, n_layers, vocabulary size).

:func:`lens` reads a text with either lens: :class:`LensResult` holds, per residual stream and
position, the probability and rank of the actual next token (the model's own top prediction at
the last position) or of chosen tokens, and the top-k tokens per stream at one position.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lmscope.circuits.lens import _decode, _slug, answer_ids, layer_labels
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.core.progress import progress_bar
from lmscope.core.tensorfile import load_tensors, save_tensors
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table

FORMAT = "lmscope-tuned-lens"


def resid_sites(model: Model) -> list[str]:
    """The residual streams a lens reads, in the order of :func:`layer_labels`:
    ``blocks.0.resid_pre`` (the embedding), then every layer's ``resid_post``."""
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


# -- tuned lens ------------------------------------------------------------------------------


class Translators(nn.Module):
    """One affine translator per residual stream (Belrose et al. 2023): ``weight``
    [n_resid, d_model, d_model] and ``bias`` [n_resid, d_model], float32, zero at start."""

    def __init__(self, n_resid: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_resid, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_resid, d_model))

    def forward(self, index: int, resid: Tensor) -> Tensor:
        """``resid + A resid + b`` for stream ``index``: resid [..., d_model] -> [..., d_model] (float32)."""
        x = resid.float()
        return x + x @ self.weight[index].T + self.bias[index]


@dataclass
class TunedLens:
    """A tuned lens for ``model``: :class:`Translators` over the streams of :func:`layer_labels`,
    and what it was trained on (``info``: steps, lr, tokens, final mean KL)."""

    model: Model
    translators: Translators
    info: dict = field(default_factory=dict)

    @classmethod
    def identity(cls, model: Model) -> TunedLens:
        """Zero translators: the logit lens."""
        return cls(model, Translators(model.n_layers + 1, model.d_model).to(model.device))

    def translate(self, layer: int | str, resid: Tensor) -> Tensor:
        """The translated residual stream of ``layer`` (``"embed"`` or a layer index): [..., d_model]."""
        return self.translators(stream_index(self.model, layer), resid)

    def apply(self, layer: int | str, resid: Tensor) -> Tensor:
        """Logits [..., vocab] of the residual stream ``resid`` [..., d_model] of ``layer``
        (``"embed"`` or a layer index) through its translator, the final norm and the unembedding."""
        x = self.translate(layer, resid)
        return self.model.unembed(x.to(self.model.hf.dtype)).float()

    def save(self, path: str | Path) -> Path:
        """Write the translators and a header (model name, d_model, n_layers, vocab) to ``path``
        (safetensors)."""
        tensors = {"weight": self.translators.weight, "bias": self.translators.bias}
        return save_tensors(path, tensors, FORMAT, version=1, **_shape(self.model), info=self.info)


def _shape(model: Model) -> dict:
    return {"model": model.name, "d_model": model.d_model, "n_layers": model.n_layers, "d_vocab": model.d_vocab}


def load_tuned_lens(model: Model, path: str | Path, check_name: bool = True) -> TunedLens:
    """The tuned lens saved at ``path`` (:meth:`TunedLens.save`) for ``model``. A missing or
    corrupt file, or one for another model (d_model, n_layers, vocabulary, and the model's name
    unless ``check_name`` is false), raises :class:`LmscopeError`."""
    try:
        tensors, meta = load_tensors(path, FORMAT)
    except LmscopeError as e:
        raise LmscopeError(f"tuned lens: {e}") from e
    data = {k: json.loads(v) if k != "model" else v for k, v in meta.items() if k != "format"}
    want = _shape(model)
    keys = [k for k in want if k != "model" or check_name]
    wrong = [f"{k} {data.get(k)!r} (model: {want[k]!r})" for k in keys if data.get(k) != want[k]]
    if wrong:
        raise LmscopeError(f"tuned lens {path} was trained for another model: " + ", ".join(wrong))
    data.update(tensors)
    n_resid, d = model.n_layers + 1, model.d_model
    weight, bias = data.get("weight"), data.get("bias")
    if not isinstance(weight, Tensor) or not isinstance(bias, Tensor) or weight.shape != (n_resid, d, d):
        raise LmscopeError(f"tuned lens {path}: translators missing or of the wrong shape")
    if bias.shape != (n_resid, d):
        raise LmscopeError(f"tuned lens {path}: translator biases of the wrong shape")
    translators = Translators(n_resid, d)
    with torch.no_grad():
        translators.weight.copy_(weight)
        translators.bias.copy_(bias)
    return TunedLens(model, translators.to(model.device), dict(data.get("info") or {}))


def kl_to_final(lens_logits: Tensor, final_logits: Tensor) -> Tensor:
    """``KL(p_final || p_lens)`` per position, in nats: logits [..., vocab] -> [...]."""
    final = final_logits.float().log_softmax(-1)
    return (final.exp() * (final - lens_logits.float().log_softmax(-1))).sum(-1)


def train_tuned_lens(
    model: Model,
    tokens: Tensor,
    *,
    steps: int = 100,
    lr: float = 1e-3,
    length: int = 128,
    batch_size: int = 4,
    include_embed: bool = True,
) -> TunedLens:
    """Train a tuned lens (Belrose et al. 2023) on corpus ``tokens`` [n_tokens] (e.g.
    ``load_corpus(...).tokens``), cut into windows of ``length`` tokens, ``batch_size`` per
    step, cycling through them for ``steps`` Adam steps at learning rate ``lr``. Each step runs
    the frozen model once (final logits and every residual stream) and minimises the sum over
    streams of the mean ``KL(p_final || p_lens)`` over positions. The last stream's translator
    stays the identity; so does the embedding's without ``include_embed``."""
    tokens = torch.as_tensor(tokens).flatten().long()
    if steps < 1 or lr <= 0 or batch_size < 1 or length < 2:
        raise LmscopeError("tuned lens training: steps and batch_size >= 1, length >= 2, lr > 0")
    length = min(length, len(tokens))
    if length < 2:
        raise LmscopeError(f"tuned lens training: {len(tokens)} corpus tokens are too few")
    windows = tokens.unfold(0, length, length)  # [n_windows, length]
    lens = TunedLens.identity(model)
    trained = list(range(0 if include_embed else 1, model.n_layers))  # stream indices; the last is fixed
    sites = resid_sites(model)
    optimizer = torch.optim.Adam(lens.translators.parameters(), lr=lr)
    batches = itertools.cycle(windows.split(batch_size))
    loss_value = math.nan
    with model.frozen(), progress_bar("tuned lens", steps) as advance:
        for _ in range(steps):
            ids = next(batches).to(model.device)
            with torch.no_grad():
                run = model.run(ids, capture=sites)
            final = run.logits.float()  # [batch, pos, vocab]
            optimizer.zero_grad()
            total = 0.0
            for index in trained:  # one backward per stream: only one [batch, pos, vocab] graph at a time
                x = lens.translators(index, run.cache[sites[index]])
                logits = model.unembed(x.to(model.hf.dtype)).float()
                loss = kl_to_final(logits, final).mean()
                loss.backward()
                total += float(loss.detach())
            optimizer.step()
            loss_value = total / max(len(trained), 1)
            advance(1)
    lens.info = {"steps": steps, "lr": lr, "tokens": int(windows.numel()), "length": length, "final_kl": loss_value}
    return lens


# -- reading a text --------------------------------------------------------------------------


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
                f"{self.lens}_lens_prob_{_slug(label)}",
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
    """The logit lens (or the ``tuned`` lens, Belrose et al. 2023) of one ``text`` (a string or
    token ids [pos] / [1, pos]): per residual stream and position, the probability and rank of
    the next token (the model's top prediction at the last position), or of ``tokens`` (ids or
    strings, first token of each; the same at every position); the ``top_k`` tokens per stream
    at ``position``."""
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
        labels = [f"token {t!r}" for t in _decode(model, targets[0])]
    else:
        nxt = torch.cat([ids[1:], final[-1:].argmax(-1).cpu()])  # [n_pos]
        targets, labels = nxt[:, None], ["next token"]
    targets = targets.to(model.device)
    read = tuned.apply if tuned is not None else (lambda _layer, x: model.unembed(x).float())
    labels_ = layer_labels(model)
    probs, ranks, kls, top_ids, top_probs = [], [], [], [], []
    with torch.no_grad():
        for i, label in enumerate(labels_):
            logits = read(label if i == 0 else i - 1, resid[i])  # [n_pos, vocab]
            logp = logits.log_softmax(-1)
            picked = logits.gather(-1, targets)  # [n_pos, n_targets]
            probs.append(logp.gather(-1, targets).exp())
            ranks.append(1 + (logits[:, None, :] > picked[:, :, None]).sum(-1))
            kls.append(kl_to_final(logits, final))
            top = logits[position].topk(min(top_k, logits.shape[-1]))
            top_ids.append(top.indices)
            top_probs.append(logp[position, top.indices].exp())
    top = torch.stack(top_ids).cpu()
    return LensResult(
        model=model.name,
        lens="tuned" if tuned is not None else "logit",
        tokens=_decode(model, ids),
        layers=labels_,
        targets=targets.cpu(),
        target_tokens=_decode(model, targets.cpu()),
        labels=labels,
        prob=torch.stack(probs).cpu(),
        rank=torch.stack(ranks).cpu(),
        kl=torch.stack(kls).cpu(),
        position=position,
        top_ids=top,
        top_probs=torch.stack(top_probs).cpu(),
        top_tokens=_decode(model, top),
    )

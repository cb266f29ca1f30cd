"""The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the
Tuned Lens"): the logit lens readout (:func:`lmscope.readout.logit_lenses.stream_logits`) after
an affine translator per residual stream, ``h -> h + A_L h + b_L``, initialised at zero (the
identity: the logit lens), trained with Adam on corpus tokens to minimise
``KL(p_final || p_lens(L))``, the final logits of the frozen model being the targets. The last
residual stream's translator stays the identity (its logit lens is the model's output).

:func:`train_tuned_lens` trains one, :meth:`TunedLens.save` and :func:`load_tuned_lens` store
and reload it (safetensors: the translators with a header: model name, d_model, n_layers,
vocabulary size). :func:`lmscope.readout.logit_lenses.lens` reads a text with it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.core.progress import progress_bar
from lmscope.core.tensorfile import load_tensors, metadata_value, save_tensors
from lmscope.readout.logit_lenses import kl_to_final, resid_sites, stream_index, stream_logits

FORMAT = "lmscope-tuned-lens"


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
    """A tuned lens for ``model``: :class:`Translators` over the streams of
    :func:`~lmscope.readout.logit_lenses.layer_labels`,
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
        return stream_logits(self.model, stream_index(self.model, layer), resid, tuned=self)

    def save(self, path: str | Path) -> Path:
        """Write the translators and a header (model name, d_model, n_layers, vocab) to ``path``
        (safetensors)."""
        tensors = {"weight": self.translators.weight, "bias": self.translators.bias}
        return save_tensors(path, tensors, FORMAT, version=1, **_shape(self.model), info=self.info)


def _shape(model: Model) -> dict:
    return {"model": model.name, "d_model": model.d_model, "n_layers": model.n_layers, "d_vocab": model.d_vocab}


def check_tuned_lens(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of the tuned-lens file ``path``, which must exist and be one
    (not yet checked against a model); else a one-line :class:`LmscopeError`."""
    try:
        return load_tensors(path, FORMAT)
    except LmscopeError as e:
        raise LmscopeError(f"tuned lens: {e}") from e


def load_tuned_lens(model: Model, path: str | Path, check_name: bool = True) -> TunedLens:
    """The tuned lens saved at ``path`` (:meth:`TunedLens.save`) for ``model``. A missing or
    corrupt file, or one for another model (d_model, n_layers, vocabulary, and the model's name
    unless ``check_name`` is false), raises :class:`LmscopeError`."""
    tensors, meta = check_tuned_lens(path)
    data = {k: metadata_value(meta, k, path) if k != "model" else v for k, v in meta.items() if k != "format"}
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
                logits = stream_logits(model, index, run.cache[sites[index]], tuned=lens)
                loss = kl_to_final(logits, final).mean()
                loss.backward()
                total += float(loss.detach())
            optimizer.step()
            loss_value = total / max(len(trained), 1)
            advance(1)
    lens.info = {"steps": steps, "lr": lr, "tokens": int(windows.numel()), "length": length, "final_kl": loss_value}
    return lens

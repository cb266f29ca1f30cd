"""Pre-training a small Llama from scratch with one recipe of :mod:`lmscope.training.osp`: the
model, the data stream, the training loop, its log and its checkpoints.

- **Model**: ``transformers.LlamaForCausalLM`` from a ``LlamaConfig`` (untied embeddings,
  feed-forward width OSP's ``(8 d / 3)`` rounded up to a multiple of 128, heads of ``d / n_heads``
  channels), randomly initialised from ``seed``, then given the recipe's SSNorm / EmbProj.
- **Data**: the training text tokenised once (no special tokens) and cut into non-overlapping
  windows of ``seq_len`` tokens; every epoch visits them in its own random order drawn from
  ``seed`` and the epoch number, so batch ``s`` is a function of ``(seed, s)`` alone.
- **Step**: mean next-token cross-entropy of a batch (Hugging Face's ``labels=input_ids``),
  backward, gradient clipping to global norm ``clip``, the optimizers at learning rate
  ``peak * factor(s)``: linear warm-up over ``warmup`` steps, then cosine decay to
  ``min_lr_ratio * peak`` at the last step.
- **Log**: the loss of every step; every ``log_every`` steps (and at steps 0 and the last) the
  OSP excess kurtosis (:func:`lmscope.quant.outliers.activation_stats`, OSP's protocol: every
  token of the probe text its own sequence) of the exported model.
- **Checkpoints** every ``checkpoint_every`` steps and at the end (``checkpoint.pt``, written
  atomically): model and optimizer states, torch's RNG state, the data position (the step) and
  the log. A resumed run rebuilds the same model and optimizers, loads the states and goes on
  from the next step: its losses equal the uninterrupted run's bit for bit (same machine, same
  number of threads).
- **Final model**: the exported plain Llama (:func:`lmscope.training.osp.exported`) with the
  tokenizer in Hugging Face format (``model/``), loadable by
  ``transformers.AutoModelForCausalLM.from_pretrained`` and ``lmscope.load``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from lmscope.core.corpus import BUNDLED, Corpus, check_corpus, load_corpus
from lmscope.core.errors import LmscopeError, first_line
from lmscope.core.files import atomic
from lmscope.core.jsonl import require_file
from lmscope.core.loading import DEFAULT_MODEL, convert_gguf, quiet_transformers, resolve, resolve_device
from lmscope.core.model import Model
from lmscope.core.progress import note, progress_bar
from lmscope.quant.outliers import activation_stats
from lmscope.reports.command import check_settings, option
from lmscope.reports.results import Result, Table, nan_for_none
from lmscope.training.osp import Recipe, apply_recipe_, build_optimizers, exported, get_recipe

# Training text of a bundled corpus name: WikiText-2's validation split (its test split,
# quant.corpus.BUNDLED, is the evaluation text).
TRAINING_TEXT = {"wikitext2": "wikitext-2/valid.txt"}
MAX_WIDTH = 1 << 20  # largest width, window or batch of a model trained here (a machine's memory is the real bound)
CHECKPOINT = "checkpoint.pt"
MODEL_DIR = "model"


@dataclass(frozen=True)
class PretrainSettings:
    """Everything a pre-training run depends on. Sizes: ``d_model``, ``n_layers``, ``n_heads``
    (``d_mlp`` None: OSP's rule); data: ``corpus`` (training text: a text or JSONL file, or
    ``wikitext2``, the bundled validation split), ``eval_corpus`` (``wikitext2``: the bundled
    test split), ``tokenizer`` (a model whose tokenizer to use), ``train_tokens`` /
    ``eval_tokens`` (None: all), ``kurtosis_tokens`` (the probe for the kurtosis log, from the
    evaluation text); optimisation: ``steps``, ``batch_size`` windows of ``seq_len`` tokens,
    ``lr`` (AdamW; Muon's ``muon_lr`` defaults to it), ``weight_decay``, ``warmup`` (None: 10% of
    the steps), ``min_lr_ratio``, ``clip``, ``seed``; ``log_every``, ``checkpoint_every``."""

    d_model: int = option(128, "hidden size", min=1, max=MAX_WIDTH)
    n_layers: int = option(4, "decoder layers", flag="--layers", min=1, max=1024)
    n_heads: int = option(2, "attention heads", flag="--heads", min=1, max=1024)
    d_mlp: int | None = option(None, "feed-forward width (default: OSP's rule, 8d/3 rounded up to 128)", min=1,
                               max=4 * MAX_WIDTH)  # fmt: skip
    seq_len: int = option(128, "tokens per training window (and evaluation window)", min=2, max=MAX_WIDTH)
    batch_size: int = option(8, "windows per step", min=1, max=MAX_WIDTH)
    steps: int = option(300, "training steps", min=1)
    lr: float = option(3e-3, "peak learning rate (AdamW)", min=0)
    muon_lr: float | None = option(None, "peak learning rate of Muon (default: --lr)", min=0)
    weight_decay: float = option(0.1, "decoupled weight decay of the matrices", min=0)
    warmup: int | None = option(None, "warm-up steps (default: 10% of --steps)", min=0)
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of the peak", min=0, max=1)
    clip: float = option(1.0, "gradient-norm clipping", min=0)
    seed: int = option(0, "seed of the initialisation and the data order", min=0)
    log_every: int = option(25, "log the loss and OSP kurtosis every N steps", min=1)
    checkpoint_every: int = option(100, "write a checkpoint every N steps", min=1)
    corpus: str = option("wikitext2", "training text: text or JSONL file, or 'wikitext2' (the bundled validation split)",
                         path="file", choices=TRAINING_TEXT)  # fmt: skip
    eval_corpus: str = option("wikitext2", "evaluation text: text or JSONL file, or 'wikitext2' (the bundled test split)",
                              path="file", choices=BUNDLED)  # fmt: skip
    tokenizer: str = option(DEFAULT_MODEL, "model whose tokenizer to use (SmolLM2's by default)")
    train_tokens: int | None = option(None, "use only the first N training tokens", min=1)
    eval_tokens: int | None = option(16384, "evaluation tokens (perplexity, massive activations)", min=1)
    kurtosis_tokens: int = option(512, "evaluation tokens of the kurtosis probe logged during training", min=1)

    def __post_init__(self):
        check_settings(self)  # the options' own ranges first (:func:`lmscope.reports.command.option`)
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise LmscopeError(f"warmup must lie between 0 and the {self.steps} steps, got {self.warmup}")
        if self.d_model % self.n_heads:
            raise LmscopeError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.seq_len < 2:
            raise LmscopeError("seq_len must be at least 2 (a next token to predict)")
        if self.lr <= 0 or (self.muon_lr is not None and self.muon_lr <= 0) or self.weight_decay < 0:
            raise LmscopeError("learning rates must be positive and the weight decay non-negative")
        if not 0 <= self.min_lr_ratio <= 1 or self.clip < 0:
            raise LmscopeError("min_lr_ratio must lie in [0, 1] and clip be non-negative")
        for name in ("corpus", "eval_corpus"):
            if getattr(self, name) not in TRAINING_TEXT:  # bundled names pass
                check_corpus(getattr(self, name))

    @property
    def mlp_width(self) -> int:
        """The feed-forward width: ``d_mlp``, else OSP's ``ceil(8 d / 3 / 128) * 128``."""
        return self.d_mlp or (8 * self.d_model // 3 + 127) // 128 * 128

    @property
    def warmup_steps(self) -> int:
        return max(1, self.steps // 10) if self.warmup is None else self.warmup

    def to_json(self) -> dict:
        """The training settings alone (a subclass's extra fields left out)."""
        return {f.name: getattr(self, f.name) for f in fields(PretrainSettings)}


# -- tokenizer and corpora --------------------------------------------------------------------


def load_tokenizer(spec: str = DEFAULT_MODEL):
    """The tokenizer of the model ``spec`` (alias, model directory, .gguf file or cached hub id),
    offline; the default is SmolLM2's (49152 tokens), from its GGUF file's cached conversion."""
    from transformers import AutoTokenizer

    kind, where = resolve(spec)
    if kind == "gguf":
        where = convert_gguf(where)
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=True)
    except Exception as e:  # transformers raises what the files it reads lead to
        raise LmscopeError(f"cannot load the tokenizer of {spec}: {str(e).strip().splitlines()[0]}") from e


@dataclass(frozen=True)
class _Tokenizing:
    """What :func:`lmscope.core.corpus.load_corpus` needs of a model: its tokenizer and a name."""

    tokenizer: object
    name: str = "tokenizer"


def training_corpus(tokenizer, source: str = "wikitext2", max_tokens: int | None = None) -> Corpus:
    """The training text tokenised: a bundled name means its training split (:data:`TRAINING_TEXT`)."""
    if source in TRAINING_TEXT:
        path = Path(str(resources.files("lmscope") / "data" / TRAINING_TEXT[source]))
        return Corpus(
            f"{source} (validation split)", load_corpus(_Tokenizing(tokenizer), path, max_tokens=max_tokens).tokens
        )
    return load_corpus(_Tokenizing(tokenizer), source, max_tokens=max_tokens)


def evaluation_corpus(tokenizer, source: str = "wikitext2", max_tokens: int | None = None) -> Corpus:
    """The evaluation text tokenised (``wikitext2``: the bundled test split)."""
    return load_corpus(_Tokenizing(tokenizer), source, max_tokens=max_tokens)


class Batches:
    """The training stream: batch ``s`` (from 0) is ``batch_size`` windows of ``seq_len`` tokens
    [batch_size, seq_len]; window ``i = s * batch_size + j`` is number ``i mod n`` of epoch
    ``i // n``'s random order of the ``n`` non-overlapping windows (a generator seeded with
    ``seed`` and the epoch)."""

    def __init__(self, corpus: Corpus, seq_len: int, batch_size: int, seed: int):
        self.windows = corpus.windows(seq_len)  # [n, seq_len]
        self.batch_size, self.seed = batch_size, seed
        self._orders: dict[int, Tensor] = {}

    def order(self, epoch: int) -> Tensor:
        """Epoch ``epoch``'s permutation of the windows [n]."""
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders[epoch] = torch.randperm(len(self.windows), generator=generator)
        return self._orders[epoch]

    def __call__(self, step: int) -> Tensor:
        n = len(self.windows)
        index = range(step * self.batch_size, (step + 1) * self.batch_size)
        return self.windows[torch.stack([self.order(i // n)[i % n] for i in index])]


# -- model and training step ------------------------------------------------------------------


def llama_config(settings: PretrainSettings, tokenizer):
    """The ``LlamaConfig`` of ``settings`` for ``tokenizer``'s vocabulary (untied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.d_model,
        intermediate_size=settings.mlp_width,
        num_hidden_layers=settings.n_layers,
        num_attention_heads=settings.n_heads,
        num_key_value_heads=settings.n_heads,
        max_position_embeddings=settings.seq_len,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def lr_factor(step: int, steps: int, warmup: int, floor: float) -> float:
    """The learning-rate multiplier of step ``step`` (from 1): ``step / warmup`` while warming
    up, then a cosine from 1 down to ``floor`` at step ``steps``."""
    if step <= warmup:
        return step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """One recipe's model (``LlamaForCausalLM`` with its SSNorm / EmbProj), optimizers and data."""

    def __init__(self, recipe: Recipe, settings: PretrainSettings, tokenizer, batches: Batches, device="cpu"):
        from transformers import LlamaForCausalLM

        self.recipe, self.settings, self.tokenizer, self.batches = recipe, settings, tokenizer, batches
        self.device = resolve_device(device)
        torch.manual_seed(settings.seed)
        self.model = apply_recipe_(LlamaForCausalLM(llama_config(settings, tokenizer)), recipe)
        self.model.to(self.device).train()
        self.optimizers = build_optimizers(
            self.model, recipe.optimizer, lr=settings.lr, muon_lr=settings.muon_lr, weight_decay=settings.weight_decay
        )

    def step(self, step: int) -> float:
        """Training step ``step`` (from 1) on batch ``step - 1``; returns its loss (before the update)."""
        s = self.settings
        ids = self.batches(step - 1).to(self.device)
        self.optimizers.scale_lr(lr_factor(step, s.steps, s.warmup_steps, s.min_lr_ratio))
        loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if s.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.clip)
        self.optimizers.step()
        self.optimizers.zero_grad()
        return float(loss.detach())

    def plain_model(self) -> Model:
        """The exported plain model (a copy) as an lmscope :class:`Model`."""
        return Model(exported(self.model), self.tokenizer, source="pretrain", name=f"pretrain-{self.recipe.name}")

    def probe_kurtosis(self, probe: Corpus) -> float:
        """OSP excess kurtosis of the exported model on ``probe`` (OSP's protocol)."""
        window = min(self.settings.seq_len, len(probe))
        return activation_stats(self.plain_model(), probe, protocol="osp", window=window).osp_kurtosis

    # -- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, path: Path, run: TrainingRun) -> Path:
        """Write model, optimizers, RNG state, data position and log to ``path`` atomically."""
        state = {
            "format": 1,
            "recipe": self.recipe.name,
            "settings": self.settings.to_json(),
            "step": run.done,
            "data_position": run.done * self.settings.batch_size,  # windows consumed
            "threads": torch.get_num_threads(),
            "model": self.model.state_dict(),
            "optimizers": self.optimizers.state_dict(),
            "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if _cuda() else []},
            "run": run.to_json(),
        }
        with atomic(path) as tmp:
            torch.save(state, tmp)
        return path

    def load_checkpoint(self, path: Path) -> TrainingRun:
        """Restore the state :meth:`save_checkpoint` wrote; returns the run's log so far."""
        start_over = "pass --overwrite (Python: resume=False) to start over"
        path = require_file(path, "checkpoint")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:  # torch.load raises what the bytes it meets lead to
            raise LmscopeError(f"{path}: cannot read as a checkpoint ({first_line(e)}); {start_over}") from e
        if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
            raise LmscopeError(f"{path}: not a pretrain checkpoint (written by another program?); {start_over}")
        if state.get("recipe") != self.recipe.name or state.get("settings") != self.settings.to_json():
            raise LmscopeError(f"{path} was written by another recipe or other settings; {start_over}")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizers.load_state_dict(state["optimizers"])
            torch.set_rng_state(state["rng"]["cpu"].cpu())
            if state["rng"]["cuda"] and _cuda():
                torch.cuda.set_rng_state_all([r.cpu() for r in state["rng"]["cuda"]])
            run = TrainingRun.from_json(state["run"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise LmscopeError(f"{path}: a damaged checkpoint ({first_line(e)}); {start_over}") from e
        if state["threads"] != torch.get_num_threads():
            note(f"checkpoint written with {state['threads']} threads, resumed with {torch.get_num_threads()}")
        return run


CHECKPOINT_KEYS = {"recipe", "settings", "threads", "model", "optimizers", "rng", "run"}


def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


# -- the run ------------------------------------------------------------------------------------


@dataclass
class TrainingRun(Result):
    """One recipe's training: ``losses`` (one per step done, float), ``kurtosis`` (``{"step",
    "osp_kurtosis"}`` every ``log_every`` steps, step 0 included), ``seconds`` (training steps
    only), ``model_path`` (the saved model), ``evaluation`` (filled by
    :func:`lmscope.training.compare.evaluate`)."""

    recipe: str
    steps: int
    log_every: int
    losses: list[float] = field(default_factory=list)
    kurtosis: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    model_path: str | None = None
    evaluation: dict | None = None

    @classmethod
    def from_json(cls, data: dict) -> TrainingRun:
        """Read back :meth:`to_json`'s output; numbers written as ``null`` (NaN or infinite: a
        diverged loss, an infinite perplexity) come back as NaN."""
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        for key in ("losses", "kurtosis", "seconds"):
            if key in fields:
                fields[key] = nan_for_none(fields[key])
        if fields.get("evaluation") is not None:
            numbers = {k: v for k, v in fields["evaluation"].items() if k != "massive"}
            fields["evaluation"] = {**fields["evaluation"], **nan_for_none(numbers)}
        return cls(**fields)

    @property
    def done(self) -> int:
        """Steps done."""
        return len(self.losses)

    @property
    def final_loss(self) -> float | None:
        """Mean loss of the last ``log_every`` steps."""
        tail = self.losses[-self.log_every :]
        return sum(tail) / len(tail) if tail else None

    @property
    def step_seconds(self) -> float | None:
        return self.seconds / self.done if self.done else None

    def loss_curve(self) -> dict[int, float]:
        """Mean loss over each logging interval, keyed by the interval's last step."""
        ends = sorted({*range(self.log_every, self.done + 1, self.log_every), self.done} - {0})
        starts = [0, *ends[:-1]]
        return {end: sum(self.losses[a:end]) / (end - a) for a, end in zip(starts, ends)}

    def text(self) -> str:
        if not self.done:
            return f"{self.recipe}: no step done yet."
        kurt = f", OSP excess kurtosis {self.kurtosis[-1]['osp_kurtosis']:.2f}" if self.kurtosis else ""
        return (
            f"{self.recipe}: {self.done} of {self.steps} steps, mean loss of the last {self.log_every} "
            f"{self.final_loss:.3f}{kurt}, {1000 * self.step_seconds:.0f} ms per step."
        )

    def tables(self) -> list[Table]:
        """The training log: per logging step, the mean loss since the last one and the OSP kurtosis."""
        curve = self.loss_curve()
        rows = [{"step": 0, "mean loss": None, "OSP kurtosis": None}] if self.kurtosis else []
        rows += [{"step": step, "mean loss": loss, "OSP kurtosis": None} for step, loss in curve.items()]
        by_step = {row["step"]: row for row in rows}
        for k in self.kurtosis:
            by_step.setdefault(k["step"], {"step": k["step"], "mean loss": None})["OSP kurtosis"] = k["osp_kurtosis"]
        return [Table(f"{self.recipe}: training log", sorted(by_step.values(), key=lambda r: r["step"]))]


def pretrain(
    recipe: str | Recipe,
    settings: PretrainSettings,
    tokenizer,
    train: Corpus,
    probe: Corpus,
    out: str | Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    on_log: Callable[[TrainingRun], None] | None = None,
) -> TrainingRun:
    """Train ``recipe`` with ``settings`` on ``train`` (module docstring), logging the OSP kurtosis
    on ``probe``; checkpoints go to ``out/checkpoint.pt``, the final model to ``out/model``. With
    ``resume``, a checkpoint in ``out`` is continued. ``on_step(step, loss)`` runs after each
    step (an exception there interrupts the run, as Ctrl-C does), ``on_log(run)`` after each
    logging step."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(
        recipe, settings, tokenizer, Batches(train, settings.seq_len, settings.batch_size, settings.seed), device
    )
    checkpoint = out / CHECKPOINT
    run = TrainingRun(recipe.name, settings.steps, settings.log_every)
    if resume and checkpoint.exists():  # a damaged one (or a folder in its place) is an error
        run = trainer.load_checkpoint(checkpoint)
        note(f"{recipe.name}: resumed from {checkpoint} at step {run.done}")
    elif resume:
        note(f"{recipe.name}: no checkpoint in {out}; starting from step 0")
    if not run.kurtosis:
        run.kurtosis.append({"step": 0, "osp_kurtosis": trainer.probe_kurtosis(probe)})
    with progress_bar(f"pretrain {recipe.name}", settings.steps) as advance:
        advance(run.done)
        for step in range(run.done + 1, settings.steps + 1):
            start = time.perf_counter()
            run.losses.append(trainer.step(step))
            run.seconds += time.perf_counter() - start
            advance(1)
            if step % settings.log_every == 0 or step == settings.steps:
                run.kurtosis.append({"step": step, "osp_kurtosis": trainer.probe_kurtosis(probe)})
                note(
                    f"{recipe.name} step {step}: loss {run.loss_curve()[step]:.3f}, OSP kurtosis {run.kurtosis[-1]['osp_kurtosis']:.2f}"
                )
                if on_log is not None:
                    on_log(run)
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                trainer.save_checkpoint(checkpoint, run)
            if on_step is not None:
                on_step(step, run.losses[-1])
    run.model_path = str(save_model(trainer, out / MODEL_DIR))
    return run


def save_model(trainer: Trainer, path: Path) -> Path:
    """Save the exported plain model and the tokenizer in Hugging Face format to ``path``."""
    from transformers.utils import logging as hf_logging

    model = trainer.plain_model()
    with quiet_transformers(hf_logging):  # no "Writing model shards" bar under lmscope's own
        model.hf.save_pretrained(path)
    trainer.tokenizer.save_pretrained(path)
    return path

"""Editing temporal knowledge through an attention head's value vectors.

Park et al., "Does Time Have Its Place? Temporal Heads: Where Language Models Recall
Time-specific Information", ACL 2025 (arXiv:2502.14258), temporal knowledge editing, as the
paper's notebook ``7.temporal_knowledge_edit.ipynb`` runs it. An experiment is a source prompt,
a target prompt, a year phrase in the target, a trigger word and a coefficient, e.g. source
"In 2009, the name of president of South Korea was", target "In 2009, the name of president of
Russia was", phrase "In 2009", trigger "Medvedev". For query head ``h`` of layer ``L``:

- the **source value** is the mean over every position of the source prompt of the value vector
  of the KV head serving ``h`` (site ``blocks.L.attn.v``, KV head ``h // (n_heads //
  n_kv_heads)``; with multi-head attention that is ``h`` itself);
- the **edit** adds ``coeff`` x that mean to the target's value vector of that KV head at the
  last token of the year phrase, during the prompt pass only: the values of generated tokens
  are their own, while the edited prompt value stays in the KV cache (the notebook's hook edits
  ``hook_v`` when the forward covers the position, which only the prompt pass does);
- ``h`` is a **candidate** when the first generated token differs from the unedited target's,
  and **succeeds** when the trigger word appears after generating ``max_new_tokens`` (50) tokens.

Every (layer, head) is swept for every experiment; :class:`TemporalEdit` counts, per head, the
experiments it succeeds in (the notebook's heatmap). Heads that share a KV head get the same edit,
hence the same outcome.

Conventions taken from the notebook (cell 4 ``find_subject_token_index``, ``get_source_act_mean``,
``make_injection_hook``, ``generate_first_token``, ``generate_full_text``; cell 5 the sweep):

- prompts are tokenised without a BOS token (``prepend_bos=False``);
- the year phrase is tokenised alone (no BOS) and found as the first run of equal token strings
  in the target; its last token is edited; an experiment whose phrase is not found is skipped
  (no candidates, no successes);
- the first generated token is compared as its decoded, whitespace-stripped string;
- success: the trigger word is a (case-sensitive) substring of the decoded whole sequence,
  prompt plus generated tokens; generation stops at the end-of-sequence token;
- decoding: the notebook passes ``do_sample=True, temperature=0.0, top_p=1.0`` with the seed
  (42) reset before each generation; TransformerLens samples at temperature 0 by argmax, so its
  runs are greedy, lmscope's default. ``sample=True`` samples at ``temperature`` (nucleus
  ``top_p``) with the random generator seeded with ``seed`` before each generation (the first
  token and the full text), the notebook's scheme at a temperature that samples.

Speed. The naive sweep (the notebook's) runs one forward per (experiment, head) to find the
candidates and generates for each. Here, per experiment: the source values come from one
capture; positions before the edited token are the same for every edit, so their keys and
values are computed once (the prefix of :mod:`lmscope.circuits.patching`); an edit at layer
``L`` changes nothing before ``L``, so each edit (one per layer and KV head) starts from the
unedited run's residual stream entering ``L`` at the edited and later positions, and all edits
run as one batch that grows as they join at their layer; only the final position is unembedded.
Then the candidates generate together, one batch row each, from the shared prefix.
``bench/bench_temporal_edit.py`` checks the candidate and success sets equal the naive loop's.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import Cache

from lmscope.circuits.nodes import head_node
from lmscope.circuits.patching import Chunk, PrefixKV, final_position_only, layer_chunk, prefix_cache
from lmscope.core import distributed
from lmscope.core.errors import LmscopeError
from lmscope.core.hooks import Hook, hooked
from lmscope.core.interventions import Intervention, apply
from lmscope.core.jsonl import NUMBER, TEXT, TOKEN_IDS, Schema, either, read_rows
from lmscope.core.model import Model
from lmscope.core.progress import progress_bar
from lmscope.reports.figures import Figure
from lmscope.reports.results import Result, Table

PAPER = "Park et al., ACL 2025, arXiv:2502.14258"
DEFAULT_FILE = "temporalhead_edits.jsonl"
SEED = 42  # the notebook's SEED
_FIELDS = {"source_prompt": "source", "target_prompt": "target", "subject_phrase": "phrase", "trigger_word": "trigger"}

Text = str | tuple[int, ...]

# -- experiments --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditExperiment:
    """One editing experiment: prompts, year phrase and trigger as text or token ids."""

    source: Text
    target: Text
    phrase: Text
    trigger: Text
    coeff: float = 1.0
    where: str = field(default="", compare=False)  # the file and line it was read from, for errors

    def to_json(self) -> dict:
        """The notebook's field names (``source_prompt``, ..., ``coeff``); token ids as lists."""
        out = {key: _plain_text(getattr(self, name)) for key, name in _FIELDS.items()}
        return {**out, "coeff": self.coeff}


def _plain_text(value: Text) -> str | list[int]:
    return value if isinstance(value, str) else list(value)


EXPERIMENT = Schema({key: either(TEXT, TOKEN_IDS) for key in _FIELDS}, {"coeff": NUMBER}, closed=True)


def experiment_from_dict(obj: object, where: str = "experiment") -> EditExperiment:
    """Validate one JSON object (:data:`EXPERIMENT`: the notebook's fields ``source_prompt``,
    ``target_prompt``, ``subject_phrase``, ``trigger_word``, optional ``coeff``, default 1.0)."""
    values = EXPERIMENT.check(obj, where)
    texts = {name: v if isinstance(v := values[key], str) else tuple(v) for key, name in _FIELDS.items()}
    return EditExperiment(**texts, coeff=float(values.get("coeff", 1.0)), where=where)


def load_experiments(path: str | Path) -> list[EditExperiment]:
    """Read a JSONL file of experiments, one object per line (see :func:`experiment_from_dict`);
    errors name the file, line and field."""
    return [experiment_from_dict(row.values, row.where) for row in read_rows(path, EXPERIMENT, what="experiments")]


def check_experiments(model: Model, experiments: Sequence[EditExperiment], max_new_tokens: int = 50) -> None:
    """Refuse, before any compute, an experiment whose token ids lie outside the vocabulary or
    whose prompts, with ``max_new_tokens`` generated, exceed the model's context."""
    for e in experiments:
        for key, name in _FIELDS.items():
            what = f"{e.where or 'experiment'}: {key}"
            text = getattr(e, name)
            if isinstance(text, str):
                model.check_length([text], what)
            ids = token_ids(model, text)
            model.check_ids(ids, what)
            extra = max_new_tokens if name in ("source", "target") else 0
            if model.context is not None and len(ids) + extra > model.context:
                raise LmscopeError(f"{what}: {len(ids)} tokens and {extra} to generate exceed the context of "
                                   f"{model.name} ({model.context} tokens)")  # fmt: skip


def default_experiments() -> list[EditExperiment]:
    """The notebook's 15 experiments: 5 source/target pairs x coefficients 1, 3 and 6
    (``lmscope/data/temporalhead_edits.jsonl``, see the ``.md`` file beside it)."""
    with resources.as_file(resources.files("lmscope") / "data" / DEFAULT_FILE) as path:
        return load_experiments(path)


# -- tokens -------------------------------------------------------------------------------------


def token_ids(model: Model, text: Text | Sequence[int]) -> list[int]:
    """Token ids of ``text`` without special tokens (the notebook's ``prepend_bos=False``)."""
    if not isinstance(text, str):
        return [int(t) for t in text]
    if model.tokenizer is None:
        raise LmscopeError(f"model {model.name} has no tokenizer: give prompts, phrases and triggers as token ids")
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def _token_strings(model: Model, ids: Sequence[int]) -> list:
    """Each token decoded alone (TransformerLens's ``to_str_tokens``); the ids without a tokenizer."""
    if model.tokenizer is None:
        return list(ids)
    return [model.tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]


def phrase_position(model: Model, prompt: Text | Sequence[int], phrase: Text) -> int:
    """The index of the last token of the first occurrence of ``phrase``'s tokens (tokenised
    alone) in ``prompt``, matched as token strings; -1 when it does not occur."""
    tokens, sub = _token_strings(model, token_ids(model, prompt)), _token_strings(model, token_ids(model, phrase))
    for start in range(len(tokens) - len(sub) + 1):
        if tokens[start : start + len(sub)] == sub:
            return start + len(sub) - 1
    return -1


def source_values(model: Model, source: Text) -> Tensor:
    """The mean over every position of ``source`` of each KV head's value vector,
    ``[n_layers, n_kv_heads, d_head]`` (from one capture of every ``blocks.L.attn.v``; a clear
    error where layers differ in head size or KV heads)."""
    model.require_uniform_heads("value edits over every layer")
    ids = torch.tensor([token_ids(model, source)], device=model.device)
    sites = [f"blocks.{layer}.attn.v" for layer in range(model.n_layers)]
    with torch.no_grad():
        run = model.run(ids, capture=sites, logits=False)
    return torch.stack([run.cache[site][0].float().mean(0).to(run.cache[site].dtype) for site in sites])


def kv_head(model: Model, head: int, layer: int) -> int:
    """The KV head serving query head ``head`` of ``layer``."""
    return head // (model.n_heads // model.n_kv_heads_of(layer))


def value_edit(model: Model, layer: int, head: int, vector: Tensor, coeff: float, position: int) -> Intervention:
    """The plain intervention of one edit: add ``coeff * vector`` ([d_head]) to the value of the KV
    head serving query head ``head`` of ``layer`` at absolute ``position``, for use with
    :meth:`Model.run` or :meth:`Model.generate` (in generation the edit holds for the prompt's
    value at ``position``; generated tokens are at later positions and untouched)."""
    site = f"blocks.{layer}.attn.v"
    return apply(
        site, lambda x: x + coeff * vector.to(x.device, x.dtype), positions=[position], head=kv_head(model, head, layer)
    )


# -- decoding -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoding:
    """Greedy (``sample=False``, the notebook's effective setting) or sampling at ``temperature``
    with nucleus ``top_p``, the random generator seeded with ``seed`` before each generation."""

    sample: bool = False
    seed: int = SEED
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 50

    def generators(self, rows: int, device: torch.device) -> list[torch.Generator] | None:
        """One generator per batch row, each seeded as one generation alone would be."""
        if not self.sample:
            return None
        return [torch.Generator(device=device).manual_seed(self.seed) for _ in range(rows)]

    def pick(self, logits: Tensor, generators: list[torch.Generator] | None) -> Tensor:
        """The next token of each row of ``logits`` [rows, vocab] (in float32, as generate)."""
        scores = logits.float()
        if not self.sample:
            return scores.argmax(-1)
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_p < 1.0:  # Hugging Face's TopPLogitsWarper
            ordered, order = torch.sort(scores, descending=False)
            drop = ordered.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[..., -1:] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        probs = scores.softmax(-1)
        assert generators is not None
        return torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g)[0] for i, g in enumerate(generators)])


def _eos_ids(model: Model) -> list[int]:
    config = getattr(model.hf, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = model.tokenizer.eos_token_id if model.tokenizer is not None else model.hf.config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]


def _same_token(model: Model, a: int, b: int) -> bool:
    """Whether two first tokens are the same as decoded, stripped strings (ids without a tokenizer)."""
    if model.tokenizer is None:
        return a == b
    decode = model.tokenizer.decode
    return (
        decode([a], clean_up_tokenization_spaces=False).strip()
        == decode([b], clean_up_tokenization_spaces=False).strip()
    )


def triggered(model: Model, ids: Sequence[int], trigger: Text) -> bool:
    """Whether ``trigger`` appears in the sequence ``ids`` (prompt and generated tokens): as a
    substring of its decoding for a text trigger, as a run of tokens for token ids."""
    if isinstance(trigger, str):
        if model.tokenizer is None:
            raise LmscopeError(f"model {model.name} has no tokenizer: give the trigger as token ids")
        return trigger in model.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)
    n, ids = len(trigger), list(ids)
    return any(tuple(ids[i : i + n]) == tuple(trigger) for i in range(len(ids) - n + 1))


# -- one target prompt ---------------------------------------------------------------------------


@dataclass
class _Target:
    """A target prompt ready to edit: ids [1, T], the edited position, the KV cache of the
    positions before it and the unedited run from it on (shared by every edit of this target)."""

    ids: Tensor
    position: int
    prefix: DynamicCache
    chunk: Chunk


def _prepare(model: Model, ids: Sequence[int], position: int) -> _Target:
    tensor = torch.tensor([list(ids)], device=model.device)
    mask = torch.ones_like(tensor)
    with torch.no_grad():
        prefix = prefix_cache(model, tensor, mask, position)
        return _Target(tensor, position, prefix, layer_chunk(model, tensor, mask, position, prefix))


@dataclass(frozen=True)
class _Row:
    """One batch row's edit: add ``delta`` [d_head] to the value of KV head ``kv`` of ``layer``."""

    layer: int
    kv: int
    delta: Tensor


def _delta(model: Model, rows: Sequence[_Row | None], layer: int, like: Tensor) -> Tensor | None:
    """[len(rows), n_kv_heads, d_head]: each row's delta at its KV head where the row edits
    ``layer``, else 0; None when no row edits ``layer``."""
    out = None
    for i, row in enumerate(rows):
        if row is not None and row.layer == layer:
            if out is None:
                out = like.new_zeros(len(rows), model.n_kv_heads, model.d_head)
            out[i, row.kv] = row.delta.to(out.dtype)
    return out


def _value_add(layer: int, delta: Tensor, position: int) -> Intervention:
    """Add ``delta`` [batch, n_kv_heads, d_head] to the values of ``layer`` at ``position``."""
    return apply(f"blocks.{layer}.attn.v", lambda x: x + delta[:, None].to(x.dtype), positions=[position])


def _final_resid(model: Model, target: _Target, rows: Sequence[_Row]) -> Tensor:
    """The final residual stream at the last position [len(rows), d_model] under each row's edit
    (rows sorted by layer), run as one batch that grows as rows join at their layer: a row starts
    from the unedited run entering its layer, at the edited and later positions."""
    chunk = target.chunk
    hidden: Tensor | None = None
    for layer in range(rows[0].layer, model.n_layers):
        new = sum(row.layer == layer for row in rows)
        if new:
            h = chunk.hidden[layer].expand(new, -1, -1)
            hidden = h if hidden is None else torch.cat([hidden, h])
        assert hidden is not None
        hooks = [Hook("resid_pre", layer, lambda x, _h=hidden: _h)]
        if layer == model.n_layers - 1:
            hooks += final_position_only(layer)
        args, kwargs = chunk.calls[layer]
        kv = PrefixKV(chunk.prefix, hidden.shape[0])
        args = tuple(kv if isinstance(a, Cache) else a for a in args)
        kwargs = {k: kv if isinstance(v, Cache) else v for k, v in kwargs.items()}
        with contextlib.ExitStack() as stack:
            stack.enter_context(hooked(model, hooks))
            if new:
                delta = _delta(model, rows[: hidden.shape[0]], layer, hidden)
                assert delta is not None
                stack.enter_context(model.hooks(interventions=[_value_add(layer, delta, target.position)]))
            out = model.layer_module(layer, "")(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    assert hidden is not None
    return hidden[:, -1]


def _first_tokens(model: Model, target: _Target, rows: Sequence[_Row], decoding: Decoding, max_batch: int) -> list[int]:
    """The first generated token under each row's edit, in the order of ``rows``."""
    order = sorted(range(len(rows)), key=lambda i: rows[i].layer)
    tokens = [0] * len(rows)

    def pick(group: list[int]) -> list[int]:
        with torch.no_grad():
            resid = _final_resid(model, target, [rows[i] for i in group])
            return decoding.pick(model.unembed(resid), decoding.generators(len(group), model.device)).tolist()

    groups = _batches(order, max_batch)
    # Under torchrun, the batches of head edits go round-robin to the ranks.
    for group, picked in zip(groups, distributed.ordered_map(groups, pick)):
        for i, token in zip(group, picked):
            tokens[i] = token
    return tokens


def _batches(items: list, max_batch: int) -> list[list]:
    """``items`` in consecutive batches of at most ``max_batch``, and at least one batch per rank
    under torchrun when there are enough items."""
    size = max(1, min(max_batch, -(-len(items) // distributed.world_size())))
    return [items[start : start + size] for start in range(0, len(items), size)]


def _generate(model: Model, target: _Target, rows: Sequence[_Row | None], decoding: Decoding) -> list[list[int]]:
    """Generate from the target under each row's edit (None: unedited), one batch row each,
    continuing the shared prefix cache; the edits hold for the prompt's value at the edited
    position (the values of generated tokens are their own). Returns each row's new tokens up to
    and including the first end-of-sequence token."""
    n, p = len(rows), target.position
    cache = copy.deepcopy(target.prefix) if p > 0 else DynamicCache(config=model.hf.config)
    if p > 0:
        cache.batch_repeat_interleave(n)
    like = target.chunk.final
    edits = []
    for layer in sorted({row.layer for row in rows if row is not None}):
        delta = _delta(model, rows, layer, like)
        assert delta is not None
        edits.append(_value_add(layer, delta, p))
    eos = torch.tensor(_eos_ids(model), device=model.device, dtype=torch.long)
    generators = decoding.generators(n, model.device)
    done = torch.zeros(n, dtype=torch.bool, device=model.device)
    steps: list[Tensor] = []
    with torch.no_grad(), model.hooks(interventions=edits):
        inputs = target.ids[:, p:].expand(n, -1)
        for _ in range(decoding.max_new_tokens):
            out = model.hf(input_ids=inputs, use_cache=True, logits_to_keep=1, **model.with_cache(cache))
            token = decoding.pick(out.logits[:, -1], generators)
            if len(eos):
                token = torch.where(done, eos[0], token)
                done |= torch.isin(token, eos)
            steps.append(token)
            if bool(done.all()):
                break
            inputs = token[:, None]
    eos_set = set(eos.tolist())
    new = []
    for row in torch.stack(steps, 1).tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_set), len(row))
        new.append(row[:end])
    return new


@dataclass
class HeadScreen:
    """The first generated token of the target under each head's edit (:func:`screen_heads`).

    ``position``: the edited position (-1 when the phrase is not in the target: then nothing
    ran, ``baseline`` is -1 and ``first`` all -1); ``baseline``: the unedited first token id;
    ``first``: token ids ``[n_layers, n_heads]``; ``changed``: bool ``[n_layers, n_heads]``, the
    candidates (first token different from the baseline's as decoded, stripped strings)."""

    position: int
    baseline: int
    first: Tensor
    changed: Tensor


def _skipped_screen(model: Model) -> HeadScreen:
    shape = (model.n_layers, model.n_heads)
    return HeadScreen(-1, -1, torch.full(shape, -1, dtype=torch.long), torch.zeros(shape, dtype=torch.bool))


def _screens(
    model: Model,
    target: _Target,
    experiments: Sequence[EditExperiment],
    values: Sequence[Tensor],
    decoding: Decoding,
    max_batch: int,
) -> list[HeadScreen]:
    """Screen every (layer, KV head) edit of experiments sharing ``target`` (``values``: each
    experiment's source values), all as batch rows over the shared prefix."""
    n_layers, n_kv = model.n_layers, model.n_kv_heads
    with torch.no_grad():
        baseline = int(decoding.pick(model.unembed(target.chunk.final), decoding.generators(1, model.device))[0])
    rows = [
        _Row(layer, kv, e.coeff * v[layer, kv])
        for e, v in zip(experiments, values)
        for layer in range(n_layers)
        for kv in range(n_kv)
    ]
    tokens = _first_tokens(model, target, rows, decoding, max_batch)
    same = {t: _same_token(model, t, baseline) for t in set(tokens)}
    to_query = [kv_head(model, h, 0) for h in range(model.n_heads)]  # every layer alike: see source_values
    out = []
    for i in range(len(experiments)):
        first = torch.tensor(tokens[i * n_layers * n_kv : (i + 1) * n_layers * n_kv]).view(n_layers, n_kv)[:, to_query]
        changed = torch.tensor([[not same[int(t)] for t in row] for row in first.tolist()], dtype=torch.bool)
        out.append(HeadScreen(target.position, baseline, first, changed))
    return out


def screen_heads(
    model: Model, experiment: EditExperiment, decoding: Decoding = Decoding(), max_batch: int = 128
) -> HeadScreen:
    """The candidates of one experiment (Park et al., ACL 2025, notebook 7): the first token of
    the target under the edit of every (layer, head), computed from the cached prefix with up to
    ``max_batch`` (layer, KV head) edits as one batch."""
    ids = token_ids(model, experiment.target)
    position = phrase_position(model, ids, experiment.phrase)
    if position < 0:
        return _skipped_screen(model)
    target = _prepare(model, ids, position)
    return _screens(model, target, [experiment], [source_values(model, experiment.source)], decoding, max_batch)[0]


# -- the sweep ----------------------------------------------------------------------------------


@dataclass
class EditOutcome:
    """One experiment's outcome: the edited ``position`` (-1: phrase not found, skipped), the
    unedited target's first token, the candidate and successful heads (``(layer, head)``), and
    the new text generated under each candidate's edit (key ``a{L}.h{H}``). The unedited target's
    generation and whether it already holds the trigger (not part of the notebook) come with it
    when candidates of its target generate (one more batch row), else None."""

    experiment: EditExperiment
    position: int
    baseline_token: str
    baseline_text: str | None
    baseline_success: bool | None
    candidates: list[tuple[int, int]]
    successes: list[tuple[int, int]]
    texts: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            **self.experiment.to_json(),
            "position": self.position,
            "baseline_token": self.baseline_token,
            "baseline_text": self.baseline_text,
            "baseline_success": self.baseline_success,
            "candidates": [list(h) for h in self.candidates],
            "successes": [list(h) for h in self.successes],
            "texts": dict(self.texts),
        }


@dataclass
class TemporalEdit(Result):
    """Temporal knowledge editing through every head's values (Park et al., ACL 2025, notebook
    7): ``successes`` and ``candidates`` ``[n_layers, n_heads]`` count the experiments in which
    each head succeeded / was a candidate; ``outcomes`` per experiment; the decoding settings."""

    successes: Tensor
    candidates: Tensor
    outcomes: list[EditOutcome]
    settings: dict
    model: str = ""

    def top(self, n: int = 10) -> list[tuple[tuple[int, int], int]]:
        """The ``n`` heads with the most successes (ties by layer, head), with their counts;
        only heads that succeeded at least once."""
        pairs = [
            ((layer, head), int(self.successes[layer, head]))
            for layer in range(self.successes.shape[0])
            for head in range(self.successes.shape[1])
            if self.successes[layer, head] > 0
        ]
        return sorted(pairs, key=lambda p: -p[1])[:n]

    def to_json(self) -> dict:
        return {
            "paper": PAPER,
            "model": self.model,
            "settings": dict(self.settings),
            "successes": self.successes.tolist(),
            "candidates": self.candidates.tolist(),
            "experiments": [o.to_json() for o in self.outcomes],
        }

    def text(self) -> str:
        n = len(self.outcomes)
        skipped = sum(o.position < 0 for o in self.outcomes)
        top = self.top(3)
        heads = ", ".join(f"{head_node(layer, head)} ({count})" for (layer, head), count in top) or "none"
        note = f" ({skipped} skipped: phrase not in the target)" if skipped else ""
        return f"{n} experiments{note}: {int((self.successes > 0).sum())} heads succeeded at least once; top {heads}."

    def tables(self) -> list[Table]:
        """The heads that succeeded, most first; one row per experiment."""
        heads = [
            {
                "head": head_node(layer, head),
                "layer": layer,
                "head index": head,
                "successes": count,
                "candidates": int(self.candidates[layer, head]),
            }
            for (layer, head), count in self.top(20)
        ]
        rows = []
        for i, o in enumerate(self.outcomes):
            e = o.experiment
            rows.append(
                {
                    "#": i,
                    "target": _plain_text(e.target),
                    "phrase": _plain_text(e.phrase),
                    "trigger": _plain_text(e.trigger),
                    "coeff": e.coeff,
                    "first token": o.baseline_token if o.position >= 0 else "(phrase not found)",
                    "unedited has trigger": o.baseline_success,
                    "candidates": len(o.candidates),
                    "successes": len(o.successes),
                    "heads": " ".join(head_node(layer, head) for layer, head in o.successes),
                }
            )
        return [Table("heads whose value edit made the trigger appear", heads), Table("experiments", rows)]

    def figures(self) -> list[Figure]:
        """The notebook's heatmap: successes per head (rows) and layer (columns)."""
        z = self.successes.T.tolist()
        return [
            Figure(
                "temporal_edit",
                "heatmap",
                f"temporal knowledge edit: successes over {len(self.outcomes)} experiments",
                "layer",
                "head",
                x=list(range(self.successes.shape[0])),
                y=list(range(self.successes.shape[1])),
                z=z,
                value_label="experiments",
            )
        ]


def _decode(model: Model, ids: Sequence[int]) -> str:
    if model.tokenizer is None:
        return " ".join(str(i) for i in ids)
    return model.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


def temporal_edit(
    model: Model,
    experiments: Sequence[EditExperiment] | str | Path | None = None,
    *,
    sample: bool = False,
    seed: int = SEED,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 50,
    max_batch: int = 128,
) -> TemporalEdit:
    """Edit temporal knowledge through each head's values (Park et al., ACL 2025, notebook 7) for
    every (layer, head) and experiment, and count the successes per head.

    ``experiments``: a list, a JSONL file (:func:`load_experiments`) or None for the paper's 15
    (:func:`default_experiments`). Decoding is greedy unless ``sample`` (see :class:`Decoding`);
    ``max_new_tokens`` is the success window; ``max_batch`` bounds the rows run at once.
    Experiments sharing a target prompt share its cached prefix: their edits are screened as
    batch rows, then only the candidates generate, together (see the module's docstring)."""
    if experiments is None:
        experiments = default_experiments()
    elif isinstance(experiments, str | Path):
        experiments = load_experiments(experiments)
    experiments = list(experiments)
    if not experiments:
        raise LmscopeError("no experiments")
    if max_batch < 1 or max_new_tokens < 1:
        raise LmscopeError("max_batch and max_new_tokens must be at least 1")
    check_experiments(model, experiments, max_new_tokens)
    if sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise LmscopeError("sampling needs temperature > 0 and 0 < top_p <= 1")
    decoding = Decoding(sample, seed, temperature, top_p, max_new_tokens)
    shape = (model.n_layers, model.n_heads)
    successes = torch.zeros(shape, dtype=torch.long)
    candidates = torch.zeros(shape, dtype=torch.long)
    prepared = [(token_ids(model, e.target), e) for e in experiments]
    groups: dict[tuple, list[int]] = {}
    for i, (ids, e) in enumerate(prepared):
        groups.setdefault((tuple(ids), phrase_position(model, ids, e.phrase)), []).append(i)
    outcomes: list[EditOutcome | None] = [None] * len(experiments)
    values: dict[tuple[int, ...], Tensor] = {}  # source values by source tokens
    title = f"temporal edit: {len(experiments)} experiments x {shape[0] * shape[1]} heads"
    with progress_bar(title, len(experiments)) as advance:
        for (ids, position), members in groups.items():
            group = [experiments[i] for i in members]
            if position < 0:
                found = [EditOutcome(e, -1, "", None, None, [], []) for e in group]
            else:
                for e in group:
                    key = tuple(token_ids(model, e.source))
                    if key not in values:
                        values[key] = source_values(model, e.source)
                vals = [values[tuple(token_ids(model, e.source))] for e in group]
                found = _sweep_target(model, _prepare(model, ids, position), group, vals, decoding, max_batch)
            for i, outcome in zip(members, found):
                outcomes[i] = outcome
                for layer, head in outcome.candidates:
                    candidates[layer, head] += 1
                for layer, head in outcome.successes:
                    successes[layer, head] += 1
            advance(len(members))
    settings = {
        "sample": sample,
        "seed": seed,
        "temperature": temperature if sample else 0.0,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
    }
    return TemporalEdit(successes, candidates, [o for o in outcomes if o is not None], settings, model=model.name)


def _sweep_target(
    model: Model,
    target: _Target,
    experiments: Sequence[EditExperiment],
    values: Sequence[Tensor],
    decoding: Decoding,
    max_batch: int,
) -> list[EditOutcome]:
    """Screen, then generate for the candidates of, experiments sharing ``target``: every
    experiment's candidate edits (one row per layer and KV head) and the unedited target
    generate as rows of one batch (or of batches of ``max_batch``), if there are candidates."""
    screens = _screens(model, target, experiments, values, decoding, max_batch)
    group = model.n_heads // model.n_kv_heads
    rows: list[_Row | None] = [None]  # row 0: the unedited target
    where: list[dict[tuple[int, int], int]] = []  # per experiment: (layer, KV head) -> row
    for e, v, screen in zip(experiments, values, screens):
        own = {}
        for layer, head in screen.changed.nonzero().tolist():
            key = (layer, head // group)
            if key not in own:
                own[key] = len(rows)
                rows.append(_Row(layer, key[1], e.coeff * v[key]))
        where.append(own)
    new: list[list[int]] = []
    if len(rows) > 1:  # the unedited row rides along only when candidates generate
        # Under torchrun, the batches of candidate edits go round-robin to the ranks.
        for generated in distributed.ordered_map(
            _batches(rows, max_batch), lambda batch: _generate(model, target, batch, decoding)
        ):
            new += generated
    prompt = target.ids[0].tolist()
    texts = [_decode(model, ids) for ids in new]
    outcomes = []
    for e, screen, own in zip(experiments, screens, where):
        hit = {row: triggered(model, prompt + new[row], e.trigger) for row in own.values()}
        heads = [(layer, head) for layer, head in screen.changed.nonzero().tolist()]
        outcomes.append(
            EditOutcome(
                e,
                target.position,
                _decode(model, [screen.baseline]),
                texts[0] if new else None,
                triggered(model, prompt + new[0], e.trigger) if new else None,
                heads,
                [(layer, head) for layer, head in heads if hit[own[layer, head // group]]],
                {head_node(layer, head): texts[own[layer, head // group]] for layer, head in heads},
            )
        )
    return outcomes

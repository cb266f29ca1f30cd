"""The probing data of "Temporal Heads" (Park et al., ACL 2025, arXiv 2502.14258) and the
clean/corrupted pairs its circuits are built from.

**Loading.** A *temporal* category (``Temporal/*.json``) holds facts that change over time
(``{subject, object, time}``: "In year 1999, the president of South Korea was" -> "Kim
Dae-jung"), the candidate objects of each subject and alias sentences that say a year as an
event; an *invariant* category (``Invariant/*.json``) holds facts that do not (``{subject,
object}``). :func:`load_categories` reads the bundled files (``lmscope/data/temporalhead``, see
its README) or any files of the same format; malformed rows (an object missing from its
subject's candidate list, a template with unknown fields, ...) and files of another shape found
under a directory come back as :class:`Problem` next to the data and are skipped; a file named
itself must read as a category.

**Pairs**, as the paper's notebook ``1.circuit_construction.ipynb`` builds them for EAP-IG:

- temporal, target year T: every sample of year T is paired with every sample of the same
  subject with another year and another object; the prompts differ only in the year
  (``template(T, subject)`` vs ``template(T', subject)``); the answer is the clean object, the
  wrong answer the corrupted one (:func:`temporal_pairs`);
- alias: the same pairs with each year said as an event (``alias_time_templates``), the year
  template where a year has no alias sentence;
- invariant: every sample is paired with every sample of another object (the subject swapped,
  :func:`invariant_pairs`).

Answers are scored by their first token (the notebook's ``tokenizer(object,
add_special_tokens=False).input_ids[0]``). On Llama-2's SentencePiece tokenizer, used by the
paper, that is the word-initial token the object starts with after the prompt; here it is
taken as exactly that (the first token of ``prompt + " " + object`` after the prompt's), which
is the same token there and the right one on byte-level BPE tokenisers (SmolLM2, GPT-2, Qwen),
where the bare object would tokenise as a mid-word piece. The paper's code prepends BOS to
every prompt (TransformerLens ``to_tokens(prepend_bos=True)`` in ``eap/attribute.py``):
``bos=True``, the default, does the same (SmolLM2's tokenizer adds none by itself). Pairs
whose prompts tokenise to different lengths are dropped and counted (the notebook's
invariant and alias cells skip them; EAP-IG reads both prompts with one attention mask).
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import ClassVar

import torch

from lmscope.circuits.pairs import TokenPair
from lmscope.core.errors import LmscopeError
from lmscope.core.jsonl import read_json
from lmscope.core.model import Model

BUNDLED = resources.files("lmscope") / "data" / "temporalhead"
KINDS = ("Temporal", "Invariant")


# -- types -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A malformed row or file, skipped: ``row`` indexes the list the message names (None for
    the file itself)."""

    file: str
    row: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


@dataclass(frozen=True)
class TemporalSample:
    subject: str
    object: str
    time: str


@dataclass(frozen=True)
class InvariantSample:
    subject: str
    object: str


@dataclass(frozen=True)
class AliasTemplate:
    """A year said as an event: ``template`` has ``{}`` for the subject."""

    year: str
    template: str


@dataclass(frozen=True)
class SubjectObjects:
    """The candidate objects of one subject (``all_possible_objects``)."""

    subject: str
    objects: tuple[str, ...]
    year_range: str = ""


@dataclass(frozen=True)
class TemporalCategory:
    """One ``Temporal/*.json`` file: templates have ``{time}`` and ``{subject}``."""

    kind: ClassVar[str] = "temporal"
    name: str
    prompt_templates: tuple[str, ...]
    prompt_templates_zs: tuple[str, ...]
    samples: tuple[TemporalSample, ...]
    alias_time_templates: tuple[AliasTemplate, ...] = ()
    all_possible_objects: tuple[SubjectObjects, ...] = ()
    prompt_templates_general: tuple[str, ...] = ()
    file: str = ""

    def candidates(self, subject: str) -> tuple[str, ...]:
        """The candidate objects of ``subject`` (its ``all_possible_objects`` row)."""
        for row in self.all_possible_objects:
            if row.subject == subject:
                return row.objects
        raise LmscopeError(f"{self.name}: no candidate objects for subject {subject!r}")

    @property
    def years(self) -> list[str]:
        """The years of the samples, sorted."""
        return sorted({s.time for s in self.samples})

    def alias(self, year: str) -> str | None:
        """The alias sentence of ``year`` (``{}`` for the subject), or None."""
        return next((a.template for a in self.alias_time_templates if a.year == year), None)


@dataclass(frozen=True)
class InvariantCategory:
    """One ``Invariant/*.json`` file: templates have ``{subject}``."""

    kind: ClassVar[str] = "invariant"
    name: str
    prompt_templates: tuple[str, ...]
    prompt_templates_zs: tuple[str, ...]
    samples: tuple[InvariantSample, ...]
    properties: dict = field(default_factory=dict)
    file: str = ""

    def candidates(self, subject: str | None = None) -> tuple[str, ...]:
        """Every object of the category, sorted (the candidates of every subject, as in the
        paper's ``5.compute-logprobs.ipynb``)."""
        return tuple(sorted({s.object for s in self.samples}))


Category = TemporalCategory | InvariantCategory


# -- loading ---------------------------------------------------------------------------------


def load_category(path: str | Path) -> tuple[Category, list[Problem]]:
    """One category file and the problems of its rows (skipped). A file that cannot be read, is
    not JSON or of neither shape raises a one-line :class:`LmscopeError` naming it."""
    return _Parser(str(path)).category(read_json(path, "category file (JSON)"))


def load_categories(
    paths: str | Path | Sequence[str | Path] | None = None, kind: str | None = None
) -> tuple[list[Category], list[Problem]]:
    """Categories from files or directories (every ``*.json`` under a directory, sorted; the
    bundled ``Temporal/`` then ``Invariant/`` files when ``paths`` is None), with the problems
    found: malformed rows, and files under a directory that are not JSON or of neither shape,
    all skipped. A file named in ``paths`` that cannot be read as a category, or paths that hold
    no category at all, raise :class:`LmscopeError`. ``kind``: keep only ``"temporal"`` or
    ``"invariant"`` categories."""
    if kind not in (None, "temporal", "invariant"):
        raise LmscopeError(f"kind must be 'temporal' or 'invariant', not {kind!r}")
    categories, problems, read = [], [], 0
    for file, named in _files(paths):
        try:
            category, found = load_category(file)
        except LmscopeError as e:
            if named:
                raise
            problems.append(Problem(str(file), None, str(e).removeprefix(f"{file}: ")))
            continue
        problems += found
        read += 1
        if kind is None or category.kind == kind:
            categories.append(category)
    if not read:
        first = f" ({problems[0]})" if problems else ""
        raise LmscopeError(f"no category files in {', '.join(map(str, _as_list(paths)))}{first}")
    return categories, problems


def _as_list(paths: str | Path | Sequence[str | Path]) -> list:
    return [paths] if isinstance(paths, str | Path) else list(paths)


def bundled(key: str) -> tuple[Category, list[Problem]]:
    """The bundled category whose file name or ``name`` contains ``key`` (case-insensitive),
    e.g. ``"presidents"``, ``"time_ceo"``, ``"roman"``, as the notebooks find their file."""
    matches = [f for f, _ in _files(None) if key.lower() in f.stem.lower()]
    if not matches:
        categories, _ = load_categories()
        matches = [Path(c.file) for c in categories if key.lower() in c.name.lower()]
    if len(matches) != 1:
        names = ", ".join(f.stem for f, _ in _files(None))
        raise LmscopeError(f"{len(matches)} bundled categories match {key!r} (files: {names})")
    return load_category(matches[0])


def _files(paths: str | Path | Sequence[str | Path] | None) -> list[tuple[Path, bool]]:
    """``(file, named)``: the category files of ``paths`` (the bundled ones when None), ``named``
    when given as a file rather than found under a directory."""
    if paths is None:
        bundled = [f for kind in KINDS for f in sorted(BUNDLED.joinpath(kind).iterdir(), key=str) if _json(f)]
        return [(Path(str(f)), False) for f in bundled]
    out = []
    for p in _as_list(paths):
        p = Path(p)
        if p.is_dir():
            out += [(f, False) for f in sorted(p.rglob("*.json")) if f.is_file()]
        elif p.exists():
            out.append((p, True))
        else:
            raise LmscopeError(f"{p}: no such file or directory")
    return out


def _json(f) -> bool:
    return f.name.endswith(".json") and f.is_file()


_TEMPORAL_KEYS = ("name", "prompt_templates", "samples", "all_possible_objects")
_INVARIANT_KEYS = ("name", "prompt_templates", "samples")


class _Parser:
    """Validates one file's JSON into a category, collecting row problems."""

    def __init__(self, file: str):
        self.file = file
        self.problems: list[Problem] = []

    def fail(self, message: str) -> LmscopeError:
        return LmscopeError(f"{self.file}: {message}")

    def report(self, section: str, row: int, message: str) -> None:
        self.problems.append(Problem(self.file, row, f"{section}[{row}]: {message}"))

    def category(self, data) -> tuple[Category, list[Problem]]:
        if not isinstance(data, dict):
            raise self.fail("neither a temporal nor an invariant category (expected a JSON object)")
        temporal = any(k in data for k in ("all_possible_objects", "alias_time_templates"))
        required = _TEMPORAL_KEYS if temporal else _INVARIANT_KEYS
        missing = [k for k in required if k not in data]
        if missing:
            what = "a temporal" if temporal else "an invariant"
            raise self.fail(
                f"neither a temporal nor an invariant category (as {what} one, missing {', '.join(missing)})"
            )
        if not isinstance(data["name"], str):
            raise self.fail("'name' must be a string")
        for key in ("prompt_templates", "prompt_templates_zs", "prompt_templates_general", "samples"):
            if not isinstance(data.get(key, []), list):
                raise self.fail(f"'{key}' must be a list")
        category = self.temporal(data) if temporal else self.invariant(data)
        return category, self.problems

    def templates(self, data: dict, key: str, required: set[str], allowed: set[str]) -> tuple[str, ...]:
        kept = []
        for i, t in enumerate(data.get(key, [])):
            problem = _template_problem(t, required, allowed)
            if problem:
                self.report(key, i, problem)
            else:
                kept.append(t)
        return tuple(kept)

    def rows(self, data: dict, key: str, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> Iterator[tuple]:
        """``(index, {field: value})`` of the rows of ``data[key]`` whose ``fields`` are non-empty
        strings, in order (the others reported as they come)."""
        rows = data.get(key, [])
        if not isinstance(rows, list):
            raise self.fail(f"'{key}' must be a list")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                self.report(key, i, "expected a JSON object")
                continue
            bad = [f for f in fields if not (isinstance(row.get(f), str) and row[f])]
            bad += [f for f in optional if f in row and not isinstance(row[f], str)]
            if bad:
                self.report(key, i, f"missing or not a non-empty string: {', '.join(bad)}")
                continue
            yield i, row

    def temporal(self, data: dict) -> TemporalCategory:
        prompt = self.templates(data, "prompt_templates", {"time", "subject"}, {"time", "subject"})
        zs = self.templates(data, "prompt_templates_zs", {"time", "subject"}, {"time", "subject"})
        general = self.templates(data, "prompt_templates_general", {"subject"}, {"subject"})
        aliases = []
        for i, row in self.rows(data, "alias_time_templates", ("year", "template")):
            problem = _template_problem(row["template"], {""}, {""})
            if problem:
                self.report("alias_time_templates", i, problem.replace("{}", "{} (the subject)"))
            else:
                aliases.append(AliasTemplate(row["year"], row["template"]))
        objects = self.objects(data)
        candidates = {o.subject: o.objects for o in objects}
        samples = []
        for i, row in self.rows(data, "samples", ("subject", "object", "time")):
            subject, obj = row["subject"], row["object"]
            if subject not in candidates:
                self.report("samples", i, f"subject {subject!r} has no candidate objects (all_possible_objects)")
            elif obj not in candidates[subject]:
                self.report("samples", i, f"object {obj!r} is not among the candidate objects of {subject!r}")
            else:
                samples.append(TemporalSample(subject, obj, row["time"]))
        return TemporalCategory(
            data["name"], prompt, zs, tuple(samples), tuple(aliases), tuple(objects), general, self.file
        )

    def objects(self, data: dict) -> list[SubjectObjects]:
        out, seen = [], set()
        for i, row in self.rows(data, "all_possible_objects", ("subject",), ("year_range",)):
            objects = row.get("objects")
            if not (isinstance(objects, list) and objects and all(isinstance(o, str) and o for o in objects)):
                self.report("all_possible_objects", i, "'objects' must be a non-empty list of non-empty strings")
            elif row["subject"] in seen:
                self.report("all_possible_objects", i, f"subject {row['subject']!r} listed twice (first kept)")
            else:
                seen.add(row["subject"])
                out.append(SubjectObjects(row["subject"], tuple(objects), row.get("year_range", "")))
        return out

    def invariant(self, data: dict) -> InvariantCategory:
        prompt = self.templates(data, "prompt_templates", {"subject"}, {"subject"})
        zs = self.templates(data, "prompt_templates_zs", {"subject"}, {"subject"})
        samples = [
            InvariantSample(r["subject"], r["object"]) for _, r in self.rows(data, "samples", ("subject", "object"))
        ]
        properties = data.get("properties", {})
        return InvariantCategory(
            data["name"], prompt, zs, tuple(samples), properties if isinstance(properties, dict) else {}, self.file
        )


def _template_problem(template, required: set[str], allowed: set[str]) -> str | None:
    """Why ``template`` cannot be filled with the ``allowed`` fields (``""``: one ``{}``), or None."""
    if not isinstance(template, str) or not template:
        return "a template must be a non-empty string"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        return f"malformed template {template!r} ({e})"
    shown = lambda names: ", ".join("{" + n + "}" for n in sorted(names))
    unknown = set(fields) - allowed
    if unknown:
        return f"unknown template field {shown(unknown)} in {template!r} (allowed: {shown(allowed)})"
    if "" in allowed and len(fields) != 1:
        return f"template {template!r} must have exactly one {{}}"
    lacking = required - set(fields)
    if lacking:
        return f"template {template!r} lacks {shown(lacking)}"
    return None


# -- pairs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairText:
    """A pair as text: the prompts and the two objects (answer, wrong answer)."""

    clean: str
    corrupt: str
    answer: str
    wrong: str


@dataclass
class PairSet:
    """Token pairs for :func:`~lmscope.circuits.edges.edge_attribution` and
    :func:`~lmscope.circuits.faithfulness.faithfulness`, their texts (same order), and how many
    pairs were dropped because the two prompts tokenise to different lengths."""

    name: str
    pairs: list[TokenPair]
    texts: list[PairText]
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.pairs)


@dataclass
class YearPairs:
    """The pairs of each target year of a temporal category, and of invariant categories."""

    category: str
    years: dict[str, PairSet]
    invariant: dict[str, PairSet]


class PromptTokens:
    """Tokenises prompts (with BOS prepended or not) and first answer tokens, each text once."""

    def __init__(self, model: Model, bos: bool):
        if model.tokenizer is None:
            raise LmscopeError(f"model {model.name} has no tokenizer: pairs are built from text")
        self.tokenizer = model.tokenizer
        self.bos = model.bos_ids() if bos else []
        self._ids: dict[str, list[int]] = {}

    def plain(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._ids[text]

    def prompt(self, text: str) -> list[int]:
        return self.bos + self.plain(text)

    def first_answer_token(self, prompt: str, obj: str) -> int:
        """The first token of ``obj`` as it follows ``prompt`` (``prompt + " " + obj``)."""
        before, joint = self.plain(prompt), self.plain(f"{prompt} {obj}")
        k = next((i for i, (a, b) in enumerate(zip(before, joint, strict=False)) if a != b), len(before))
        if k >= len(joint):
            raise LmscopeError(f"object {obj!r} adds no token after {prompt!r}")
        return joint[k]


def _build(tokens: PromptTokens, name: str, texts: list[PairText]) -> PairSet:
    """Token pairs of ``texts``, dropping (and counting) those whose prompts differ in length."""
    pairs, kept, dropped = [], [], 0
    for t in texts:
        clean, corrupt = tokens.prompt(t.clean), tokens.prompt(t.corrupt)
        if len(clean) != len(corrupt):
            dropped += 1
            continue
        answer = tokens.first_answer_token(t.clean, t.answer)
        wrong = tokens.first_answer_token(t.corrupt, t.wrong)
        ones = torch.ones(len(clean), dtype=torch.long)
        pairs.append(
            TokenPair(
                torch.tensor(clean), torch.tensor(corrupt), torch.tensor([answer]), torch.tensor([wrong]), ones, ones
            )
        )
        kept.append(t)
    return PairSet(name, pairs, kept, dropped)


def _template(category: Category, template: int) -> str:
    if not 0 <= template < len(category.prompt_templates):
        raise LmscopeError(
            f"{category.name}: no prompt template {template} ({len(category.prompt_templates)} usable templates)"
        )
    return category.prompt_templates[template]


def temporal_texts(
    category: TemporalCategory, year: str | int, *, template: int = 0, alias: bool = False
) -> list[PairText]:
    """The pairs of target ``year`` as text (notebook 1, "Temporal Dataset" and "with Alias"):
    each sample of that year with each sample of the same subject, another year and another
    object, in file order. ``alias``: the years said as events (the year template where a year
    has no alias sentence)."""
    year = str(year)
    fmt = _template(category, template)

    def prompt(time: str, subject: str) -> str:
        sentence = category.alias(time) if alias else None
        return sentence.format(subject) if sentence else fmt.format(time=time, subject=subject)

    texts = []
    for s in category.samples:
        if s.time != year:
            continue
        for c in category.samples:
            if c.subject == s.subject and c.time != s.time and c.object != s.object:
                texts.append(PairText(prompt(s.time, s.subject), prompt(c.time, s.subject), s.object, c.object))
    return texts


def invariant_texts(category: InvariantCategory, *, template: int = 0) -> list[PairText]:
    """The invariant pairs as text (notebook 1, "Time Invariant Dataset"): each sample with each
    sample of another object, the subject swapped, in file order (the notebook shuffles them)."""
    fmt = _template(category, template)
    return [
        PairText(fmt.format(subject=s.subject), fmt.format(subject=c.subject), s.object, c.object)
        for s in category.samples
        for c in category.samples
        if c.object != s.object
    ]


def temporal_pairs(
    model: Model,
    category: TemporalCategory,
    year: str | int,
    *,
    template: int = 0,
    alias: bool = False,
    bos: bool = True,
) -> PairSet:
    """Token pairs of target ``year`` (:func:`temporal_texts`): the prompts differ only in the
    year; answer = the clean object's first token, wrong answer = the corrupted object's.
    ``bos``: prepend the BOS token, as the paper's code does. Pairs of unequal token lengths
    are dropped and counted."""
    label = f"{category.name} {year}" + (" (alias)" if alias else "")
    return _build(PromptTokens(model, bos), label, temporal_texts(category, year, template=template, alias=alias))


def invariant_pairs(model: Model, category: InvariantCategory, *, template: int = 0, bos: bool = True) -> PairSet:
    """Token pairs of an invariant category (:func:`invariant_texts`); as :func:`temporal_pairs`."""
    return _build(PromptTokens(model, bos), category.name, invariant_texts(category, template=template))


def pairs_by_year(
    model: Model,
    category: TemporalCategory,
    invariants: Sequence[InvariantCategory] = (),
    years: Sequence[str | int] | None = None,
    *,
    template: int = 0,
    alias: bool = False,
    bos: bool = True,
) -> YearPairs:
    """The pairs of each target year (all years of the samples by default; a year without pairs
    gets an empty :class:`PairSet`) and of each invariant category, to build one circuit per
    year and compare it with the invariant circuits, as the paper does."""
    tokens = PromptTokens(model, bos)
    suffix = " (alias)" if alias else ""
    by_year = {
        str(y): _build(
            tokens, f"{category.name} {y}{suffix}", temporal_texts(category, y, template=template, alias=alias)
        )
        for y in (category.years if years is None else years)
    }
    invariant = {c.name: _build(tokens, c.name, invariant_texts(c, template=template)) for c in invariants}
    return YearPairs(category.name, by_year, invariant)


def select_categories(
    keys: Sequence[str] | None = None, paths: str | Path | Sequence[str | Path] | None = None
) -> tuple[list[Category], list[Problem]]:
    """The categories of ``paths`` (default: the bundled ones, see :func:`load_categories`) whose
    file name or ``name`` contains one of ``keys`` (case-insensitive; None: all). A key that
    matches nothing is an error naming the categories there are."""
    categories, problems = load_categories(paths)
    if not keys:
        return categories, problems
    matches = lambda c, k: k.lower() in Path(c.file).stem.lower() or k.lower() in c.name.lower()
    unknown = [k for k in keys if not any(matches(c, k) for c in categories)]
    if unknown:
        names = ", ".join(Path(c.file).stem for c in categories)
        raise LmscopeError(f"no category matches {', '.join(map(repr, unknown))} (categories: {names})")
    return [c for c in categories if any(matches(c, k) for k in keys)], problems

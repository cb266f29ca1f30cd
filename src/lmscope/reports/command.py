"""Commands: a settings dataclass and ``run(model, settings, out) -> Result``.

Every ``lmscope`` command is a :class:`Command`: a frozen dataclass of its settings (every
option, its help text in the field's metadata, written with :func:`option`) and a function
``run(model, settings, out)`` that computes the result part by part through ``out``, a
:class:`RunWriter`. The CLI (:mod:`lmscope.cli`) is generated from the settings' fields; the
same ``run`` is the Python entry point::

    out = RunWriter("out/locate", "locate", settings, model=model)
    result = locate_command.run(model, settings, out)

:class:`RunWriter` is the one writer of a command's outputs and the one resume mechanism:
``results.json`` (one layout for every command: a header of command, settings, versions,
processes, model card and timings, then ``parts``), each part's figures as PNG, and
``report.html``, rewritten after every finished part. A rerun with the same settings (compared
as ``asdict(settings)`` in JSON form, with the model and dtype) reads the finished parts back
and runs the rest; a rerun with other settings into the same folder stops with a one-line error
unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmscope.core import distributed, progress
from lmscope.core.errors import LmscopeError
from lmscope.core.files import atomic
from lmscope.core.progress import note
from lmscope.reports.report import Section, write_report
from lmscope.reports.results import Result, output_dir, save, strict, versions, write_json

if TYPE_CHECKING:
    from lmscope.core.model import Model

RESUME_DIR = ".resume"  # a finished part's Result object, pickled, for a rerun to read back


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    short: str | None = None,
    factory: Callable[[], Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    choices: Iterable[str] | None = None,
    path: str | None = None,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A settings field with its CLI help text and the checks of its values (:func:`check_settings`).

    ``flag``: the option's name when it is not the field's (``"--kv"``), ``short``: a one-letter
    alias (``"-c"``), ``factory``: a default made per instance (lists). A field with neither
    default nor factory is a required option. Checks, of each value of a repeatable option:
    ``min``/``max`` inclusive bounds of a number; ``choices`` the words allowed (with ``path``:
    allowed besides a path, as ``wikitext2`` besides a corpus file); ``path`` one of
    :data:`PATH_KINDS`; ``parse`` a function reading a spec string (``"1,2,4"``), raising
    :class:`LmscopeError` or ``ValueError`` when it cannot."""
    if path is not None and path not in PATH_KINDS:
        raise ValueError(f"path must be one of {', '.join(PATH_KINDS)}")
    metadata = {"help": help, "flag": flag, "short": short, "min": min, "max": max, "path": path, "parse": parse,
                "choices": tuple(choices) if choices is not None else None}  # fmt: skip
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def argument(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A settings field given as the positional TEXT after ``[MODEL]`` (``lmscope run``, ``lens``)."""
    return field(default=default, metadata={"help": help, "argument": True})


# -- checking the options ------------------------------------------------------------------------

PATH_KINDS = {
    "file": "an existing file to read",
    "dir": "an existing folder",
    "any": "an existing file or folder",
    "out": "a file to write (not a folder)",
}


def flag_name(f: dataclasses.Field) -> str:
    """The option as the user types it: ``--steps``, ``--layers`` (a field named otherwise), ``TEXT``."""
    if f.metadata.get("argument"):
        return "TEXT"
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_settings(settings: Any) -> None:
    """Check every field of a settings dataclass against its option's declared checks
    (:func:`option`): the one place options are validated, before any model loads (the CLI),
    and again when a :class:`RunWriter` is made (Python). A :class:`LmscopeError` names the
    option as the user types it: ``--steps must be at least 1, not 0``."""
    check_values(type(settings), {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)})


def check_values(cls: type, values: Mapping[str, Any]) -> None:
    """:func:`check_settings` of the ``values`` given for the fields of ``cls`` (before the
    dataclass is made, so that its ``__post_init__`` sees checked values)."""
    for f in dataclasses.fields(cls):
        if f.name in values and values[f.name] is not None:
            value = values[f.name]
            for one in value if isinstance(value, (tuple, list)) else (value,):
                _check(f, one)


def _check(f: dataclasses.Field, value: Any) -> None:
    """One value of field ``f`` against the checks its option declares, and its type's own."""
    name, meta = flag_name(f), f.metadata
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise LmscopeError(f"{name} must be a finite number, not {value}")
    if isinstance(value, (int, float)):
        if meta.get("min") is not None and value < meta["min"]:
            raise LmscopeError(f"{name} must be at least {meta['min']}, not {value}")
        if meta.get("max") is not None and value > meta["max"]:
            raise LmscopeError(f"{name} must be at most {meta['max']}, not {value}")
        return
    if not isinstance(value, (str, Path)):
        return
    text, choices, kind = str(value), meta.get("choices"), meta.get("path")
    if isinstance(value, str) and not text.strip() and f.default != "":
        raise LmscopeError(f"{name} must not be empty")
    if choices and text in choices:
        return
    if kind is not None:
        check_path(name, Path(text), kind, choices)
    elif choices:
        raise LmscopeError(f"unknown {name} {text!r} (choose from {', '.join(choices)})")
    if meta.get("parse") is not None:
        try:
            meta["parse"](text)
        except LmscopeError as e:
            raise LmscopeError(str(e) if name in str(e) else f"{name}: {e}") from None
        except ValueError:
            raise LmscopeError(f"{name}: cannot read {text!r}") from None


def check_path(name: str, path: Path, kind: str, choices: tuple[str, ...] | None = None) -> None:
    """A one-line error unless ``path`` is what ``kind`` (:data:`PATH_KINDS`) asks for."""
    also = f" (or one of {', '.join(choices)})" if choices else ""
    if kind == "out":
        if path.is_dir():
            raise LmscopeError(f"{name} {path} is a folder; give a file name")
        if path.exists() and not path.is_file():
            raise LmscopeError(f"{name} {path} is not a regular file")
        parent = next((p for p in path.absolute().parents if p.exists()), None)
        if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK)):
            raise LmscopeError(f"{name} {path}: cannot write in {parent}")
        return
    if not path.exists():
        raise LmscopeError(f"{name} {path}: no such {'folder' if kind == 'dir' else 'file'}{also}")
    if kind == "file" and path.is_dir():
        raise LmscopeError(f"{name} {path} is a folder, not a file{also}")
    if kind == "dir" and not path.is_dir():
        raise LmscopeError(f"{name} {path} is not a folder")
    if not path.is_dir() and not path.is_file():
        raise LmscopeError(f"{name} {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise LmscopeError(f"{name} {path}: permission denied")


def check_out(out: str | Path) -> Path:
    """The ``--out`` folder, refused before anything runs when it is an existing file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmscopeError(f"--out {out} is a file, not a folder")
    return out


@dataclass(frozen=True)
class Command:
    """One ``lmscope`` command: its name, settings dataclass and ``run(model, settings, out)``.

    ``model``: whether it loads a model (``run`` then receives ``None`` when False);
    ``presets``: named settings (``{"quick": QUICK}``) a flag of the same name starts from, the
    options given on the command line overriding them; ``help``: the first line of its help
    (default: the first line of ``run``'s docstring)."""

    name: str
    settings: type
    run: Callable[[Model | None, Any, RunWriter], Result]
    help: str = ""
    model: bool = True
    presets: Mapping[str, tuple[Any, str]] = field(default_factory=dict)
    hidden_aliases: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        return self.help or " ".join((self.run.__doc__ or "").strip().split("\n\n")[0].split())


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from ``results.json`` (plain, strict JSON: NaN as null)."""
    return json.loads(json.dumps(strict(value), default=str))


def settings_record(settings: Any, **extra: Any) -> dict:
    """The settings as recorded in ``results.json`` and compared on a rerun: ``extra`` (the
    model as given, its dtype) then every field of the settings dataclass."""
    fields = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
    return jsonable({**extra, **fields})


class RunWriter:
    """Writes one command's outputs to ``out`` part by part, and resumes an interrupted run.

    :meth:`part` runs a named part unless a rerun with the same settings finished it already
    (then its result is read back from ``out/.resume``), and after each part rewrites
    ``results.json``, the part's PNGs and ``report.html``. :meth:`update` saves a part's partial
    result while it runs; :meth:`partial` reads it back for a part that continues where it
    stopped. The settings are checked first (:func:`check_settings`); nothing is written before
    the first part, so bad input found while preparing leaves an earlier run's files untouched."""

    def __init__(
        self,
        out: str | Path,
        command: str,
        settings: Any,
        *,
        model: Model | None = None,
        model_name: str | None = None,
        title: str | None = None,
        overwrite: bool = False,
        extra: Mapping[str, Any] | None = None,
    ):
        if dataclasses.is_dataclass(settings):
            check_settings(settings)
        self.out = check_out(out)
        self.command = command
        name = model_name or (model.name if model is not None else None)
        record = {"model": name} if model is not None or model_name else {}
        if model is not None:
            record["dtype"] = model.card()["dtype"]
        self.settings = settings_record(settings, **record)
        self.title = title or f"lmscope {command}" + (f": {name}" if name else "")
        self.overwrite = overwrite
        self.payload: dict = {
            "command": command,
            "status": "running",
            "settings": self.settings,
            "versions": versions(),
            "processes": distributed.world_size(),
            "model": model.card() if model is not None else None,
            "resumed": [],  # the parts read back from an interrupted run with the same settings
            **dict(extra or {}),
            "timings": {},
            "parts": {},
        }
        self.sections: list[Section] = []
        self.results: dict[str, Result] = {}
        self._earlier: dict[str, Any] | None = None  # parts of a rerun's earlier results.json

    # -- resuming ------------------------------------------------------------------------------

    def _open(self) -> dict:
        """Check ``out`` once (before the first write): the earlier run's parts when it was
        this command with these settings, nothing when the folder is new or ``overwrite``."""
        if self._earlier is not None:
            return self._earlier
        output_dir(self.out)
        self._earlier = {}
        path = self.out / "results.json"
        if self.overwrite or not path.exists():
            return self._earlier
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = {}
        if not isinstance(earlier, dict) or earlier.get("command") != self.command:
            raise LmscopeError(
                f"{self.out} holds results of another run ({_what(earlier)}); "
                "choose another --out or pass --overwrite"
            )
        if earlier.get("settings") != self.settings:
            changed = _changed(earlier.get("settings") or {}, self.settings)
            raise LmscopeError(
                f"{self.out} holds a {self.command} run with other settings ({changed}); "
                "choose another --out or pass --overwrite"
            )
        self._earlier = {"parts": earlier.get("parts", {}), "timings": earlier.get("timings", {})}
        return self._earlier

    @property
    def resuming(self) -> bool:
        """Whether this run continues an earlier one with the same settings."""
        return bool(self._open().get("parts"))

    def _resume_path(self, name: str) -> Path:
        return self.out / RESUME_DIR / f"{name}.pt"

    def _read_back(self, name: str) -> Result | None:
        earlier = self._open()
        path = self._resume_path(name)
        if name not in earlier.get("parts", {}) or not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=False)
        except Exception:  # noqa: BLE001 - an unreadable copy is recomputed
            return None

    def _keep(self, name: str, result: Result) -> None:
        if not distributed.is_main():
            return
        with atomic(self._resume_path(name)) as tmp:
            torch.save(result, tmp)

    # -- writing -------------------------------------------------------------------------------

    def part(self, name: str, title: str, description: str, compute: Callable[[], Result]) -> Result:
        """The result of part ``name``: read back from an interrupted run with the same
        settings, or computed by ``compute()`` and written at once (``results.json``, PNGs,
        ``report.html``)."""
        result = self._read_back(name)
        if result is not None:
            seconds = self._open()["timings"].get(name)
            self.payload["resumed"].append(name)
            if distributed.is_main():  # always said: the numbers come from an earlier run
                progress.console.print(f"{self.command}: {name} read back from {self.out / 'results.json'}")
        else:
            note(f"{self.command}: {name}")
            start = time.perf_counter()
            result = compute()
            seconds = time.perf_counter() - start
            self._keep(name, result)
        self.add(name, title, description, result, seconds)
        return result

    def add(self, name: str, title: str, description: str, result: Result, seconds: float | None = None) -> None:
        """Record a finished part and rewrite the outputs."""
        self._open()
        self.results[name] = result
        self.payload["timings"][name] = seconds or 0.0
        self.payload["parts"][name] = result.to_json()
        self.sections = [s for s in self.sections if s.name != name]
        self.sections.append(Section(title, description, result, seconds, name))
        save(self.out, self.payload, result.figures())
        self.write_report()

    def update(self, name: str, partial: Result) -> None:
        """Save part ``name``'s partial result while it runs (``results.json`` and a copy a
        rerun reads back with :meth:`partial`)."""
        self._open()
        self.payload["parts"][name] = partial.to_json()
        save(self.out, self.payload)
        self._keep(f"{name}.partial", partial)

    def partial(self, name: str) -> Result | None:
        """The partial result of part ``name`` saved by an interrupted run with the same
        settings, or None."""
        path = self._resume_path(f"{name}.partial")
        if not self._open().get("parts") or not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=False)
        except Exception:  # noqa: BLE001
            return None

    def file(self, name: str) -> Path:
        """The path of an extra output file in ``out`` (the folder is checked first)."""
        self._open()
        return self.out / name

    def write_json(self, name: str, payload: Mapping) -> Path:
        """Write an extra JSON file into ``out`` (strict JSON, atomically)."""
        return write_json(self.file(name), dict(payload))

    def finish(self) -> None:
        """Mark the run complete in ``results.json`` and ``report.html``."""
        self._open()
        self.payload["status"] = "complete"
        save(self.out, self.payload)
        self.write_report(complete=True)

    def write_report(self, complete: bool = False) -> Path:
        """Rewrite ``report.html`` from the parts finished so far."""
        return write_report(
            self.out / "report.html",
            self.title,
            self.sections,
            complete=complete,
            settings=self.settings,
            versions=self.payload["versions"],
            timings=self.payload["timings"],
        )


def _what(payload: Any) -> str:
    if isinstance(payload, dict) and payload.get("command"):
        return f"lmscope {payload['command']}"
    return "not an lmscope results.json"


def _changed(before: Mapping, now: Mapping) -> str:
    keys = [k for k in {**before, **now} if before.get(k) != now.get(k)]
    shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

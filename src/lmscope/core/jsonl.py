"""Reading the data files users give: text, JSON and JSONL, checked where they are read.

Every data file (prompt pairs, examples, evaluation items, edit experiments, multiple-choice
items, corpora, category files, family tables) is read through this module, so a bad one is
one line naming the file, and for JSONL the line and the field:

- :func:`require_file`: an existing, readable regular file (not a directory);
- :func:`read_text`: its content as UTF-8 text (a leading byte-order mark is dropped); binary
  data, UTF-16 and other encodings are refused;
- :func:`read_json`: one JSON document;
- :func:`read_jsonl`: one JSON value per non-blank line, as ``(where, value)`` with ``where``
  ``file:line``; lines end at ``\\n`` only (JSON strings may hold U+2028 and the like);
- :func:`read_rows`: a JSONL file of objects, each checked against a :class:`Schema` (required
  and optional fields, each of a :class:`Kind`): ``file:line: field 'answer' must be a
  non-empty string, not ""``. An empty file is an error.
"""

from __future__ import annotations

import codecs
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from lmscope.core.errors import LmscopeError

# -- files ---------------------------------------------------------------------------------------


def require_file(path: str | Path, what: str = "file") -> Path:
    """``path`` as a :class:`Path` when it names an existing, readable regular file; else a
    one-line :class:`LmscopeError` (no such file, a directory, not readable)."""
    path = Path(path)
    if path.is_dir():
        raise LmscopeError(f"{path}: is a directory, not a {what}")
    if not path.exists():
        raise LmscopeError(f"{path}: no such file")
    if not path.is_file():
        raise LmscopeError(f"{path}: not a regular file (expected a {what})")
    if not os.access(path, os.R_OK):
        raise LmscopeError(f"{path}: cannot read (permission denied)")
    return path


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    """The bytes of the file ``path`` (checked by :func:`require_file`)."""
    path = require_file(path, what)
    try:
        return path.read_bytes()
    except OSError as e:
        raise LmscopeError(f"{path}: cannot read ({e.strerror or e})") from e


def decode(data: bytes, path: str | Path) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark dropped); UTF-16, other encodings and
    binary data (NUL bytes) are one-line errors naming ``path``."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise LmscopeError(f"{path}: UTF-16 text; save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmscopeError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    if "\x00" in text:
        raise LmscopeError(
            f"{path}: not a text file (it holds NUL bytes: binary data, or UTF-16 without a byte-order mark)"
        )
    return text.removeprefix("\ufeff")


def read_text(path: str | Path, what: str = "text file") -> str:
    """The content of ``path`` as UTF-8 text (see :func:`decode`)."""
    return decode(read_bytes(path, what), path)


def parse_json(text: str, where: str) -> object:
    """``text`` parsed as JSON; malformed JSON (also nesting too deep for the parser and integers
    too long to convert) is an error naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if "\n" in text else f"column {e.colno}"
        raise LmscopeError(f"{where}: malformed JSON ({e.msg} at {at})") from None
    except RecursionError:
        raise LmscopeError(f"{where}: malformed JSON (nested too deeply)") from None
    except ValueError as e:  # integers beyond Python's conversion limit
        raise LmscopeError(f"{where}: malformed JSON ({str(e).splitlines()[0]})") from None


def read_json(path: str | Path, what: str = "JSON file") -> object:
    """The one JSON document in ``path``; an empty file is an error."""
    text = read_text(path, what)
    if not text.strip():
        raise LmscopeError(f"{path}: empty file (expected a {what})")
    return parse_json(text, str(path))


def read_jsonl(path: str | Path, what: str = "JSONL file") -> Iterator[tuple[str, object]]:
    """Yield ``(where, value)`` for each non-blank line of ``path``; ``where`` is ``file:line``.
    Lines end at ``\\n`` (a ``\\r`` before it is dropped)."""
    text = read_text(path, what)
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            where = f"{path}:{number}"
            yield where, parse_json(line, where)


# -- rows ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """What a field's value must be: ``test(value)`` says whether it is; ``description`` says
    what it must be, in errors ("a non-empty string")."""

    description: str
    test: Callable[[object], bool]


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return _integer(value) and abs(value) < 2**1023  # a float can hold it


STRING = Kind("a string", lambda v: isinstance(v, str))
TEXT = Kind("a non-empty string", lambda v: isinstance(v, str) and v != "")
INTEGER = Kind("an integer", _integer)
NUMBER = Kind("a finite number", _finite)
TOKEN_ID = Kind("a token id (an integer >= 0)", lambda v: _integer(v) and v >= 0)
TOKEN_IDS = Kind("a non-empty list of token ids", lambda v: isinstance(v, list) and v and all(map(TOKEN_ID.test, v)))


def list_of(kind: Kind, at_least: int = 1) -> Kind:
    """A list of at least ``at_least`` values, each of ``kind``."""
    return Kind(
        f"a list of at least {at_least} item{'s' * (at_least != 1)}, each {kind.description}",
        lambda v: isinstance(v, list) and len(v) >= at_least and all(map(kind.test, v)),
    )


def either(*kinds: Kind) -> Kind:
    """A value of any of ``kinds``."""
    return Kind(" or ".join(k.description for k in kinds), lambda v: any(k.test(v) for k in kinds))


def shown(value: object, limit: int = 40) -> str:
    """``value`` as it reads in the file, cut to ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}


def json_type(value: object) -> str:
    """What JSON value ``value`` is: "an object", "a list", "a number", ..."""
    return _JSON_TYPES.get(type(value), "a number")


@dataclass(frozen=True)
class Schema:
    """The fields of one kind of row: ``required`` and ``optional`` (a null optional field is
    absent), each of a :class:`Kind`. ``closed``: other fields are errors (else ignored)."""

    required: Mapping[str, Kind]
    optional: Mapping[str, Kind] = field(default_factory=dict)
    closed: bool = False

    def __str__(self) -> str:
        return "{" + ", ".join(self.required) + "".join(f"[, {k}]" for k in self.optional) + "}"

    def fits(self, value: object) -> bool:
        """Whether ``value`` is an object holding every required field (of any type)."""
        return isinstance(value, dict) and all(k in value for k in self.required)

    def check(self, value: object, where: str) -> dict:
        """The fields of ``value`` this schema knows, checked; errors name ``where`` and the field."""
        if not isinstance(value, dict):
            raise LmscopeError(f"{where}: expected a JSON object {self}, not {json_type(value)}")
        missing = [k for k in self.required if k not in value]
        if missing:
            names = ", ".join(f"'{k}'" for k in missing)
            raise LmscopeError(f"{where}: missing field{'s' * (len(missing) > 1)} {names} (expected {self})")
        if self.closed:
            unknown = [k for k in value if k not in self.required and k not in self.optional]
            if unknown:
                names = ", ".join(f"'{k}'" for k in unknown)
                raise LmscopeError(f"{where}: unknown field{'s' * (len(unknown) > 1)} {names} (expected {self})")
        out = {}
        for name, kind in [*self.required.items(), *self.optional.items()]:
            if name not in value or (value[name] is None and name in self.optional):
                continue
            if not kind.test(value[name]):
                raise LmscopeError(f"{where}: field '{name}' must be {kind.description}, not {shown(value[name])}")
            out[name] = value[name]
        return out


class Row(NamedTuple):
    """One checked row: where it is (``file:line``), its fields and the schema it matched."""

    where: str
    values: dict
    schema: Schema


def read_rows(path: str | Path, *schemas: Schema, what: str = "rows") -> list[Row]:
    """The rows of the JSONL file ``path``, each an object checked against the first of
    ``schemas`` whose required fields it holds (the first schema when none). An empty file, a
    line that is not JSON, not an object, lacks a field or has one of the wrong kind is a one-line
    error naming the file, the line and the field. ``what``: the rows' name in errors."""
    rows = []
    for where, value in read_jsonl(path):
        if len(schemas) > 1 and not any(s.fits(value) for s in schemas):
            expected = " or ".join(map(str, schemas))
            raise LmscopeError(f"{where}: expected a JSON object {expected}, not {shown(value)}")
        schema = next((s for s in schemas if s.fits(value)), schemas[0])
        rows.append(Row(where, schema.check(value, where), schema))
    if not rows:
        raise LmscopeError(f"{path}: no {what} (the file is empty; expected one JSON object per line)")
    return rows

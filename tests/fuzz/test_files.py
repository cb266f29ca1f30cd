"""The fuzz suite, files half: every command option that reads a file, given each bad file of its
format, exits with code 2 and one line ``error: ...`` that names the file, with no traceback, and
leaves a pre-existing ``--out`` folder as it was.

The options are found by scanning every command's settings for ``Path`` fields
(:data:`FILE_OPTIONS` says the format of each input, :data:`OUTPUTS` lists the files written, and
:func:`test_every_path_option_is_fuzzed` fails for a new one listed in neither), plus the options
that take a file or a bundled name (corpora, edit experiments), the model argument and
``--families``. Each format has a catalogue of bad files (:func:`catalogue`): empty, blank,
truncated, a JSON array instead of objects, a field of the wrong type or missing, wrong encodings
(Latin-1, UTF-16 with and without a byte-order mark), a huge line (5 MB), out-of-range token ids,
another format's file (safetensors bytes as text, JSONL as a checkpoint), a directory and a
missing path. Everything runs in-process on a tiny Llama (SmolLM2's tokenizer, context 64).
"""

from __future__ import annotations

import dataclasses
import json
import struct
import typing
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import save

from lmscope.cli import commands
from tests.helpers import run_cli

CONTEXT = 64  # the tiny model's context: a 5 MB line is far beyond it
HUGE = 5_000_000

GOOD_ROWS = {
    "pairs": {"clean": "When Mary and John went to the store, John gave a drink to",
              "corrupt": "When Mary and John went to the store, Mary gave a drink to",
              "answer": " Mary", "wrong_answer": " John"},
    "examples": {"positive": " good", "negative": " bad", "prompt": "The movie was"},
    "eval": {"prompt": "I think the film is", "target": " great", "opposite": " awful"},
    "choices": {"context": "The sky is", "choices": [" blue", " green"], "answer": 0},
    "edits": {"source_prompt": "In 2010 the president was", "target_prompt": "In 2020 the president was",
              "subject_phrase": "the president", "trigger_word": "was"},
    "corpus.jsonl": {"text": "The cat sat on the mat and looked at the dog for a while."},
}  # fmt: skip
# Rows whose token ids lie outside the vocabulary (formats that take ids).
ID_ROWS = {
    "pairs": [{**GOOD_ROWS["pairs"], "clean": [5, 6, 10**6], "corrupt": [5, 6, 7]},
              {**GOOD_ROWS["pairs"], "answer": 10**9}],
    "edits": [{**GOOD_ROWS["edits"], "source_prompt": [3, 4, 10**6]}],
}  # fmt: skip
TEMPORAL = {
    "name": "leaders",
    "prompt_templates": ["In {time}, the leader of {subject} was"],
    "prompt_templates_zs": ["In {time}, the leader of {subject} was"],
    "samples": [{"subject": "Acme", "object": "Al", "time": "2000"}, {"subject": "Acme", "object": "Bo", "time": "2001"}],
    "all_possible_objects": [{"subject": "Acme", "objects": ["Al", "Bo"]}],
}
DIRECTORY, MISSING = "<directory>", "<missing>"


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _safetensors_bytes(fmt: str = "lmscope-steering") -> bytes:
    """A valid safetensors file (of lmscope's steering format: another format's file)."""
    return save({"layer.1": torch.zeros(2)}, metadata={"format": fmt})


def catalogue(fmt: str) -> dict[str, bytes | str]:
    """The bad files tried for ``fmt``: name -> content (or :data:`DIRECTORY` / :data:`MISSING`)."""
    common = {"missing": MISSING, "directory": DIRECTORY, "empty": b"", "safetensors": _safetensors_bytes()}
    if fmt == "tensors":
        good = _jsonl([GOOD_ROWS["pairs"]])
        lens = _safetensors_bytes("lmscope-tuned-lens")
        return {**common, "garbage": b"\x89PNG\r\n" + bytes(range(256)) * 4, "jsonl": good,
                "truncated": lens[: len(lens) - 3], "header only": struct.pack("<Q", 10**9)}  # fmt: skip
    common["blank"] = b"  \n\n\t\n"
    text = "Ein schöner Tag am Meer.\n"
    common.update({"latin-1": text.encode("latin-1"), "utf-16": text.encode("utf-16"),
                   "utf-16-le": text.encode("utf-16-le")})  # fmt: skip
    if fmt == "text":
        return common
    if fmt in ("category", "families"):
        good = json.dumps(TEMPORAL)
        bad = {"truncated": good[: len(good) // 2].encode(), "array": b"[1, 2]\n", "nested": b"[" * 200_000,
               "huge int": b'{"name": ' + b"9" * 5000 + b"}", "jsonl": _jsonl([TEMPORAL, TEMPORAL])}  # fmt: skip
        if fmt == "category":
            bad["wrong type"] = json.dumps({**TEMPORAL, "name": 42}).encode()
            bad["missing field"] = json.dumps({k: v for k, v in TEMPORAL.items() if k != "samples"}).encode()
        else:
            bad["wrong type"] = b'{"monet": {"base": "llama", "mlp": 42}}'
            bad["unknown field"] = b'{"monet": {"base": "llama", "nonsense": "x"}}'
        named = json.dumps({"name": "schön"}, ensure_ascii=False)
        bad.update({encoding: named.encode(encoding) for encoding in ("latin-1", "utf-16", "utf-16-le")})
        return {**common, **bad}
    row = GOOD_ROWS[fmt]
    first = next(iter(row))
    line = json.dumps(row)
    bad = {
        "truncated": (line + "\n" + line[: len(line) // 2] + "\n").encode(),
        "array": (json.dumps([row, row]) + "\n").encode(),
        "wrong type": _jsonl([{**row, first: 42}]),
        "null field": _jsonl([{**row, first: None}]),
        "missing field": _jsonl([{k: v for k, v in row.items() if k != first}]),
        "nested": b"[" * 200_000 + b"\n",
        "huge int": (line[:-1] + ', "n": ' + "9" * 5000 + "}\n").encode(),
        "latin-1": json.dumps({**row, first: "schön " + str(row[first])}, ensure_ascii=False).encode("latin-1"),
        "utf-16": _jsonl([row]).decode().encode("utf-16"),
        "utf-16-le": _jsonl([row]).decode().encode("utf-16-le"),
    }
    if fmt != "corpus.jsonl":  # a corpus may hold a long document
        bad["huge line"] = _jsonl([{**row, first: "word " * (HUGE // 5)}])
    for i, id_row in enumerate(ID_ROWS.get(fmt, [])):
        bad[f"token ids {i}"] = _jsonl([row, id_row])
    return {**common, **bad}


# -- the options ---------------------------------------------------------------------------------

# (command, field) -> (format, argv with FILE where the bad file goes); the other files are good.
FILE_OPTIONS = {
    ("locate", "data"): ("pairs", ["locate", "MODEL", "--data", "FILE"]),
    ("circuit", "data"): ("pairs", ["circuit", "MODEL", "--data", "FILE", "--top", "3", "--steps", "1"]),
    ("das", "data"): ("pairs", ["das", "MODEL", "--data", "FILE", "--steps", "1"]),
    ("quant", "choices"): ("choices", ["quant", "MODEL", "--kv", "k4v4", "--tokens", "64", "--window", "32",
                                       "--choices", "FILE"]),
    ("lens", "tuned"): ("tensors", ["lens", "MODEL", "hello", "--tuned", "FILE"]),
    ("probe", "data"): ("examples", ["probe", "MODEL", "--data", "FILE"]),
    ("steer", "pairs"): ("examples", ["steer", "MODEL", "--pairs", "FILE", "--eval", "EVAL", "--layers", "1",
                                      "--coeffs", "1", "--windows", "0", "--samples", "0"]),
    ("steer", "eval"): ("eval", ["steer", "MODEL", "--pairs", "EXAMPLES", "--eval", "FILE", "--layers", "1",
                                 "--coeffs", "1", "--windows", "0", "--samples", "0"]),
    ("steer", "neutral"): ("text", ["steer", "MODEL", "--pairs", "EXAMPLES", "--eval", "EVAL", "--neutral", "FILE",
                                    "--layers", "1", "--coeffs", "1", "--windows", "0", "--samples", "0"]),
    ("temporal", "data"): ("category", ["temporal", "MODEL", "--data", "FILE", "--corpus", "none", "--no-edit"]),
}  # fmt: skip
# Options that take a file or a bundled name (typed str): found by name, fuzzed the same way.
NAMED_OPTIONS = {
    ("outliers", "corpus"): ("corpus", ["outliers", "MODEL", "--corpus", "FILE"]),
    ("kv", "corpus"): ("corpus", ["kv", "MODEL", "--corpus", "FILE"]),
    ("quant", "corpus"): ("corpus", ["quant", "MODEL", "--corpus", "FILE"]),
    ("experts", "corpus"): ("corpus", ["experts", "MODEL", "--corpus", "FILE"]),
    ("lens", "corpus"): ("corpus", ["lens", "MODEL", "hello", "--train-tuned", "--corpus", "FILE"]),
    ("pretrain", "corpus"): ("corpus", ["pretrain", "--corpus", "FILE"]),
    ("pretrain", "eval_corpus"): ("corpus", ["pretrain", "--eval-corpus", "FILE"]),
    ("temporal", "corpus"): ("corpus", ["temporal", "MODEL", "--categories", "presidents", "--corpus", "FILE"]),
    ("temporal", "edits"): ("edits", ["temporal", "MODEL", "--categories", "presidents", "--corpus", "none",
                                      "--edits", "FILE"]),
    ("(app)", "families"): ("families", ["--families", "FILE", "heads", "MODEL"]),
}  # fmt: skip
OUTPUTS = {("lens", "save"), ("probe", "save"), ("steer", "save"), ("steer", "gguf")}


def _suffix(fmt: str, name: str) -> str:
    if fmt == "corpus":
        return ".jsonl" if name.startswith("jsonl:") else ".txt"
    return {"tensors": ".safetensors", "category": ".json", "families": ".json", "text": ".txt"}.get(fmt, ".jsonl")


def _cases() -> list[tuple[tuple[str, str], str, str]]:
    cases = []
    for option, (fmt, _) in {**FILE_OPTIONS, **NAMED_OPTIONS}.items():
        if fmt == "corpus":  # a text file or JSONL rows with a text field
            names = [f"text:{n}" for n in catalogue("text")] + [f"jsonl:{n}" for n in catalogue("corpus.jsonl")]
        else:
            names = list(catalogue(fmt))
        cases += [(option, fmt, name) for name in names]
    return cases


def _content(fmt: str, name: str) -> bytes | str:
    if fmt == "corpus":
        kind, _, name = name.partition(":")
        return catalogue("text" if kind == "text" else "corpus.jsonl")[name]
    return catalogue(fmt)[name]


def test_every_path_option_is_fuzzed():
    """Every Path option of every command is a fuzzed input or a known output."""
    found = set()
    for command in commands():
        if command.name.startswith("features "):  # not fuzzed yet: see test_options.UNCHECKED
            continue
        hints = typing.get_type_hints(command.settings)
        for f in dataclasses.fields(command.settings):
            if "Path" in str(hints[f.name]):
                found.add((command.name, f.name))
    assert found == set(FILE_OPTIONS) | OUTPUTS, found ^ (set(FILE_OPTIONS) | OUTPUTS)


# -- the files -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny Llama with SmolLM2's tokenizer (vocabulary 49152, context 64) and good files."""
    from lmscope.training.pretrain import load_tokenizer

    root = tmp_path_factory.mktemp("fuzz")
    tokenizer = load_tokenizer()
    config = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=CONTEXT,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    T.LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "examples.jsonl").write_bytes(_jsonl([GOOD_ROWS["examples"]] * 4))
    (root / "eval.jsonl").write_bytes(_jsonl([GOOD_ROWS["eval"]] * 2))
    return root


def _bad_file(tmp_path: Path, fmt: str, name: str) -> Path:
    content = _content(fmt, name)
    path = tmp_path / ("bad" + _suffix(fmt, name))
    if content == DIRECTORY:
        path.mkdir()
    elif content != MISSING:
        path.write_bytes(content)
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("option", "fmt", "name"), _cases(), ids=lambda v: v if isinstance(v, str) else ".".join(v))
def test_bad_file_is_one_line_error(capsys, root, tmp_path, option, fmt, name):
    path = _bad_file(tmp_path, fmt, name)
    _, argv = {**FILE_OPTIONS, **NAMED_OPTIONS}[option]
    places = {"MODEL": str(root / "model"), "FILE": str(path), "EVAL": str(root / "eval.jsonl"),
              "EXAMPLES": str(root / "examples.jsonl")}  # fmt: skip
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("kept")
    (out / "results.json").write_text(json.dumps({"command": "earlier", "parts": {}}))
    (out / "sub" / "plot.png").write_bytes(b"\x89PNG kept")
    before = _snapshot(out)
    argv = [places.get(a, a) for a in argv]
    if argv[0] != "--families":
        argv += ["--out", str(out)]
    code, _, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert str(path) in lines[0], err
    assert "Traceback" not in err
    assert _snapshot(out) == before


# -- the model -----------------------------------------------------------------------------------


def _merge(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


MODELS = {
    "missing": None,
    "empty directory": lambda d: [p.unlink() for p in d.iterdir()],
    "no config": lambda d: (d / "config.json").unlink(),
    "config empty": lambda d: (d / "config.json").write_bytes(b""),
    "config truncated": lambda d: (d / "config.json").write_bytes((d / "config.json").read_bytes()[:40]),
    "config array": lambda d: (d / "config.json").write_text("[1, 2]"),
    "config latin-1": lambda d: (d / "config.json").write_bytes('{"name": "schön"}'.encode("latin-1")),
    "config wrong type": lambda d: _merge(d / "config.json", num_hidden_layers="two"),
    "config negative size": lambda d: _merge(d / "config.json", hidden_size=-4),
    "config other shapes": lambda d: _merge(d / "config.json", hidden_size=32),
    "config unknown type": lambda d: _merge(d / "config.json", model_type="no-such-model"),
    "weights garbage": lambda d: (d / "model.safetensors").write_bytes(bytes(range(256)) * 8),
    "weights truncated": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
    "weights empty": lambda d: (d / "model.safetensors").write_bytes(b""),
    "weights missing": lambda d: (d / "model.safetensors").unlink(),
    "tokenizer garbage": lambda d: (d / "tokenizer.json").write_text("{oops"),
    "jsonl as model": "rows.jsonl",
    "garbage gguf": "model.gguf",
    "truncated gguf": "short.gguf",
}


@pytest.mark.parametrize("name", list(MODELS))
def test_bad_model_is_one_line_error(capsys, root, tmp_path, name):
    """A corrupt model directory or file: one line naming it, before anything is written."""
    make = MODELS[name]
    model = tmp_path / "model"
    if isinstance(make, str):
        model = tmp_path / make
        content = {"rows.jsonl": _jsonl([GOOD_ROWS["pairs"]]), "model.gguf": b"GGUF" + bytes(range(256)) * 4}
        model.write_bytes(content.get(make, b"GGUF\x03\x00"))
    elif make is not None:
        model.mkdir()
        for f in (root / "model").iterdir():
            (model / f.name).symlink_to(f)
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            (model / f).unlink()
            (model / f).write_bytes((root / "model" / f).read_bytes())
        make(model)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    code, _, err = run_cli(capsys, "heads", str(model), "--length", "4", "--batch", "1", "--out", str(out))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:") and str(model) in lines[0], err
    assert "Traceback" not in err
    assert _snapshot(out) == {"notes.txt": b"kept"}


# -- files the Python API reads --------------------------------------------------------------------


def _loaders() -> dict:
    from lmscope.readout.tuned import check_tuned_lens
    from lmscope.steering.lineas import load_transport
    from lmscope.steering.store import load_control_vector, load_vectors

    return {"steering vectors": load_vectors, "LinEAS maps": load_transport, "tuned lens": check_tuned_lens,
            "control vector": load_control_vector}  # fmt: skip


@pytest.mark.parametrize("name", list(catalogue("tensors")))
@pytest.mark.parametrize("loader", ["steering vectors", "LinEAS maps", "tuned lens", "control vector"])
def test_bad_saved_file_is_one_line_error(tmp_path, loader, name):
    """Saved vectors, maps, lenses and control vectors: a bad file is a one-line LmscopeError naming it."""
    from lmscope.core.errors import LmscopeError

    path = _bad_file(tmp_path, "tensors", name)
    if name == "safetensors":  # a file of the right format, damaged inside: a layer that is no number, no metadata
        tensors = {"layer.x": torch.zeros(2), "scale": torch.zeros(2), "shift": torch.zeros(2)}
        path.write_bytes(save(tensors, metadata={"format": "lmscope-steering", "method": "lineas", "site": "x"}))
    with pytest.raises(LmscopeError) as error:
        _loaders()[loader](path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)

"""Every option of every command, given bad values: one line ``error: ...``, exit code 2, no
traceback, and an earlier ``--out`` folder left byte for byte as it was.

The cases are generated from the commands' settings dataclasses (and the load options of the
commands that load a model): a catalogue of bad values per kind of option (integers, numbers,
words, files, folders, specs, sites) using the checks each option declares, so a new command or
option is tried without a line here. :data:`BASE` gives each command's smallest valid
invocation (a test fails for a command missing there). Values that are only bad for a given
model (layers, heads, positions past its size) are the table :data:`MODEL_CASES`; the named
crashes of issue 22 have a test each at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path

import pytest
import torch
import transformers as T

from lmscope import cli
from lmscope.core.errors import LmscopeError
from tests.helpers import read_results, run_cli

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "examples" / "steering" / "sentiment_pairs.jsonl"
EVAL = ROOT / "examples" / "steering" / "sentiment_eval.jsonl"
MISSING = "/no/such/file.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, 4 heads) with SmolLM2's tokenizer, saved as a model folder."""
    from lmscope.core.loading import convert_gguf, resolve

    kind, where = resolve("smollm2-135m")
    tokenizer = T.AutoTokenizer.from_pretrained(convert_gguf(where) if kind == "gguf" else where)
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("fuzz") / "model"
    T.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# -- what each command needs to start --------------------------------------------------------------

# command -> (positional arguments after MODEL, options): the smallest valid invocation.
BASE: dict[str, tuple[list[str], list[str]]] = {
    "verify": ([], []),
    "scan": ([], []),
    "temporal": ([], []),
    "locate": ([], ["--task", "ioi", "--n", "2"]),
    "circuit": ([], ["--task", "ioi", "--n", "2", "--top", "5"]),
    "heads": ([], []),
    "outliers": ([], []),
    "kv": ([], []),
    "quant": ([], []),
    "experts": ([], []),
    "lens": (["hello world"], []),
    "probe": ([], ["--data", str(PAIRS)]),
    "steer": ([], ["--pairs", str(PAIRS), "--eval", str(EVAL)]),
    "das": ([], ["--task", "ioi", "--n", "4", "--steps", "1"]),
    "pretrain": ([], []),
}

# Issue 23's commands: their options declare no checks yet, so the catalogue would fail on every
# one of them (issue 22 stays open for them); test_features_commands_declare_their_checks flips
# to a failure once they do, and they join COMMANDS.
UNCHECKED = {"features train", "features eval", "features snmf", "features show"}
ALL_COMMANDS = {command.name: command for command in cli.commands()}
COMMANDS = {name: command for name, command in ALL_COMMANDS.items() if name not in UNCHECKED}


# -- the catalogue of bad values --------------------------------------------------------------------


def _kind(annotation) -> type:
    """The value type of a field: int, float, str, Path or bool (optional and repeatable unwrapped)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None) and a is not Ellipsis]
    if typing.get_origin(annotation) is not None and args:
        return _kind(args[0])
    return annotation


def bad_values(field: dataclasses.Field, annotation, folder: Path) -> list[str]:
    """The bad values tried for one option, from its type and its declared checks."""
    meta, kind = field.metadata, _kind(annotation)
    low, high = meta.get("min"), meta.get("max")
    if kind is bool:
        return []
    if kind is int:
        values = ["abc", "1.5", ""]
        values += [str(low - 1)] + (["-1"] if low > 0 else []) if low is not None else []
        values += [str(high + 1), str(10**12)] if high is not None else []
        return values + ([str(10**12), str(-(10**12))] if low is None and high is None else [])
    if kind is float:
        values = ["nan", "inf", "-inf", "-1e309", "x", ""]
        return values + ([str(low - 1)] if low is not None else []) + ([str(high + 1)] if high is not None else [])
    path = meta.get("path")
    values = [] if field.default == "" else ["", "   "]
    if path in ("file", "any"):
        values += [MISSING, "/dev/null"]
    if path == "file":
        values += [str(folder)]
    if path == "out":
        values += [str(folder), "/dev/null"]
    if meta.get("choices") and not path:
        values += ["nonsense"]
    if meta.get("parse"):
        values += [",", "1,,2", "a", "nonsense", "blocks.99.resid_post"]
    return values if kind is str or path else []


def option_cases() -> list[tuple[str, str, str]]:
    """``(command, flag, value)`` for every option of every command and every bad value of it."""
    cases = []
    for name, command in COMMANDS.items():
        classes = [command.settings] + ([cli.LoadOptions] if command.model else [])
        for cls in classes:
            hints = typing.get_type_hints(cls)
            for field in dataclasses.fields(cls):
                if field.metadata.get("argument") or field.name == "model":
                    continue
                flag = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
                cases += [(name, flag, value) for value in bad_values(field, hints[field.name], Path("/tmp"))]
    return cases


POSITIONAL = [("MODEL", v) for v in ("", "   ", "/no/such/model", "/dev/null", "FOLDER")] + [("TEXT", v) for v in ("", "  ")]

# Values only bad for the tiny model (2 layers, 4 heads, 128 positions): checked once it loads.
MODEL_CASES = [
    ("outliers", ["--site", "blocks.2.resid_post"], "blocks.2"),
    ("outliers", ["--site", "blocks.0.attn.z.4"], "head 4"),
    ("probe", ["--layers", "2"], "layer 2"),
    ("steer", ["--layers", "0,2"], "layer 2"),
    ("steer", ["--layers", "1+5"], "layer 5"),
    ("lens", ["--position", "2"], "position 2"),
    ("lens", ["--position", "-3"], "position -3"),
    ("verify", ["--check", "nonsense"], "nonsense"),
]


# -- running them -------------------------------------------------------------------------------------


def _earlier_run(folder: Path) -> dict[str, bytes]:
    """An ``--out`` folder holding an earlier run's files; returns their bytes by name."""
    folder.mkdir()
    (folder / "results.json").write_text('{"command": "earlier", "parts": {}}')
    (folder / "notes.txt").write_bytes(b"kept \x00 byte for byte\n")
    return _files(folder)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, tmp_path, argv: list[str], *named: str) -> str:
    """Run ``lmscope argv --out <an earlier run>``; assert exit 2, one line ``error: ...`` naming
    one of ``named``, no traceback, the earlier run untouched. Returns the line."""
    out = tmp_path / "out"
    before = _earlier_run(out)
    code, printed, err = run_cli(capsys, *argv, "--out", str(out))
    text = (printed + err).strip()
    assert code == 2, f"{argv}: exit {code}\n{text}"
    assert "Traceback" not in text and len(text.splitlines()) == 1 and text.startswith("error:"), f"{argv}:\n{text}"
    wanted = [n for n in named if n.strip()]
    assert any(n in text for n in wanted), f"{argv}: the error names none of {wanted}: {text}"
    assert _files(out) == before, f"{argv} changed the earlier run in --out"
    return text


def _argv(model_dir: Path, command: str, *extra: str, text: str | None = None, model: str | None = None) -> list[str]:
    positional, options = BASE[command]
    if text is not None:
        positional = [text]
    head = [model if model is not None else str(model_dir)] if COMMANDS[command].model else []
    return [command, *head, *positional, *options, *extra]


def test_every_command_has_a_base_invocation():
    assert set(ALL_COMMANDS) - UNCHECKED == set(BASE), "add the new command's smallest valid invocation to BASE"


def _declares_ranges(commands) -> None:
    for command in commands:
        hints = typing.get_type_hints(command.settings)
        for field in dataclasses.fields(command.settings):
            if _kind(hints[field.name]) in (int, float) and field.metadata.get("min") is None:
                assert (command.name, field.name) == ("lens", "position"), f"{command.name} --{field.name}: declare min"


def test_every_number_declares_its_range():
    """Each integer or number option declares ``min`` (a lower bound the catalogue tries past),
    or neither bound when the model decides (the catalogue then tries 10**12 and -10**12)."""
    _declares_ranges(COMMANDS.values())


@pytest.mark.xfail(strict=True, reason="issue 23's features commands declare no option checks yet")
def test_features_commands_declare_their_checks():
    _declares_ranges(ALL_COMMANDS[name] for name in sorted(UNCHECKED))


@pytest.mark.parametrize("command, flag, value", option_cases())
def test_bad_option_value(capsys, tmp_path, model_dir, command, flag, value):
    value = str(tmp_path) if value == "/tmp" else value
    refused(capsys, tmp_path, _argv(model_dir, command, flag, value), flag, value)


POSITIONAL_CASES = [
    (command, where, value)
    for command in sorted(BASE)
    for where, value in POSITIONAL
    if COMMANDS[command].model and (where == "MODEL" or command == "lens")
]


@pytest.mark.parametrize("command, where, value", POSITIONAL_CASES)
def test_bad_positional(capsys, tmp_path, model_dir, command, where, value):
    value = str(tmp_path) if value == "FOLDER" else value
    argv = _argv(model_dir, command, model=value) if where == "MODEL" else _argv(model_dir, command, text=value)
    refused(capsys, tmp_path, argv, where, value)


@pytest.mark.parametrize("command, extra, named", MODEL_CASES)
def test_value_out_of_the_model(capsys, tmp_path, model_dir, command, extra, named):
    refused(capsys, tmp_path, _argv(model_dir, command, *extra), named)


@pytest.mark.parametrize(
    "argv, named",
    [
        (["heads", "MODEL", "--bogus"], "--bogus"),
        (["heads", "MODEL", "a", "b"], "unexpected extra argument"),
        (["nosuchcommand"], "nosuchcommand"),
        (["lens", "MODEL", "hi", "there", "extra"], "expected [MODEL] TEXT"),
        (["locate", "MODEL"], "exactly one of --data"),
        (["circuit", "MODEL", "--task", "ioi"], "exactly one of --top"),
        (["quant", "MODEL", "--kv", "k9v2"], "between 1 and 8"),
        (["temporal", "MODEL", "--categories", "nonsense"], "nonsense"),
        (["lens", "MODEL", "hi", "--save", "x.safetensors"], "--save"),
    ],
)
def test_bad_usage(capsys, tmp_path, model_dir, argv, named):
    refused(capsys, tmp_path, [str(model_dir) if a == "MODEL" else a for a in argv], named)


# -- the hand-written commands -------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, named",
    [
        (["sites", "MODEL", "--pos", "-3"], "--pos"),
        (["sites", "MODEL", "--pos", "0"], "--pos"),
        (["sites", "MODEL", "--layer", "2"], "--layer 2"),
        (["sites", "MODEL", "--layer", "-1"], "--layer -1"),
        (["sites", "MODEL", "--device", "nonsense"], "nonsense"),
        (["sites", "MODEL", "--dtype", "float8"], "float8"),
        (["run", "MODEL", ""], "TEXT"),
        (["run", "MODEL", "   "], "TEXT"),
        (["run", "MODEL", "hi", "-c", "blocks.2.resid_post"], "layer 2"),
        (["run", "MODEL", "hi", "-c", "blocks.0.attn.z.4"], "head 4"),
        (["run", "MODEL", "hi", "-c", "nonsense"], "nonsense"),
        (["run", "MODEL", "hi", "--save", "FOLDER"], "--save"),
        (["run", "MODEL", "hi", "--save", "/dev/null"], "--save"),
    ],
)
def test_looking_commands(capsys, tmp_path, model_dir, argv, named):
    argv = [str(model_dir) if a == "MODEL" else str(tmp_path) if a == "FOLDER" else a for a in argv]
    code, printed, err = run_cli(capsys, *argv)
    text = (printed + err).strip()
    assert code == 2 and len(text.splitlines()) == 1 and text.startswith("error:") and named in text, text


# -- the crashes named in issue 22, a test each -----------------------------------------------------


def test_circuit_steps_zero(capsys, tmp_path, model_dir):
    line = refused(capsys, tmp_path, _argv(model_dir, "circuit", "--steps", "0"), "--steps")
    assert line == "error: --steps must be at least 1, not 0"


def test_empty_prompt_is_refused_before_the_model_runs(capsys, tmp_path, model_dir):
    assert "TEXT must not be empty" in refused(capsys, tmp_path, _argv(model_dir, "lens", text=""), "TEXT")
    code, _, err = run_cli(capsys, "run", str(model_dir), "", "-c", "blocks.0.resid_post")
    assert code == 2 and err.strip() == "error: TEXT must not be empty"
    import lmscope

    model = lmscope.load(str(model_dir))
    with pytest.raises(LmscopeError, match="no tokens"):
        model.run("", capture=["blocks.0.resid_post"])


def test_sites_positions_and_layers(capsys, model_dir):
    code, _, err = run_cli(capsys, "sites", str(model_dir), "--pos", "-3")
    assert code == 2 and "--pos" in err and "[1, -3" not in err
    code, printed, _ = run_cli(capsys, "sites", str(model_dir), "--pos", "3", "--layer", "1")
    assert code == 0 and "[1, 3, 32]" in printed and "blocks.0." not in printed


@pytest.mark.parametrize("opposite", [True, False])
def test_steer_without_instruction_writes_its_report(capsys, tmp_path, model_dir, opposite):
    """The prompting baseline is optional: without --instruction (and with eval items lacking
    ``opposite``) the run completes, report.html included, and says nothing of prompting."""
    eval_file = EVAL
    if not opposite:
        eval_file = tmp_path / "eval.jsonl"
        eval_file.write_text('{"prompt": "The film was", "target": " great"}\n{"prompt": "The cake was", "target": " good"}\n')
    out = tmp_path / "out"
    code, printed, err = run_cli(
        capsys, "steer", str(model_dir), "--pairs", str(PAIRS), "--eval", str(eval_file), "--layers", "1",
        "--coeffs", "1", "--windows", "0", "--samples", "1", "--max-kl", "100", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert "Chosen: L1 x1" in printed and "prompting" not in printed.split("Chosen:")[1]
    results = read_results(out)
    assert results["status"] == "complete" and "prompting" not in [r["setting"] for r in results["parts"]["steer"]["rows"]]
    assert (out / "report.html").stat().st_size > 1000 and (out / "steering_sweep.png").is_file()


# -- what the entry point does with what is not bad input --------------------------------------------


def test_internal_error_is_one_line_exit_1_and_debug_shows_it(capsys, tmp_path, model_dir, monkeypatch):
    from lmscope.circuits import commands

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(commands, "head_roles", boom)
    out = tmp_path / "out"
    before = _earlier_run(out)
    code, printed, err = run_cli(capsys, "heads", str(model_dir), "--out", str(out), "--overwrite")
    assert code == 1 and not printed.strip()
    assert err.strip() == (
        "error: internal error: RuntimeError: boom second line; rerun with --debug for the traceback"
    )
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["heads", str(model_dir), "--out", str(out), "--overwrite", "--debug"])
    assert _files(out) == before  # nothing was written before the part failed


def test_interrupt_is_one_line_exit_130_and_keeps_finished_parts(capsys, tmp_path, model_dir, monkeypatch):
    from lmscope.steering import commands

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "sweep", interrupt)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "steer", str(model_dir), "--pairs", str(PAIRS), "--eval", str(EVAL), "--layers",
                           "1", "--coeffs", "1", "--windows", "0", "--out", str(out))  # fmt: skip
    assert code == 130 and err.strip().startswith("error: interrupted") and len(err.strip().splitlines()) == 1
    assert list(read_results(out)["parts"]) == ["vectors"]  # the finished part stays
    assert not [p for p in out.rglob("*.tmp")]


def test_help_and_exit_codes_pass_through(capsys):
    code, printed, _ = run_cli(capsys, "heads", "--help")
    assert code == 0 and "--length" in printed


def test_settings_built_in_python_are_checked(tmp_path):
    from lmscope.circuits.commands import CircuitSettings
    from lmscope.reports.command import RunWriter

    with pytest.raises(LmscopeError, match="^--steps must be at least 1, not 0$"):
        RunWriter(tmp_path / "out", "circuit", CircuitSettings(task="ioi", top=5, steps=0))
    with pytest.raises(LmscopeError, match="--threshold must be a finite number, not nan"):
        RunWriter(tmp_path / "out", "circuit", CircuitSettings(task="ioi", threshold=math.nan))
    assert not (tmp_path / "out").exists()


# -- files are written whole or not at all -----------------------------------------------------------


def test_atomic_writes_use_their_own_temporary_file(tmp_path):
    from lmscope.core.files import atomic

    path = tmp_path / "results.json"
    with atomic(path) as first, atomic(path) as second:  # two writers of the same file at once
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("first")
        second.write_text("second")
    assert path.read_text() == "first"  # each writer's file renamed whole: the last to finish (first) wins
    with pytest.raises(KeyboardInterrupt), atomic(path) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    fifo = tmp_path / "fifo"  # a device such as /dev/null is never replaced by a file
    os.mkfifo(fifo)
    with pytest.raises(LmscopeError, match="not a regular file"), atomic(fifo):
        pass
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "results.json"]


def test_a_figure_that_fails_to_draw_leaves_the_earlier_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure as MplFigure

    from lmscope.reports.figures import Figure

    figure = Figure("f", "lines", "t", "x", "y", x=[1, 2], series={"a": [1.0, 2.0]})
    png = figure.png(tmp_path)
    earlier = png.read_bytes()

    def half(self, target, **kwargs):
        Path(target).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MplFigure, "savefig", half)
    with pytest.raises(LmscopeError, match="cannot write .*f.png: No space left on device"):
        figure.png(tmp_path)
    assert png.read_bytes() == earlier and [p.name for p in tmp_path.iterdir()] == ["f.png"]

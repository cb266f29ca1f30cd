"""Commands: one settings dataclass and one function make a command (its CLI generated), and the
one writer resumes an interrupted run, refuses other settings and writes strict JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from lmscope.cli import app, register
from lmscope.core.errors import LmscopeError
from lmscope.reports.command import Command, RunWriter, argument, option
from lmscope.reports.results import Result, Table
from tests.helpers import read_results


@dataclass
class Numbers(Result):
    values: list[float]

    def tables(self) -> list[Table]:
        return [Table("numbers", [{"i": i, "value": v} for i, v in enumerate(self.values)])]


@dataclass(frozen=True)
class CountSettings:
    """A made-up command: ``parts`` parts, each the squares of ``n`` numbers."""

    n: int = option(3, "numbers per part")
    parts: int = option(2, "how many parts")


CALLS: list[str] = []


def run_count(model, settings: CountSettings, out: RunWriter) -> Numbers:
    """Count squares, part by part."""
    result = None
    for p in range(settings.parts):

        def compute(p=p) -> Numbers:
            CALLS.append(f"p{p}")
            if f"fail p{p}" in CALLS:
                raise KeyboardInterrupt
            return Numbers([float((p + i) ** 2) for i in range(settings.n)] + [float("nan")])

        result = out.part(f"p{p}", f"part {p}", "squares", compute)
    return result


def test_a_part_is_read_back_by_a_rerun_with_the_same_settings(tmp_path):
    CALLS.clear()
    CALLS.append("fail p1")
    settings = CountSettings(n=2, parts=3)
    with pytest.raises(KeyboardInterrupt):
        run_count(None, settings, RunWriter(tmp_path, "count", settings))
    first = read_results(tmp_path)  # strict JSON: the NaN is written as null
    assert list(first["parts"]) == ["p0"] and first["status"] == "running"
    assert first["parts"]["p0"]["values"] == [0.0, 1.0, None]
    assert first["settings"] == {"n": 2, "parts": 3}
    assert set(first) >= {"command", "settings", "versions", "processes", "timings", "parts"}

    CALLS.clear()
    writer = RunWriter(tmp_path, "count", settings)
    result = run_count(None, settings, writer)
    writer.finish()
    assert CALLS == ["p1", "p2"]  # p0 read back
    done = read_results(tmp_path)
    assert done["resumed"] == ["p0"] and list(done["parts"]) == ["p0", "p1", "p2"] and done["status"] == "complete"
    assert result.values[:2] == [4.0, 9.0]
    assert "complete; lmscope" in (tmp_path / "report.html").read_text()


def test_other_settings_into_the_same_folder_are_refused(tmp_path):
    RunWriter(tmp_path, "count", CountSettings()).part("p0", "p", "d", lambda: Numbers([1.0]))
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(LmscopeError, match=r"other settings \(n: 3 -> 4\); choose another --out or pass --overwrite"):
        RunWriter(tmp_path, "count", CountSettings(n=4)).part("p0", "p", "d", lambda: Numbers([2.0]))
    with pytest.raises(LmscopeError, match="results of another run \\(lmscope count\\)"):
        RunWriter(tmp_path, "other", CountSettings()).part("p0", "p", "d", lambda: Numbers([2.0]))
    assert (tmp_path / "results.json").read_text() == before  # nothing lost
    RunWriter(tmp_path, "count", CountSettings(n=4), overwrite=True).part("p0", "p", "d", lambda: Numbers([2.0]))
    assert read_results(tmp_path)["parts"]["p0"]["values"] == [2.0]


@dataclass(frozen=True)
class NormSettings:
    """A hypothetical new command: the norm of one residual stream over a text."""

    text: str = argument(help="the text")
    layer: int = option(0, "which layer's resid_post")


@dataclass
class Norm(Result):
    norm: float

    def text(self) -> str:
        return f"norm {self.norm:.6f}"


def run_norm(model, settings: NormSettings, out: RunWriter) -> Norm:
    """Norm of one layer's residual stream over TEXT."""
    site = f"blocks.{settings.layer}.resid_post"
    model.site(site)
    compute = lambda: Norm(float(model.run(settings.text, capture=[site]).cache[site].double().norm()))
    return out.part("norm", "Residual norm", "Frobenius norm over the text.", compute)


def test_a_new_command_is_a_settings_class_and_a_function(tmp_path, smollm2):
    """Registered at run time, the command has generated options with their help, loads the
    model, writes results.json in the common layout, resumes, and refuses bad input in one line."""
    register(Command("norm", NormSettings, run_norm))
    runner = CliRunner()
    try:
        shown = runner.invoke(app, ["norm", "--help"], terminal_width=200)
        assert "which layer's resid_post" in shown.output and "--dtype" in shown.output
        out = tmp_path / "norm"
        done = runner.invoke(app, ["norm", "The capital of France is", "--layer", "3", "--out", str(out)])
        assert done.exit_code == 0, done.output
        expected = smollm2.run("The capital of France is", capture=["blocks.3.resid_post"]).cache
        expected = float(expected["blocks.3.resid_post"].double().norm())
        results = read_results(out)
        assert results["command"] == "norm" and results["settings"]["layer"] == 3
        assert results["settings"]["model"] == "smollm2-135m" and results["settings"]["dtype"] == "float32"
        assert results["parts"]["norm"]["norm"] == pytest.approx(expected, rel=1e-9)
        assert f"norm {expected:.6f}" in done.output
        again = runner.invoke(app, ["norm", "The capital of France is", "--layer", "3", "--out", str(out)])
        assert again.exit_code == 0 and read_results(out)["resumed"] == ["norm"]
        bad = runner.invoke(app, ["norm", "hi", "--layer", "99", "--out", str(tmp_path / "bad")])
        assert isinstance(bad.exception, LmscopeError) and "layer 99 out of range" in str(bad.exception)
    finally:
        app.registered_commands[:] = [c for c in app.registered_commands if c.name != "norm"]


def test_every_command_records_every_setting():
    """Each command's settings are a frozen dataclass whose every field has help text."""
    from dataclasses import fields

    from lmscope.cli import commands

    names = [c.name for c in commands()]
    expected = ["verify", "scan", "temporal", "locate", "circuit", "heads", "outliers", "kv", "quant", "experts",
                "lens", "probe", "steer", "das", "pretrain", "features train", "features eval", "features snmf",
                "features show"]  # fmt: skip
    assert names == expected
    for command in commands():
        for f in fields(command.settings):
            assert f.metadata.get("help"), f"{command.name}: --{f.name} has no help"
        assert json.dumps(command.summary) and command.summary


def test_a_preset_flag_starts_from_its_settings_and_given_options_override_it(tmp_path):
    """``--small`` starts from the preset; an option given on the command line replaces its value,
    options left at their defaults do not."""
    small = CountSettings(n=1, parts=1)
    register(Command("count", CountSettings, run_count, model=False, presets={"small": (small, "a small run")}))
    runner = CliRunner()
    try:
        CALLS.clear()
        done = runner.invoke(app, ["count", "--small", "--out", str(tmp_path / "a")])
        assert done.exit_code == 0, done.output
        assert read_results(tmp_path / "a")["settings"] == {"n": 1, "parts": 1}
        done = runner.invoke(app, ["count", "--small", "--parts", "2", "--out", str(tmp_path / "b")])
        assert done.exit_code == 0, done.output
        assert read_results(tmp_path / "b")["settings"] == {"n": 1, "parts": 2}
        done = runner.invoke(app, ["count", "--out", str(tmp_path / "c")])
        assert read_results(tmp_path / "c")["settings"] == {"n": 3, "parts": 2}
    finally:
        app.registered_commands[:] = [c for c in app.registered_commands if c.name != "count"]


def test_a_two_word_name_is_a_sub_command_of_its_group(tmp_path, monkeypatch):
    """``Command("group count", ...)`` is ``lmscope group count``, its default --out
    ``out/group/count``; a second command joins the same group."""
    from lmscope import cli

    monkeypatch.chdir(tmp_path)
    register(Command("group count", CountSettings, run_count, model=False))
    register(Command("group again", CountSettings, run_count, model=False))
    try:
        runner = CliRunner()
        done = runner.invoke(app, ["group", "count", "--n", "2"])
        assert done.exit_code == 0, done.output
        assert read_results(tmp_path / "out" / "group" / "count")["settings"] == {"n": 2, "parts": 2}
        listing = runner.invoke(app, ["group", "--help"])
        assert "count" in listing.output and "again" in listing.output
    finally:
        app.registered_groups[:] = [g for g in app.registered_groups if g.name != "group"]
        cli._GROUPS.pop("group", None)

"""`lmscope scan`: the quick scan of SmolLM2 end to end, its report in real headless Chromium,
partial results after an interruption, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from lmscope.cli import main
from lmscope.core.errors import LmscopeError
from lmscope.reports.html import format_value
from lmscope.scan import PARTS as SCAN_PARTS
from lmscope.scan import QUICK, ScanSettings, scan
from tests.browser import HOVER_JS, PLOT_BOXES_JS, artifacts_dir, open_report
from tests.helpers import read_results, run_cli

PARTS = ["verify", "model", "outliers", "kv", "heads", "circuit"]
TINY = ScanSettings(
    stats_tokens=256, kv_tokens=256, ppl_tokens=256, window=128, kv_configs=("fp", "k4v2"), head_batch=2, ioi_pairs=2
)


@pytest.fixture(scope="module")
def quick_scan(tmp_path_factory):
    """`lmscope scan --quick` on the default model, as the README's main job runs it."""
    out = tmp_path_factory.mktemp("scan")
    with pytest.raises(SystemExit) as info:
        main(["scan", "--quick", "--out", str(out)])
        raise SystemExit(0)
    assert info.value.code == 0
    return out


@pytest.mark.slow
def test_quick_scan_writes_every_part(quick_scan, smollm2):
    """results.json holds every part with numbers checked against independent facts of SmolLM2."""
    payload = read_results(quick_scan)
    assert list(payload["parts"]) == PARTS and set(payload["timings"]) == set(PARTS)
    assert payload["settings"]["stats_tokens"] == QUICK.stats_tokens and payload["status"] == "complete"
    parts = payload["parts"]
    assert parts["verify"]["passed"] and parts["verify"]["counts"] == {"pass": 12, "fail": 0, "n/a": 2}
    assert parts["model"]["layers"] == 30 and parts["model"]["kv_heads"] == 3
    assert 507 in {row["channel"] for row in parts["outliers"]["massive"]}  # SmolLM2's massive channel
    ppl = {row["config"]: row["perplexity"] for row in parts["kv"]["quant"]}
    assert list(ppl) == ["fp", "K8V8", "K4V4", "K4V2", "K2V4", "K2V2"]
    assert abs(ppl["K8V8"] / ppl["fp"] - 1) < 0.01 and ppl["K2V2"] > ppl["K4V4"] > ppl["fp"]
    assert ppl["K4V2"] < ppl["K2V4"]  # keys need more bits than values (KV-AdaQuant)
    induction = parts["heads"]["scores"]["induction"]
    assert len(induction) == 30 and len(induction[0]) == 9
    scores = parts["circuit"]["scores"]
    top = parts["circuit"]["top"][0]
    assert scores[top["layer"]][top["head"]] == pytest.approx(top["score"])
    html = (quick_scan / "report.html").read_text()
    headings = [
        html.index(f"<h2>{title}</h2>") for title in ("Correctness certificate", "Model", "Activation outliers")
    ]
    assert headings == sorted(headings)  # the certificate comes first
    for name in ("kurtosis", "max_abs", "max_abs_channels", "kv_norms", "quant_perplexity", "circuit_ioi_heads"):
        assert (quick_scan / f"{name}.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.browser
def test_quick_scan_report_in_chromium(quick_scan):
    """The report renders every plot without console errors, hovering a patching cell shows its
    value from results.json, nothing scrolls sideways; a screenshot is saved as an artifact."""
    payload = read_results(quick_scan)
    html = (quick_scan / "report.html").read_text()
    assert "<script src=" not in html and "<link href=" not in html  # self-contained
    n_plots = html.count('class="plot"')
    assert n_plots == 3 + 3 + 3 + 1  # outliers, keys/values (2 norms + quantisation), heads, circuit
    with open_report(quick_scan / "report.html") as (page, errors):
        assert page.evaluate("document.body.dataset.plotsRendered") == str(n_plots), errors
        assert page.evaluate("document.body.dataset.plotErrors") in (None, "0")
        boxes = page.evaluate(PLOT_BOXES_JS)
        assert len(boxes) == n_plots
        for box in boxes:
            assert box["width"] > 100 and box["height"] > 100 and box["drawn"] > 0, box
        circuit = next(b["id"] for b in boxes if b["title"].startswith("IOI"))
        top = payload["parts"]["circuit"]["top"][0]
        hover = page.evaluate(HOVER_JS, [circuit, top["head"], top["layer"]])
        assert format_value(top["score"]) in hover, hover
        assert f"layer {top['layer']}" in hover and f"head {top['head']}" in hover
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.screenshot(path=str(artifacts_dir() / "scan_report.png"), full_page=True)
        assert errors == []


def test_interrupted_scan_keeps_finished_parts_and_resumes(tmp_path, smollm2):
    """An interruption in the circuit part leaves the four finished parts in results.json and a
    (partial) report (the certificate is left out to save time); rerun with the same settings,
    the scan reads them back (none runs again) and runs the circuit part only, giving the numbers
    of an uninterrupted scan."""
    calls = []

    def counted(part):
        return replace(part, run=lambda model, settings: calls.append(part.name) or part.run(model, settings))

    def interrupted(model, settings):
        raise KeyboardInterrupt

    assert [part.name for part in SCAN_PARTS] == PARTS
    parts = [counted(part) for part in SCAN_PARTS[1:6]]
    with pytest.raises(KeyboardInterrupt):
        scan(smollm2, tmp_path, TINY, parts=[*parts[:4], replace(SCAN_PARTS[5], run=interrupted)])
    payload = read_results(tmp_path)
    assert list(payload["parts"]) == PARTS[1:5] and payload["status"] == "running"
    assert all(math.isfinite(row["perplexity"]) for row in payload["parts"]["kv"]["quant"])
    assert "partial: 4 parts finished" in (tmp_path / "report.html").read_text()

    calls.clear()
    scan(smollm2, tmp_path, TINY, parts=parts)
    assert calls == ["circuit"]  # the four finished parts were read back
    resumed = read_results(tmp_path)
    assert list(resumed["parts"]) == PARTS[1:6] and resumed["status"] == "complete"
    assert resumed["parts"]["kv"] == payload["parts"]["kv"]
    fresh = scan(smollm2, tmp_path / "fresh", TINY, parts=parts)
    assert resumed["parts"]["circuit"] == read_results(tmp_path / "fresh")["parts"]["circuit"]
    assert fresh.results["heads"].to_json() == resumed["parts"]["heads"]

    with pytest.raises(LmscopeError, match="other settings .*ioi_pairs: 2 -> 3"):
        scan(smollm2, tmp_path, replace(TINY, ioi_pairs=3), parts=parts)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["scan", "no-such-model"], "not in the local Hugging Face cache"),
        (["scan", "/no/such/model.gguf"], "no such model file"),
    ],
)
def test_scan_bad_model_one_line_exit_2(capsys, tmp_path, argv, message):
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "out"))
    assert code == 2 and message in err and err.strip().count("\n") == 0 and "Traceback" not in err


def test_scan_corrupt_model_file(capsys, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00 not really a model")
    code, _, err = run_cli(capsys, "scan", str(bad), "--out", str(tmp_path / "out"))
    assert code == 2 and err.startswith("error:") and err.strip().count("\n") == 0


def test_scan_unwritable_output(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "scan", "--out", str(blocker / "sub"))
    assert code == 2 and "cannot create output directory" in err

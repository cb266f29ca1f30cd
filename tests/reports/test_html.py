"""The self-contained HTML report: static checks, and a real headless-Chromium render."""

from __future__ import annotations

import json
import math
import re

import pytest

from lmscope.reports.html import Report, bars, heatmap, lines, plotly_js
from tests.browser import HOVER_JS, PLOT_BOXES_JS, artifacts_dir, open_report, require_chromium

KNOWN = 0.777  # z[2][3] of the test heatmap


def _z() -> list[list[float]]:
    z = [[round(0.01 * (10 * layer + head), 3) for head in range(6)] for layer in range(4)]
    z[2][3] = KNOWN
    z[0][5] = math.nan
    return z


def _report() -> Report:
    report = Report("Test report", subtitle="heatmap, lines, bars & a <table>")
    report.section("Heads", "Which heads matter.")
    report.figure(heatmap(_z(), title="Head scores", xlabel="head", ylabel="layer", zmid=0.0), caption="scores")
    report.section("Curves")
    report.figure(
        lines(
            [0, 1, 2, 3],
            {"clean": [1.0, 0.5, 0.25, 0.1], "patched": [1.0, math.nan, 0.3, 0.2]},
            title="Loss",
            xlabel="step",
            ylabel="loss",
            log_y=True,
        )
    )
    report.figure(bars(["a", "b", "c"], {"x": [1, 2, 3], "y": [2.5, 1.5, 0.5]}, title="Bars", xlabel="cat", ylabel="n"))
    report.section("Numbers")
    report.table(
        [{"name": "<b>bold</b>", "score": 0.123456789, "n": 12}, {"name": "plain", "score": math.nan}],
        caption="a table",
    )
    return report


def _embedded(page: str) -> dict[str, dict]:
    found = re.findall(r'<script type="application/json" id="(plot-\d+)-data">(.*?)</script>', page, re.DOTALL)
    return {plot_id: json.loads(text) for plot_id, text in found}


# --- fast checks ------------------------------------------------------------------------------


def test_no_external_resources_and_plotly_inline():
    page = _report().render()
    assert plotly_js() in page  # the bundled plotly.js, inline
    own = page.replace(plotly_js(), "")  # plotly.js itself holds URL strings (its modebar link), not loaded
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.IGNORECASE)
    assert not re.search(r"<link[^>]*\bhref\s*=", page, re.IGNORECASE)
    assert not re.search(r"https?://", own, re.IGNORECASE)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*//""", own, re.IGNORECASE)
    assert page.count('class="plot"') == 3
    assert "plotsRendered" in page


def test_embedded_json_parses_and_nan_is_null():
    page = _report().render()
    figures = _embedded(page)
    assert sorted(figures) == ["plot-1", "plot-2", "plot-3"]
    trace = figures["plot-1"]["data"][0]
    assert trace["z"][0][5] is None
    assert trace["z"][2][3] == KNOWN
    assert trace["text"][2][3] == "0.777"
    assert "layer %{y}, head %{x}" in trace["hovertemplate"]
    assert figures["plot-2"]["data"][1]["y"][1] is None
    assert figures["plot-2"]["layout"]["yaxis"]["type"] == "log"
    assert "NaN" not in re.sub(r'"NaN"', "", "".join(re.findall(r'-data">(.*?)</script>', page, re.DOTALL)))


def test_json_escapes_script_close():
    report = Report("t")
    report.figure(lines([0], {"</script><script>alert(1)</script>": [1.0]}, title="</script>", xlabel="x", ylabel="y"))
    page = report.render()
    figures = _embedded(page)
    assert "</script><script>alert" not in page
    assert figures["plot-1"]["data"][0]["name"].startswith("&lt;/script&gt;")


def test_table_escapes_and_formats():
    page = _report().render()
    assert "<b>bold</b>" not in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    assert '<td class="num">0.1235</td>' in page
    assert '<td class="num">12</td>' in page
    assert '<div class="table-wrap">' in page
    assert 'href="#sec-3-numbers"' in page and 'id="sec-3-numbers"' in page


def test_write_is_atomic(tmp_path):
    path = _report().write(tmp_path / "sub" / "report.html")
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]


def test_heatmap_validates_shape():
    with pytest.raises(ValueError):
        heatmap([[1, 2], [3]], title="t", xlabel="x", ylabel="y")
    with pytest.raises(ValueError):
        heatmap([[1, 2]], x=["a"], title="t", xlabel="x", ylabel="y")


# --- real browser -----------------------------------------------------------------------------


def test_missing_chromium_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require_chromium(tmp_path / "no-chromium")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_chromium(tmp_path / "no-chromium")


@pytest.mark.browser
def test_report_renders_in_chromium(tmp_path):
    path = _report().write(tmp_path / "report.html")
    with open_report(path, timeout_ms=30_000) as (page, errors):
        assert page.evaluate("document.body.dataset.plotsRendered") == "3", errors
        assert errors == []
        boxes = page.evaluate(PLOT_BOXES_JS)
        assert len(boxes) == 3
        for box in boxes:
            assert box["width"] > 0 and box["height"] > 0 and box["drawn"] > 0, box
        assert page.locator("#plot-1 g.hm image").count() == 1  # the heatmap layer is drawn
        assert page.locator("#plot-2 .scatterlayer .trace").count() == 2
        assert page.locator("#plot-3 .barlayer .point").count() == 6

        hover = page.evaluate(HOVER_JS, ["plot-1", 3, 2])
        assert "0.777" in hover and "layer 2" in hover and "head 3" in hover, hover

        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.screenshot(path=str(artifacts_dir() / "report_screenshot_test.png"), full_page=True)
        assert errors == []

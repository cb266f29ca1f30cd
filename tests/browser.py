"""Headless Chromium for report tests: Playwright driving Debian's /usr/bin/chromium.

A missing Chromium or Playwright fails the test under CI (``CI`` set) and skips it elsewhere.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
REPO_ROOT = Path(__file__).resolve().parents[1]

HOVER_JS = """
([id, x, y]) => {
  const div = document.getElementById(id);
  Plotly.Fx.hover(div, {xval: x, yval: y});
  return div.querySelector('.hoverlayer').textContent;
}
"""

PLOT_BOXES_JS = """() => Array.from(document.querySelectorAll('.plot')).map(div => {
  const svg = div.querySelector('svg.main-svg');
  const r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  const drawn = div.querySelectorAll('g.hm image, .scatterlayer .trace path.js-line, .barlayer .point').length;
  return {id: div.id, title: div.dataset.title, width: r.width, height: r.height, drawn: drawn};
})"""


def require_chromium(chromium: Path = CHROMIUM) -> None:
    if chromium.exists():
        return
    reason = f"{chromium} is missing (run `make browser`: apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def artifacts_dir() -> Path:
    path = REPO_ROOT / os.environ.get("LMSCOPE_ARTIFACTS", "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def open_report(path: Path, timeout_ms: int = 60_000) -> Iterator[tuple[object, list[str]]]:
    """Open ``path`` in headless Chromium (1280 x 900) and wait until every plot has settled;
    yields ``(page, errors)`` with the console errors and page errors seen so far."""
    require_chromium()
    if os.environ.get("CI"):
        from playwright import sync_api  # in CI a missing Playwright is a failure, not a skip
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            page.goto(path.as_uri())
            page.wait_for_function("document.body.dataset.plotsRendered !== undefined", timeout=timeout_ms)
            yield page, errors
        finally:
            browser.close()

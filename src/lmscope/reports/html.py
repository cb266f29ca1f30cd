"""Self-contained interactive HTML reports: one file, Plotly charts, no network at view time.

plotly.js is inlined from the ``plotly`` package's bundled ``plotly.min.js``; figures are plain
``{"data": [...], "layout": {...}}`` dicts built here by hand (plotly's Python figure API is not
imported). The written file opens from disk offline.

In a browser, ``document.body.dataset.plotsRendered`` is set to the number of plots drawn once
every plot has settled (``plotErrors`` to the number that failed; each failure is also logged
with ``console.error``), so a test can wait for it.
"""

from __future__ import annotations

import html
import importlib.util
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmscope.core import distributed
from lmscope.core.files import atomic

__all__ = ["Report", "bars", "heatmap", "lines", "plotly_js", "table_html"]

_PLOT_CONFIG = {"responsive": True, "displaylogo": False}
_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"


# --- helpers --------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def plotly_js() -> str:
    """The source of the ``plotly`` package's bundled ``plotly.min.js`` (without importing plotly)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'plotly' package is needed for HTML reports: pip install plotly")
    for location in spec.submodule_search_locations:
        path = Path(location) / "package_data" / "plotly.min.js"
        if path.is_file():
            # Inside a <script> element, "</script" would end it early; plotly.min.js has none today.
            return path.read_text(encoding="utf-8").replace("</script", "<\\/script")
    raise RuntimeError("plotly is installed but its package_data/plotly.min.js was not found")


def _plain(value: Any) -> Any:
    """JSON-ready copy of ``value``: arrays/tensors to lists, numpy scalars to Python, NaN/inf to None."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy array/scalar, torch tensor
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, range)):
        return [_plain(item) for item in value]
    raise TypeError(f"cannot put {type(value).__name__} into a report figure")


def _json(value: Any) -> str:
    """JSON for embedding in HTML: strict (NaN becomes null) and with ``</`` escaped as ``<\\/``."""
    text = json.dumps(_plain(value), allow_nan=False, separators=(",", ":"))
    return text.replace("</", "<\\/")


def format_value(value: Any) -> str:
    """Compact text for a number (4 significant digits for floats); other values as ``str``."""
    if value is None:
        return ""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "NaN"
    return f"{value:.4g}"


def _label(text: str) -> str:
    """Text safe for Plotly's pseudo-HTML labels (hover, titles)."""
    return html.escape(str(text), quote=False).replace("%{", "%&#123;")


def _axis(title: str, **extra: Any) -> dict:
    return {"title": {"text": _label(title)}, "automargin": True, **extra}


def _layout(title: str, xlabel: str, ylabel: str, **extra: Any) -> dict:
    return {
        "title": {"text": _label(title), "x": 0.02, "xanchor": "left"},
        "xaxis": _axis(xlabel),
        "yaxis": _axis(ylabel),
        "margin": {"l": 60, "r": 30, "t": 50, "b": 50},
        "font": {"family": _FONT, "size": 13},
        "autosize": True,
        **extra,
    }


def _rows(z: Any) -> list[list[Any]]:
    rows = _plain(z)
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise ValueError("heatmap z must be 2-D (a list of rows)")
    if len({len(row) for row in rows}) > 1:
        raise ValueError("heatmap z rows must all have the same length")
    return rows


# --- figures --------------------------------------------------------------------------------


def heatmap(
    z: Any,
    *,
    x: Sequence[Any] | None = None,
    y: Sequence[Any] | None = None,
    title: str,
    xlabel: str,
    ylabel: str,
    colorscale: str | list = "Viridis",
    zmid: float | None = None,
    hover_label: str = "value",
    log_color: bool = False,
) -> dict:
    """Heatmap figure of a 2-D ``z`` (rows along y, row 0 at the top).

    Hovering a cell shows e.g. ``layer 3, head 5`` and ``value: 0.123``; each cell's formatted
    value is also in the trace's ``text``. NaN cells are gaps (null in the JSON). With
    ``log_color`` the colours follow log10 of the value (non-positive values become gaps) while
    the hover text keeps the raw value.
    """
    rows = _rows(z)
    n_cols = len(rows[0]) if rows else 0
    x_values = _plain(list(x)) if x is not None else list(range(n_cols))
    y_values = _plain(list(y)) if y is not None else list(range(len(rows)))
    if len(x_values) != n_cols or len(y_values) != len(rows):
        raise ValueError(f"heatmap labels ({len(y_values)} y, {len(x_values)} x) do not match z {len(rows)}x{n_cols}")
    text = [[format_value(value) if value is not None else "NaN" for value in row] for row in rows]
    colorbar: dict[str, Any] = {"title": {"text": _label(hover_label)}}
    if log_color:
        shown = [[math.log10(v) if v is not None and v > 0 else None for v in row] for row in rows]
        finite = [v for row in shown for v in row if v is not None]
        if finite:
            ticks = list(range(math.floor(min(finite)), math.ceil(max(finite)) + 1))
            colorbar.update(tickvals=ticks, ticktext=[f"1e{t}" for t in ticks])
            colorbar["title"] = {"text": _label(f"{hover_label} (log)")}
    else:
        shown = rows
    trace: dict[str, Any] = {
        "type": "heatmap",
        "z": shown,
        "x": x_values,
        "y": y_values,
        "text": text,
        "hovertemplate": f"{_label(ylabel)} %{{y}}, {_label(xlabel)} %{{x}}<br>{_label(hover_label)}: %{{text}}"
        "<extra></extra>",
        "colorscale": colorscale,
        "colorbar": colorbar,
        "hoverongaps": False,
    }
    if zmid is not None and not log_color:
        trace["zmid"] = zmid
    height = max(320, min(900, 130 + 22 * len(rows)))
    layout = _layout(title, xlabel, ylabel, height=height, hovermode="closest")
    for axis in ("xaxis", "yaxis"):
        layout[axis].update(showgrid=False, zeroline=False)
    layout["yaxis"]["autorange"] = "reversed"
    return {"data": [trace], "layout": layout}


def _series(series: Mapping[str, Sequence[float]], n: int) -> list[tuple[str, list]]:
    """``(name, JSON-ready values)`` of each series, checked to have ``n`` values."""
    out = []
    for name, values in series.items():
        values = _plain(list(values))
        if len(values) != n:
            raise ValueError(f"series {name!r} has {len(values)} values for {n} x values")
        out.append((name, values))
    return out


def lines(
    x: Sequence[Any],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
) -> dict:
    """Line chart: one line per ``series`` entry over the shared ``x``; NaN values are gaps."""
    x_values = _plain(list(x))
    markers = len(x_values) <= 60
    mode = "lines+markers" if markers else "lines"
    data = [
        {"type": "scatter", "mode": mode, "name": _label(name), "x": x_values, "y": values}
        for name, values in _series(series, len(x_values))
    ]
    layout = _layout(title, xlabel, ylabel, height=420, hovermode="x unified", showlegend=len(data) > 1)
    if log_y:
        layout["yaxis"]["type"] = "log"
    return {"data": data, "layout": layout}


def bars(
    categories: Sequence[Any],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
) -> dict:
    """Grouped bar chart: one bar per category for each ``series`` entry."""
    cats = [str(c) for c in categories]
    data = [
        {"type": "bar", "name": _label(name), "x": cats, "y": values} for name, values in _series(series, len(cats))
    ]
    layout = _layout(title, xlabel, ylabel, height=420, barmode="group", hovermode="closest", showlegend=len(data) > 1)
    layout["xaxis"]["type"] = "category"
    if log_y:
        layout["yaxis"]["type"] = "log"
    return {"data": data, "layout": layout}


# --- the report -----------------------------------------------------------------------------

_CSS = """
*, *::before, *::after { box-sizing: border-box; }
body { margin: 0; font-family: FONT; color: #1f2328; background: #fff; line-height: 1.5; }
.container { max-width: 1100px; margin: 0 auto; padding: 1.5rem 1.25rem 4rem; }
header h1 { margin: 0 0 .25rem; font-size: 1.8rem; }
header .subtitle { margin: 0; color: #57606a; }
nav.toc { margin: 1.25rem 0 2rem; padding: .75rem 1rem; background: #f6f8fa; border-radius: 6px; }
nav.toc h2 { margin: 0 0 .4rem; font-size: 1rem; }
nav.toc ol { margin: 0; padding-left: 1.4rem; }
section { margin-top: 2.5rem; }
section h2 { font-size: 1.35rem; border-bottom: 1px solid #d0d7de; padding-bottom: .25rem; }
p { max-width: 80ch; overflow-wrap: anywhere; }
figure { margin: 1.25rem 0; min-width: 0; }
figcaption, .table-wrap caption { color: #57606a; font-size: .9rem; }
figcaption { margin-top: .35rem; }
.plot { width: 100%; min-height: 320px; }
.table-wrap { overflow-x: auto; max-width: 100%; margin: 1.25rem 0; }
table { border-collapse: collapse; font-size: .9rem; }
caption { caption-side: top; text-align: left; padding-bottom: .35rem; }
th, td { padding: .3rem .7rem; border-bottom: 1px solid #d0d7de; text-align: left; vertical-align: top; }
th { background: #f6f8fa; white-space: nowrap; }
td { max-width: 32rem; overflow-wrap: anywhere; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
""".replace("FONT", _FONT)

_DRIVER = """
(function () {
  var divs = Array.prototype.slice.call(document.querySelectorAll("div.plot"));
  var ok = 0, failed = 0;
  function fail(div, err) {
    failed += 1;
    console.error("lmscope report: plot " + div.id + " failed:", err && err.stack ? err.stack : err);
  }
  var jobs = divs.map(function (div) {
    try {
      if (typeof Plotly === "undefined") { throw new Error("plotly.js did not load"); }
      var fig = JSON.parse(document.getElementById(div.id + "-data").textContent);
      return Promise.resolve(Plotly.newPlot(div, fig.data, fig.layout, CONFIG))
        .then(function () { ok += 1; }, function (err) { fail(div, err); });
    } catch (err) {
      fail(div, err);
      return Promise.resolve();
    }
  });
  Promise.all(jobs).then(function () {
    document.body.dataset.plotErrors = String(failed);
    document.body.dataset.plotsRendered = String(ok);
  });
})();
"""


def _slug(text: str, index: int) -> str:
    chars = [c.lower() if c.isalnum() else "-" for c in text]
    slug = "-".join(part for part in "".join(chars).split("-") if part)[:40]
    return f"sec-{index}-{slug}" if slug else f"sec-{index}"


def _is_number(value: Any) -> bool:
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            return False
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def table_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, caption: str = "") -> str:
    """An HTML table of ``rows`` (numbers formatted by :func:`format_value`, right-aligned);
    ``columns`` defaults to every key in order of first appearance."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    parts = ['<div class="table-wrap"><table>']
    if caption:
        parts.append(f"<caption>{html.escape(caption)}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns) + "</tr></thead>")
    parts.append("<tbody>")
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            css = ' class="num"' if _is_number(value) else ""
            cells.append(f"<td{css}>{html.escape(format_value(value))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


class Report:
    """An HTML report built in order: sections, paragraphs, tables and interactive figures.

    Content added before the first :meth:`section` goes above the sections.
    """

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title = title
        self.subtitle = subtitle
        self._intro: list[str] = []
        self._sections: list[tuple[str, str, list[str]]] = []  # (id, title, html blocks)
        self._figures: list[dict] = []

    def _blocks(self) -> list[str]:
        return self._sections[-1][2] if self._sections else self._intro

    def section(self, title: str, text: str = "") -> Report:
        """Start a new section (listed in the table of contents), with an optional first paragraph."""
        self._sections.append((_slug(title, len(self._sections) + 1), title, []))
        if text:
            self.paragraph(text)
        return self

    def paragraph(self, text: str) -> Report:
        """Add a paragraph of plain text (HTML-escaped)."""
        self._blocks().append(f"<p>{html.escape(text)}</p>")
        return self

    def table(
        self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, caption: str = ""
    ) -> Report:
        """Add a table; ``columns`` defaults to every key in order of first appearance."""
        self._blocks().append(table_html(rows, columns, caption))
        return self

    def html(self, block: str) -> Report:
        """Add a block of HTML as it is (the caller escapes its text; inline styles and scripts
        only, so the page stays self-contained)."""
        self._blocks().append(block)
        return self

    def figure(self, fig: Mapping[str, Any], caption: str = "") -> Report:
        """Add an interactive figure: a dict from :func:`heatmap`, :func:`lines`, :func:`bars` or by hand."""
        if "data" not in fig:
            raise ValueError("a figure dict needs a 'data' list (and usually a 'layout')")
        index = len(self._figures) + 1
        plot_id = f"plot-{index}"
        title = fig.get("layout", {}).get("title", "")
        title = title.get("text", "") if isinstance(title, Mapping) else str(title)
        self._figures.append({"id": plot_id, "data": fig["data"], "layout": fig.get("layout", {})})
        block = f'<figure><div class="plot" id="{plot_id}" data-title="{html.escape(html.unescape(title))}"></div>'
        if caption:
            block += f"<figcaption>{html.escape(caption)}</figcaption>"
        self._blocks().append(block + "</figure>")
        return self

    def render(self) -> str:
        """The whole report as one self-contained HTML document."""
        esc = html.escape
        body = ['<div class="container">', f"<header><h1>{esc(self.title)}</h1>"]
        if self.subtitle:
            body.append(f'<p class="subtitle">{esc(self.subtitle)}</p>')
        body.append("</header>")
        if self._sections:
            items = "".join(f'<li><a href="#{sid}">{esc(title)}</a></li>' for sid, title, _ in self._sections)
            body.append(f'<nav class="toc"><h2>Contents</h2><ol>{items}</ol></nav>')
        body.append("<main>")
        body.extend(self._intro)
        for sid, title, blocks in self._sections:
            body.append(f'<section id="{sid}"><h2>{esc(title)}</h2>')
            body.extend(blocks)
            body.append("</section>")
        body.append("</main></div>")
        data = [
            f'<script type="application/json" id="{fig["id"]}-data">'
            f"{_json({'data': fig['data'], 'layout': fig['layout']})}</script>"
            for fig in self._figures
        ]
        driver = _DRIVER.replace("CONFIG", json.dumps(_PLOT_CONFIG))
        return "\n".join(
            [
                "<!DOCTYPE html>",
                '<html lang="en"><head><meta charset="utf-8">',
                '<meta name="viewport" content="width=device-width, initial-scale=1">',
                f"<title>{esc(self.title)}</title>",
                f"<style>{_CSS}</style>",
                f"<script>{plotly_js()}</script>" if self._figures else "",
                "</head><body>",
                *body,
                *data,
                f"<script>{driver}</script>",
                "</body></html>",
                "",
            ]
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the report atomically (temporary file in the same folder, then rename); returns the path."""
        path = Path(path)
        if not distributed.is_main():  # under torchrun only rank 0 writes files
            return path
        text = self.render()
        with atomic(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path

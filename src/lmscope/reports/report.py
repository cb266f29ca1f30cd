"""A command's HTML report: one section per finished part, drawn from its :class:`Result` alone
(text, tables, figures), then the settings, versions and timings, in one self-contained page
(written by :class:`lmscope.reports.command.RunWriter`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmscope.reports.html import Report
from lmscope.reports.results import Result


@dataclass
class Section:
    """One finished part: its title, what it measures, its result, how long it took and its key."""

    title: str
    description: str
    result: Result
    seconds: float | None = None
    name: str = ""


def write_report(
    path: str | Path,
    title: str,
    sections: Sequence[Section],
    *,
    complete: bool,
    settings: Mapping,
    versions: Mapping[str, str],
    timings: Mapping[str, float],
) -> Path:
    """Write the report of ``sections`` (the parts finished so far; ``complete``: all of them) to ``path``."""
    status = "complete" if complete else f"partial: {len(sections)} parts finished so far"
    report = Report(title, subtitle=f"{status}; lmscope {versions.get('lmscope', '')}")
    for section in sections:
        text = section.description
        if section.seconds is not None:
            text = f"{text} ({section.seconds:.1f} s)"
        report.section(section.title, text)
        result = section.result
        if result.text():
            report.paragraph(result.text())
        for table in result.tables():
            report.table(table.rows, caption=table.caption)
        for figure in result.figures():
            report.figure(figure.plotly(), caption=f"{figure.name}.png")
    report.section("Settings, versions and timings")
    report.table([{"setting": k, "value": str(v)} for k, v in settings.items()], caption="settings")
    report.table([{"package": k, "version": v} for k, v in versions.items()], caption="versions")
    rows = [{"part": k, "seconds": v} for k, v in timings.items()]
    report.table(rows + [{"part": "total", "seconds": sum(timings.values())}], caption="time per part")
    return report.write(path)

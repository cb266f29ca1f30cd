"""The scan's HTML report: one section per finished part, drawn from its :class:`Result` alone
(text, tables, figures), then the settings, versions and timings, in one self-contained page."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmscope.reports.html import Report
from lmscope.reports.results import Result, save


@dataclass
class Section:
    """One finished part: its title, what it measures, its result and how long it took."""

    title: str
    description: str
    result: Result
    seconds: float | None = None


def write_report(
    path: str | Path,
    title: str,
    sections: Sequence[Section],
    *,
    planned: int,
    settings: Mapping,
    versions: Mapping[str, str],
    timings: Mapping[str, float],
) -> Path:
    """Write the report of ``sections`` (the parts finished so far, of ``planned``) to ``path``."""
    done = len(sections)
    status = "complete" if done == planned else f"partial: {done} of {planned} parts finished"
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


class PartWriter:
    """Writes a long run's outputs part by part: after each finished part, ``results.json``
    (its JSON under ``parts[name]``, its time under ``timings[name]``), the part's figures as
    PNG and ``report.html`` (the finished parts of ``planned``), so an interrupted run leaves
    every finished part readable. Used by ``lmscope scan`` and ``lmscope temporal``."""

    def __init__(self, out: Path, title: str, payload: dict, planned: int):
        self.out, self.title, self.planned = out, title, planned
        self.payload = {**payload, "timings": {}, "parts": {}}
        self.sections: list[Section] = []

    def add(self, name: str, title: str, description: str, result: Result, seconds: float | None = None) -> None:
        """Record one finished part and rewrite the outputs."""
        self.payload["timings"][name] = seconds or 0.0
        self.payload["parts"][name] = result.to_json()
        self.sections.append(Section(title, description, result, seconds))
        save(self.out, self.payload, result.figures())
        self.write()

    def update(self, name: str, partial: Result) -> None:
        """Save a part's partial result in ``results.json`` while it runs (the report is
        rewritten when the part is added)."""
        self.payload["parts"][name] = partial.to_json()
        save(self.out, self.payload)

    def write(self) -> Path:
        """Rewrite ``report.html`` from the parts finished so far."""
        return write_report(
            self.out / "report.html",
            self.title,
            self.sections,
            planned=self.planned,
            settings=self.payload["settings"],
            versions=self.payload["versions"],
            timings=self.payload["timings"],
        )

"""``lmscope scan``: one report of a model's internals, part by part.

The parts are :data:`lmscope.scan.parts.PARTS`, in order (each timed, each saved to
``results.json`` as soon as it finishes, so an interrupted scan leaves the finished parts
readable):

0. ``verify``   the correctness certificate of ``lmscope verify`` (:mod:`lmscope.verify`), so
                the report says at the top whether lmscope's numbers on this model can be trusted;
1. ``model``    the model card;
2. ``outliers`` OSP excess kurtosis per hidden state, max |x|, massive activations
                (:mod:`lmscope.quant.outliers`, in-context protocol on WikiText-2);
3. ``kv``       key vs value norms per layer (:mod:`lmscope.quant.kv`) and the KV quantisation
                table with perplexity on WikiText-2 (:mod:`lmscope.quant.evaluation`);
4. ``heads``    induction, previous-token and duplicate-token scores (:mod:`lmscope.circuits.head_roles`);
5. ``circuit``  exact activation patching of every head on the built-in IOI task
                (:mod:`lmscope.circuits.patching`).

Outputs in ``out``: ``results.json``, ``report.html`` (self-contained, interactive) and every
plot as PNG, written part by part by :class:`~lmscope.reports.command.RunWriter`: a rerun with the
same settings into the same folder reads the finished parts back and runs the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmscope.core.model import Model
from lmscope.reports.command import Command, RunWriter
from lmscope.reports.results import Result, Table
from lmscope.scan.parts import FULL, KV_CONFIGS, PARTS, QUICK, Part, ScanSettings

__all__ = ["FULL", "KV_CONFIGS", "PARTS", "QUICK", "SCAN", "Part", "ScanResult", "ScanSettings", "run_scan", "scan"]


@dataclass
class ScanResult(Result):
    """The result of each finished part, by name, with its time."""

    results: dict[str, Result] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    out: Path | None = None

    def to_json(self) -> dict:
        return {name: result.to_json() for name, result in self.results.items()}

    def tables(self) -> list[Table]:
        rows = [{"part": name, "seconds": seconds} for name, seconds in self.timings.items()]
        return [Table("scan: seconds per part", [*rows, {"part": "total", "seconds": sum(self.timings.values())}])]


def run_scan(model: Model, settings: ScanSettings, out: RunWriter, parts: Sequence[Part] | None = None) -> ScanResult:
    """Scan MODEL: outliers, keys/values and KV quantisation, head roles, an IOI circuit, as report.html."""
    result = ScanResult(out=out.out)
    for part in PARTS if parts is None else parts:
        result.results[part.name] = out.part(
            part.name, part.title, part.description, lambda part=part: part.run(model, settings)
        )
        result.timings[part.name] = out.payload["timings"][part.name]
    return result


def scan(
    model: Model,
    out: str | Path = "out/scan",
    settings: ScanSettings = FULL,
    name: str = "",
    parts: Sequence[Part] | None = None,
    overwrite: bool = False,
) -> ScanResult:
    """Run each part (default: :data:`PARTS`) on ``model`` and write ``results.json``, the PNG
    plots and ``report.html`` to ``out`` after each one (:func:`run_scan`). ``name``: the model
    as the user gave it."""
    writer = RunWriter(out, "scan", settings, model=model, model_name=name or model.name, overwrite=overwrite)
    result = run_scan(model, settings, writer, parts)
    writer.finish()
    return result


SCAN = Command("scan", ScanSettings, run_scan, presets={"quick": (QUICK, "less data per part (a few minutes on a 2-core CPU)")})

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
plot as PNG.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmscope.core.model import Model
from lmscope.core.progress import note
from lmscope.reports.report import PartWriter
from lmscope.reports.results import Result, header, output_dir
from lmscope.scan.parts import FULL, KV_CONFIGS, PARTS, QUICK, Part, ScanSettings

__all__ = ["FULL", "KV_CONFIGS", "PARTS", "QUICK", "Part", "ScanResult", "ScanSettings", "scan"]


@dataclass
class ScanResult:
    """The payload written to ``results.json`` and the result of each finished part."""

    payload: dict
    out: Path
    results: dict[str, Result] = field(default_factory=dict)


def scan(
    model: Model,
    out: str | Path = "out/scan",
    settings: ScanSettings = FULL,
    name: str = "",
    parts: Sequence[Part] | None = None,
) -> ScanResult:
    """Run each part (default: :data:`PARTS`) on ``model`` and write ``results.json``, the PNG
    plots and ``report.html`` to ``out`` after each one. ``name``: the model as the user gave it."""
    parts = list(PARTS if parts is None else parts)
    out = output_dir(out)
    name = name or model.name
    payload = {**header("scan", name, model, asdict(settings)), "model_name": name}
    writer = PartWriter(out, f"lmscope scan: {name}", payload, planned=len(parts))
    result = ScanResult(writer.payload, out)
    for part in parts:
        note(f"scan: {part.name}")
        start = time.perf_counter()
        part_result = part.run(model, settings)
        seconds = time.perf_counter() - start
        result.results[part.name] = part_result
        writer.add(part.name, part.title, part.description, part_result, seconds)
        note(f"scan: {part.name} took {seconds:.1f} s")
    return result

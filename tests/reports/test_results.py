"""The result protocol (JSON, tables, figures, the Jupyter view), the shared results.json
header, and PNG rendering without pyplot or a global backend switch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from lmscope.reports.figures import Figure
from lmscope.reports.command import RunWriter
from lmscope.reports.results import ModelCard, Result, Table, nan_for_none, plain, save, strict, write_json
from tests.helpers import read_results


@dataclass
class _Scores(Result):
    scores: torch.Tensor
    label: str
    pairs: tuple[int, int] = (1, 2)

    def tables(self) -> list[Table]:
        return [Table("scores", [{"i": i, "score": float(v)} for i, v in enumerate(self.scores)])]

    def figures(self) -> list[Figure]:
        return [Figure("scores", "lines", "Scores <&>", "i", "score", x=[0, 1, 2], series={"s": self.scores.tolist()})]


def test_default_to_json_is_the_fields_as_plain_json():
    result = _Scores(torch.tensor([0.5, -1.0, 2.0]), "x")
    assert result.to_json() == {"scores": [0.5, -1.0, 2.0], "label": "x", "pairs": [1, 2]}
    assert json.loads(json.dumps(result.to_json())) == result.to_json()
    assert plain({1: (result, float("nan"))})["1"][0] == result.to_json()


def _refuse(constant: str):
    raise ValueError(f"not strict JSON: {constant}")


def test_write_json_is_strict_json(tmp_path):
    payload = {
        "nan": float("nan"),
        "inf": float("inf"),
        "-inf": -math.inf,
        "tensor": torch.tensor([1.0, float("nan"), -float("inf")]),
        "array": np.array([[np.nan, 2.5]]),
        "numpy": np.float32("nan"),
        "result": _Scores(torch.tensor([float("inf"), 0.5]), "x"),
        "kept": [1, 0.25, None, "nan", True],
    }
    path = write_json(tmp_path / "results.json", payload)
    data = json.loads(path.read_text(), parse_constant=_refuse)
    assert data == {
        "nan": None,
        "inf": None,
        "-inf": None,
        "tensor": [1.0, None, None],
        "array": [[None, 2.5]],
        "numpy": None,
        "result": {"scores": [None, 0.5], "label": "x", "pairs": [1, 2]},
        "kept": [1, 0.25, None, "nan", True],
    }
    assert strict(payload) == data
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left
    with pytest.raises(ValueError):
        json.loads('{"x": NaN}', parse_constant=_refuse)
    back = nan_for_none(data["tensor"])
    assert back[0] == 1.0 and math.isnan(back[1]) and math.isnan(back[2])


def test_repr_html_has_tables_and_inline_png():
    html = _Scores(torch.tensor([0.5, -1.0, 2.0]), "x")._repr_html_()
    assert "<caption>scores</caption>" in html and "-1" in html
    assert 'alt="Scores &lt;&amp;&gt;"' in html and "data:image/png;base64,iVBORw0KGgo" in html
    assert "<script" not in html  # works offline, no plotly.js needed


def test_model_card_and_header(smollm2, tmp_path):
    card = ModelCard.of(smollm2)
    assert card.to_json() == smollm2.card()
    assert {"property": "layers", "value": "30"} in card.tables()[0].rows
    head = RunWriter(tmp_path, "demo", {"n": 3}, model=smollm2, model_name="smollm2-135m").payload
    assert head["command"] == "demo" and head["settings"] == {"model": "smollm2-135m", "dtype": "float32", "n": 3}
    assert head["versions"]["lmscope"] and head["model"] == smollm2.card()
    save(tmp_path, {**head, **card.to_json()}, _Scores(torch.tensor([1.0, 2.0, 3.0]), "y").figures())
    assert read_results(tmp_path)["model"]["layers"] == 30
    assert (tmp_path / "scores.png").read_bytes().startswith(b"\x89PNG")


def test_plots_leave_matplotlib_state_alone(tmp_path):
    """Rendering neither imports pyplot nor switches the backend (a fresh interpreter)."""
    code = f"""
import sys, matplotlib
before = matplotlib.rcParams._get_backend_or_none()  # None: not chosen yet (get_backend would choose)
from lmscope.reports import plots
from lmscope.reports.figures import Figure
Figure("h", "heatmap", "t", "x", "y", z=[[1.0, 2.0], [3.0, -1.0]], diverging=True).png({str(tmp_path)!r})
Figure("b", "bars", "t", "x", "y", x=["a", "b"], series={{"s": [1, 2]}}, log=True).png_bytes()
plots.graph(["a", "b"], {{"a": (0, 0), "b": (1, 2)}}, [("a", "b", -0.5)], {str(tmp_path / "g.png")!r}, "g")
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
assert matplotlib.rcParams._get_backend_or_none() == before, matplotlib.rcParams._get_backend_or_none()
"""
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "h.png").stat().st_size > 1000 and (tmp_path / "g.png").stat().st_size > 1000

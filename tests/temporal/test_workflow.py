"""``lmscope temporal`` end to end.

Ground truth: the model trained in the suite on synthetic year-dependent and invariant facts
(``synthetic.py``), saved with a word-level tokenizer and its facts written in the paper's file
format, goes through the command like any model. Its year heads are known from the attention
pattern (``synthetic.year_heads``), independently of lmscope's circuit code: the workflow must
report exactly them as temporal heads; zeroing them must bring temporal recall to chance while
colours stay; injecting a source year's values through them must flip the answer. On SmolLM2
(which does not know the facts) ``--quick`` must run and say that recall is near chance.
"""

from __future__ import annotations

import json

import pytest

import lmscope
from lmscope.cli import main
from tests.helpers import read_results, run_cli
from tests.temporal import synthetic as syn
from tests.temporal.synthetic import WORLD

TOP = 10  # edges per circuit: the synthetic graph has ~150; 6-12 all give the year heads


def _cli(*argv) -> int:
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _edits(path, cases, coeff: float = 6.0) -> str:
    """Text experiments: the source year's values injected at the target's year token."""
    name = WORLD.names.__getitem__
    template = "<bos> " + WORLD.TEMPORAL_TEMPLATE
    rows = []
    for s, y1, y2 in cases:
        country = name(WORLD.subjects[s])
        rows.append(
            {
                "source_prompt": template.format(time=name(WORLD.years[y1]), subject=country),
                "target_prompt": template.format(time=name(WORLD.years[y2]), subject=country),
                "subject_phrase": f"In year {name(WORLD.years[y2])}",
                "trigger_word": name(WORLD.leader_of[s][y1]),
                "coeff": coeff,
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _cases(n: int = 8) -> list[tuple[int, int, int]]:
    """(country, source year, target year) with different leaders, spread over countries."""
    out = []
    for i in range(syn.N_SUBJECTS * syn.N_YEARS):
        s, y1 = i % syn.N_SUBJECTS, (i // syn.N_SUBJECTS + 3 * i) % syn.N_YEARS
        y2 = (y1 + 2) % syn.N_YEARS
        if WORLD.leader_of[s][y1] != WORLD.leader_of[s][y2]:
            out.append((s, y1, y2))
    return out[:n]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory, temporal_model):
    root = tmp_path_factory.mktemp("synthetic_temporal")
    model_dir = syn.save_model(temporal_model, root / "model")
    WORLD.write_data(root / "data")
    edits = _edits(root / "edits.jsonl", _cases())
    out = root / "out"
    argv = ["temporal", model_dir, "--data", root / "data", "--steps", 5, "--top", TOP, "--edits", edits,
            "--max-new-tokens", 1, "--corpus", "none", "--out", out]  # fmt: skip
    assert _cli(*argv) == 0
    first = read_results(out)
    assert _cli(*argv) == 0  # again: circuits read back from graph_*.json
    second = read_results(out)
    return first, second, out


def test_finds_the_heads_that_read_the_year(synthetic_run, temporal_model):
    results, _, _ = synthetic_run
    heads = results["parts"]["heads"]
    expected = sorted(syn.year_heads(temporal_model))  # from the attention pattern alone
    assert expected
    reported = [tuple(int(x) for x in n[1:].split(".h")) for n in heads["temporal_nodes"] if n.startswith("a")]
    assert sorted(reported) == expected
    # one circuit per year (8) and the invariant one; each year's circuit contains the year heads
    circuits = results["parts"]["circuits"]["circuits"]
    assert len(circuits) == syn.N_YEARS + 1
    assert heads["groups"] == {**{str(2000 + y): 1 for y in range(syn.N_YEARS)}, "invariant": 1}
    assert all(c["CRS"] > 50 for c in circuits)


def test_zeroing_the_reported_heads_removes_the_year_only(synthetic_run):
    results, _, _ = synthetic_run
    rows = {r["ablated"]: r for r in results["parts"]["ablation"]["rows"]}
    accuracy = lambda row, name: row["categories"][name]["accuracy"]
    assert accuracy(rows["none"], "synthetic leaders") >= 0.95
    assert accuracy(rows["none"], "synthetic colours") >= 0.95
    assert accuracy(rows["all temporal heads"], "synthetic leaders") <= 1.5 * syn.TEMPORAL_CHANCE
    assert accuracy(rows["all temporal heads"], "synthetic colours") >= 0.9
    assert set(rows) == {"none", "a1.h1", "a1.h2", "all temporal heads"}
    assert rows["none"]["perplexity"] is None  # --corpus none


def test_injecting_a_source_year_through_a_reported_head_flips_the_answer(synthetic_run):
    results, _, _ = synthetic_run
    edit = results["parts"]["edit"]
    reported = {tuple(int(x) for x in n[1:].split(".h")) for n in results["parts"]["heads"]["temporal_nodes"]}
    succeeded = {(layer, head) for layer, row in enumerate(edit["successes"]) for head, n in enumerate(row) if n}
    assert succeeded and succeeded <= reported
    assert all(e["position"] == syn.YEAR_POS for e in edit["experiments"])
    # the successful edits name the source year's leader, which the unedited target does not
    assert not any(e["baseline_success"] for e in edit["experiments"])


def test_every_reported_head_moves_the_answer_toward_the_source_year(synthetic_run, temporal_model):
    """The edit of each reported head raises logit(source year's leader) - logit(target year's
    leader) at the final position, on average over the cases, by more than 1 (plain forwards
    with one intervention; as ``test_edit.py`` checks for the heads found from attention)."""
    import torch

    from lmscope.temporal.edit import source_values, value_edit

    results, _, _ = synthetic_run
    reported = [tuple(int(x) for x in n[1:].split(".h")) for n in results["parts"]["heads"]["temporal_nodes"]]
    shift = dict.fromkeys(reported, 0.0)
    for s, y1, y2 in _cases():
        values = source_values(temporal_model, WORLD.temporal_ids(s, y1))
        ids = torch.tensor([WORLD.temporal_ids(s, y2)])
        new, old = WORLD.leader_of[s][y1], WORLD.leader_of[s][y2]
        base = temporal_model.run(ids).logits[0, -1]
        for layer, head in reported:
            edit = value_edit(temporal_model, layer, head, values[layer, head], 6.0, syn.YEAR_POS)
            logits = temporal_model.run(ids, interventions=[edit]).logits[0, -1]
            shift[layer, head] += float((logits[new] - logits[old]) - (base[new] - base[old])) / len(_cases())
    assert shift and min(shift.values()) > 1.0, shift


def test_outputs_and_resume(synthetic_run):
    first, second, out = synthetic_run
    assert list(first["parts"]) == ["recall", "circuits", "heads", "ablation", "reading", "edit"]
    assert first["parts"]["reading"]["reason"].startswith("No selected temporal category has alias")
    for name in ("report.html", "results.json", "temporal_heads.png", "temporal_edit.png", "recall.png"):
        assert (out / name).is_file(), name
    graphs = sorted(out.glob("graph_*.json"))
    assert len(graphs) == syn.N_YEARS + 1 and len(list(out.glob("graph_*.png"))) == len(graphs)
    graph = json.loads(graphs[0].read_text())
    assert graph["settings"]["steps"] == 5 and graph["nodes"][0] == "input" and graph["edges"]
    assert first["parts"]["circuits"]["resumed"] == 0 and first["resumed"] == []
    # the rerun with the same settings reads every finished part back
    assert second["resumed"] == ["recall", "circuits", "heads", "ablation", "reading", "edit"]
    assert second["parts"] == first["parts"]
    html = (out / "report.html").read_text()
    assert "Temporal heads" in html and "a1.h1" in html and "complete; lmscope" in html


def test_interrupted_study_resumes_from_its_finished_parts(synthetic_run, tmp_path, monkeypatch):
    """Interrupted in the ablation part, a rerun with the same settings reads recall, circuits
    and heads back (no circuit is built again) and finishes with the uninterrupted study's numbers."""
    import lmscope.temporal.workflow as workflow

    first, _, out = synthetic_run
    root = out.parent
    argv = ["temporal", root / "model", "--data", root / "data", "--steps", 5, "--top", TOP,
            "--edits", root / "edits.jsonl", "--max-new-tokens", 1, "--corpus", "none", "--out", tmp_path]  # fmt: skip
    real = workflow.ablation

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "ablation", interrupted)
    assert _cli(*argv) == 130
    assert list(read_results(tmp_path)["parts"]) == ["recall", "circuits", "heads"]
    monkeypatch.setattr(workflow, "ablation", real)
    monkeypatch.setattr(workflow, "build_circuit", lambda *a, **k: pytest.fail("a circuit was built again"))
    assert _cli(*argv) == 0
    resumed = read_results(tmp_path)
    assert resumed["resumed"] == ["recall", "circuits", "heads"]
    for part in ("heads", "ablation", "edit"):
        assert _close(resumed["parts"][part], first["parts"][part]), part


def test_offloaded_to_disk_gives_the_same_study(synthetic_run, tmp_path):
    """The same command with most of the model offloaded to disk (``--max-memory``) reports the
    same recall, temporal heads, ablation table and edit successes."""
    first, _, out = synthetic_run
    root = out.parent
    argv = ["temporal", root / "model", "--data", root / "data", "--steps", 5, "--top", TOP,
            "--edits", root / "edits.jsonl", "--max-new-tokens", 1, "--corpus", "none",
            "--max-memory", "cpu=100KB", "--offload-folder", tmp_path / "offload", "--out", tmp_path / "out"]  # fmt: skip
    assert _cli(*argv) == 0
    check = lmscope.load(
        str(root / "model"), device_map="auto", max_memory={"cpu": "100KB"}, offload_folder=str(tmp_path)
    )
    assert "disk" in set(check.hf.hf_device_map.values())  # these settings do put layers on disk
    second = read_results(tmp_path / "out")
    assert second["parts"]["heads"]["temporal_nodes"] == first["parts"]["heads"]["temporal_nodes"]
    for part in ("recall", "ablation"):
        assert _close(second["parts"][part], first["parts"][part]), part
    assert second["parts"]["edit"]["successes"] == first["parts"]["edit"]["successes"]


def _close(a, b, tol: float = 1e-5) -> bool:
    """Nested JSON equal up to ``tol`` in floats."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


def test_bad_input_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "temporal", "--categories", "nosuchcategory", "--out", tmp_path)
    assert code == 2 and "no category matches 'nosuchcategory'" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "temporal", "--categories", "roman", "--out", tmp_path)
    assert code == 2 and "no temporal category selected" in err
    bad = tmp_path / "edits.jsonl"
    bad.write_text('{"source_prompt": "a"}\n')
    code, _, err = run_cli(capsys, "temporal", "--edits", bad, "--out", tmp_path)
    assert code == 2 and "edits.jsonl:1" in err and "missing" in err


def test_quick_on_smollm2_reports_recall_near_chance(capsys, tmp_path, smollm2):
    code, out, err = run_cli(capsys, "temporal", "--quick", "--out", tmp_path)
    assert code == 0, err
    results = read_results(tmp_path)
    assert list(results["parts"]) == ["recall", "circuits", "heads", "ablation", "reading", "edit"]
    assert "temporal accuracy" in out and "near chance" in out
    recall = {c["name"]: c for c in results["parts"]["recall"]["categories"]}
    assert set(recall) == {"temporal political leadership", "roman_numerals"}
    rows = results["parts"]["ablation"]["rows"]
    assert rows[0]["ablated"] == "none" and rows[0]["perplexity"] > 1
    assert len(results["parts"]["circuits"]["circuits"]) == 3  # 2 years + 1 invariant category
    assert (tmp_path / "report.html").is_file() and list(tmp_path.glob("graph_*.json"))

"""The CLI: output, saved files, one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import read_results, run_cli


def test_run_captures_and_saves(capsys, tmp_path, smollm2):
    path = tmp_path / "out.safetensors"
    code, out, _ = run_cli(
        capsys,
        "run",
        "The capital of France is",
        "-c",
        "blocks.3.attn.z",
        "-c",
        "blocks.3.attn.z.2",
        "--save",
        str(path),
    )
    assert code == 0
    assert "[1, 5, 9, 64]" in out and "[1, 5, 64]" in out and "Paris" in out
    saved = load_file(str(path))
    ref = smollm2.run("The capital of France is", capture=["blocks.3.attn.z"]).cache["blocks.3.attn.z"]
    assert torch.equal(saved["blocks.3.attn.z"], ref)
    assert torch.equal(saved["blocks.3.attn.z.2"], ref[:, :, 2])


def test_sites_table(capsys):
    code, out, _ = run_cli(capsys, "sites", "--layer", "2", "--pos", "4")
    assert code == 0
    assert "blocks.2.attn.k" in out and "[1, 4, 3, 64]" in out and "blocks.3." not in out


def test_models_lists_alias(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "smollm2-135m" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "hi", "-c", "blocks.0.attn.zz"], "unknown site"),
        (["run", "hi", "-c", "blocks.30.resid_post"], "layer 30 out of range"),
        (["run", "hi", "-c", "blocks.0.attn.z.9"], "head 9 out of range"),
        (["sites", "/no/such/model"], "no such model file or directory"),
        (["sites", "--layer", "31"], "out of range"),
        (["run", "a", "b", "c"], "expected [MODEL] TEXT"),
    ],
)
def test_bad_input_one_line_exit_2(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and err.strip().count("\n") == 0 and "Traceback" not in err


def test_console_script_exit_code_and_debug(tmp_path):
    """The installed `lmscope` command: exit 2 and one line; --debug shows the traceback."""
    cmd = [sys.executable, "-m", "lmscope", "run", "hi", "-c", "nope"]
    plain = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stderr.strip().startswith("error: unknown site")
    debug = subprocess.run(cmd + ["--debug"], check=False, capture_output=True, text=True, timeout=120)
    assert "Traceback" in debug.stderr


def _pairs_file(tmp_path, lines):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


IOI = (
    '{"clean": "When Mary and John went to the store, John gave a drink to", '
    '"corrupt": "When Mary and John went to the store, Mary gave a drink to", '
    '"answer": " Mary", "wrong_answer": " John"}'
)


@pytest.mark.parametrize("command", ["locate", "patch"])  # patch: the command's earlier name
def test_locate_writes_results_and_plot(capsys, tmp_path, smollm2, command):
    out = tmp_path / command
    code, printed, _ = run_cli(
        capsys, command, "--data", str(_pairs_file(tmp_path, [IOI])), "--level", "layer", "--out", str(out)
    )
    assert code == 0 and "mlp" in printed
    results = read_results(out)
    assert results["command"] == "locate"
    assert results["settings"]["method"] == "exact" and results["versions"]["lmscope"]
    located = results["parts"]["locate"]
    assert {r["component"] for r in located["results"]} == {"attn", "mlp"}
    assert len(located["results"][0]["rows"]) == smollm2.n_layers
    assert (out / "attn.png").stat().st_size > 1000 and (out / "mlp.png").is_file()
    assert located["metric"]["clean"] > 0 > located["metric"]["corrupt"]


def test_gradient_methods_take_a_memory_budget(capsys, tmp_path, smollm2):
    """``--max-memory 1GB`` (a bare size) bounds the working memory of EAP-IG without spreading
    the model; results.json records the budget and the peak; a bad size is a one-line error."""
    out = tmp_path / "eap"
    data = str(_pairs_file(tmp_path, [IOI]))
    args = ("locate", "--data", data, "--method", "eap-ig", "--steps", "3", "--out", str(out))
    code, _, _ = run_cli(capsys, *args, "--max-memory", "1GB")
    assert code == 0
    memory = read_results(out)["parts"]["locate"]["memory"]
    assert memory["budget_bytes"] == 10**9 and memory["peak_bytes"] > 0
    code, _, err = run_cli(capsys, *args, "--max-memory", "lots", "--overwrite")
    assert code == 2 and "bad --max-memory 'lots'" in err and len(err.strip().splitlines()) == 1


def test_circuit_and_heads_commands(capsys, tmp_path):
    out = tmp_path / "circuit"
    code, printed, _ = run_cli(
        capsys, "circuit", "--data", str(_pairs_file(tmp_path, [IOI])), "--top", "20", "--steps", "2", "--out", str(out)
    )
    assert code == 0 and "CRS" in printed
    graph = json.loads((out / "graph.json").read_text())
    assert "logits" in graph["nodes"] and graph["edges"] and (out / "circuit.png").is_file()
    memory = read_results(out)["parts"]["circuit"]["memory"]
    assert memory["device"] == "cpu" and memory["budget_bytes"] > 0 and memory["peak_bytes"] > 0
    code, printed, _ = run_cli(capsys, "heads", "--out", str(tmp_path / "heads"), "--batch", "2", "--length", "10")
    assert code == 0 and "induction" in printed
    assert (tmp_path / "heads" / "induction.png").is_file()


@pytest.mark.parametrize(
    "lines, extra, message",
    [
        (["{oops"], [], "malformed JSON"),
        (['{"clean": "a b c", "corrupt": "a", "answer": " x", "wrong_answer": " y"}'], [], "tokenise to"),
        ([IOI], ["--method", "magic"], "unknown --method 'magic'"),
        ([IOI], ["--level", "neuron"], "unknown --level 'neuron'"),
    ],
)
def test_locate_bad_input_keeps_earlier_results(capsys, tmp_path, lines, extra, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    code, _, err = run_cli(capsys, "locate", "--data", str(_pairs_file(tmp_path, lines)), "--out", str(out), *extra)
    assert code == 2 and message in err and err.strip().count("\n") == 0
    assert read_results(out) == {"earlier": True}


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "heads", "--out", str(blocker / "sub"))
    assert code == 2 and "cannot create output directory" in err


def test_outliers_command(capsys, tmp_path, smollm2):
    """Max |x| of a residual site in results.json equals a direct capture of the same tokens."""
    from lmscope.core.corpus import load_corpus

    out = tmp_path / "outliers"
    argv = ["outliers", "--tokens", "256", "--window", "128", "--site", "blocks.3.mlp.post", "--out", str(out)]
    code, stdout, _ = run_cli(capsys, *argv)
    assert code == 0 and "OSP excess kurtosis" in stdout and "507" in stdout
    payload = read_results(out)
    tokens = load_corpus(smollm2, max_tokens=256).windows(128)
    ref = smollm2.run(tokens, capture=["blocks.12.resid_post", "blocks.3.mlp.post"]).cache
    for name in ("blocks.12.resid_post", "blocks.3.mlp.post"):
        site = payload["parts"]["outliers"]["sites"][name]
        assert site["max_abs"] == pytest.approx(float(ref[name].abs().max()), rel=1e-5)
    assert {"kurtosis.png", "max_abs.png", "max_abs_channels.png"} <= {p.name for p in out.iterdir()}


def test_kv_command(capsys, tmp_path, smollm2):
    """|K|_F of layer 3 equals the norm of the captured keys of the same tokens."""
    from lmscope.core.corpus import load_corpus

    out = tmp_path / "kv"
    code, stdout, _ = run_cli(capsys, "kv", "--tokens", "256", "--window", "128", "--out", str(out))
    assert code == 0 and "keys vs values" in stdout
    payload = read_results(out)
    tokens = load_corpus(smollm2, max_tokens=256).windows(128)
    keys = smollm2.run(tokens, capture=["blocks.3.attn.k"]).cache["blocks.3.attn.k"]
    assert payload["parts"]["kv"]["kv"]["keys"]["frobenius"][3] == pytest.approx(float(keys.double().norm()), rel=1e-4)
    assert (out / "kv_norms.png").exists()


def test_quant_command_keeps_rows_and_plots(capsys, tmp_path):
    out = tmp_path / "quant"
    argv = ["quant", "--kv", "k4v2,k2v4", "--budget", "3", "--tokens", "256", "--window", "128", "--out", str(out)]
    code, stdout, _ = run_cli(capsys, *argv)
    assert code == 0 and "K4V2" in stdout
    rows = read_results(out)["parts"]["quant"]["rows"]
    ppl = {r["config"]: r["perplexity"] for r in rows}
    assert set(ppl) == {"fp", "K4V2", "K2V4", "alloc-weights-3b", "alloc-activations-3b"}
    assert ppl["K4V2"] < ppl["K2V4"]
    for row in rows:
        if row["config"].startswith("alloc"):
            assert (row["k_bits"] + row["v_bits"]) / 2 == pytest.approx(3.0)
    assert (out / "quant_perplexity.png").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["quant", "--kv", "k9v2"], "KV bits must be between 1 and 8"),
        (["quant", "--kv", "k4"], "bad KV quantisation"),
        (["quant", "--k-axis", "diagonal"], "unknown --k-axis 'diagonal' (choose from token, channel)"),
        (["outliers", "--corpus", "/no/such/corpus.txt"], "--corpus /no/such/corpus.txt: no such file"),
        (["kv", "--tokens", "10", "--window", "512"], "fewer than one window"),
    ],
)
def test_quant_commands_bad_input_keep_earlier_results(capsys, tmp_path, argv, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    code, _, err = run_cli(capsys, *argv, "--out", str(out))
    assert code == 2 and message in err and err.strip().count("\n") == 0
    assert read_results(out) == {"earlier": True}


def test_quant_malformed_choices(capsys, tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text('{"context": "a", "choices": ["b", "c"], "answer": 0}\n{oops\n')
    code, _, err = run_cli(capsys, "quant", "--choices", str(bad), "--out", str(tmp_path / "out"))
    assert code == 2 and f"{bad}:2: malformed JSON" in err

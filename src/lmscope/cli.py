"""The ``lmscope`` command: a thin shell over the Python API.

Bad input raises :class:`~lmscope.core.errors.LmscopeError`, which becomes a one-line
``error: ...`` on stderr and exit code 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lmscope import load
from lmscope.core import distributed, memory
from lmscope.core.errors import LmscopeError
from lmscope.core.loading import ALIASES, DEFAULT_MODEL, cached_conversions, parse_max_memory
from lmscope.core.memory import PeakMemory
from lmscope.core.sites import parse_site
from lmscope.reports.results import header, output_dir, save, write_json

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Look inside causal language models. Add --debug to any command for tracebacks.",
)
console = Console()
err = Console(stderr=True)

ModelArg = Annotated[str, typer.Argument(help="alias, model directory, .gguf file or cached hub id")]
DataOpt = Annotated[Path | None, typer.Option(help="prompt pairs (JSONL: clean, corrupt, answer, wrong_answer)")]
TaskOpt = Annotated[str | None, typer.Option(help="built-in task: ioi, induction, capitals")]
PairsOpt = Annotated[int | None, typer.Option("--n", help="number of pairs to generate for --task")]
MetricOpt = Annotated[str, typer.Option(help="logit_diff, logprob, prob or kl")]
AlignOpt = Annotated[str, typer.Option(help="strict, or final: left-pad pairs of unequal length")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto (CUDA when available)")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16")]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        help="memory per device, e.g. cpu=2GB,0=20GB: the model is spread within it (rest to disk); "
        "a bare size (4GB) only bounds the working memory of gradient methods"
    ),
]
OffloadOpt = Annotated[Path | None, typer.Option(help="folder for layers offloaded to disk (default: a temporary one)")]


def _bare_size(text: str) -> int:
    try:
        return memory.parse_size(text)
    except LmscopeError:
        raise LmscopeError(
            f"bad --max-memory '{text}' (a size such as 4GB, or DEVICE=SIZE entries such as cpu=2GB,0=20GB)"
        ) from None


def _budget(m, max_memory: str | None) -> int:
    """``--max-memory`` as the gradient methods' budget in bytes on the model's device: a bare
    size, or that device's entry (default: half its free memory, :func:`lmscope.core.memory.budget`)."""
    sizes = max_memory if max_memory is None or "=" not in max_memory else parse_max_memory(max_memory)
    return memory.budget(m.device, sizes)


def _memory_record(m, budget: int, peak: PeakMemory) -> dict:
    """The ``memory`` entry of results.json: device, budget and peak above the start, in bytes."""
    return {"device": str(m.device), "budget_bytes": budget, "peak_bytes": peak.peak}


# Global options of this invocation (set by the app callback, read by _load).
_SETTINGS = {"trust_remote_code": False}


def _load(model: str, device: str, dtype: str, max_memory: str | None, offload_folder: Path | None, certify=True):
    """Load MODEL on ``device`` in ``dtype``; with ``max_memory``, spread over devices and disk
    (accelerate's ``device_map="auto"``). A model whose family has no entry gets a derived one,
    used only once its certificate passes (the entry is printed for the table). With
    ``--trust-remote-code``, a model's own modeling code may run."""
    trust = _SETTINGS["trust_remote_code"]
    if max_memory is None or "=" not in max_memory:  # no limit, or a working-memory budget only
        if max_memory is not None:
            _bare_size(max_memory)
        m = load(model, device=device, dtype=dtype, derive=True, trust_remote_code=trust)
    else:
        import tempfile

        folder = str(offload_folder) if offload_folder else tempfile.mkdtemp(prefix="lmscope-offload-")
        m = load(
            model,
            dtype=dtype,
            device_map="auto",
            max_memory=parse_max_memory(max_memory),
            offload_folder=folder,
            derive=True,
            trust_remote_code=trust,
        )
    if m.derived:
        from lmscope.core.derive import entry_source
        from lmscope.verify import certify as run_certificate
        from lmscope.verify import require

        err.print(f"family '{m.hf.config.model_type}' has no entry; derived from the module tree:")
        err.print(entry_source(m.hf.config.model_type, m.family), soft_wrap=True, highlight=False, markup=False)
        if certify:
            require(run_certificate(m))
            err.print("its certificate passed; add the entry to the table or a --families file to skip this check")
    return m


@app.callback()
def _options(
    families: Annotated[
        Path | None,
        typer.Option(
            envvar="LMSCOPE_FAMILIES",
            help="TOML/JSON file of family entries {model_type: {field: value}} (private or remote-code models)",
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code",
            help="run a model's own modeling code shipped with it (auto_map in its config, e.g. Monet)",
        ),
    ] = False,
) -> None:
    _SETTINGS["trust_remote_code"] = trust_remote_code
    if families is not None:
        from lmscope.core.families import load_families

        load_families(families)


@app.command()
def models() -> None:
    """Built-in model aliases and cached GGUF conversions."""
    table = Table("alias", "model", "available", title="aliases")
    for name, (description, locate) in ALIASES.items():
        try:
            available = str(locate())
        except LmscopeError as e:
            available = f"no: {e}"
        table.add_row(name + (" (default)" if name == DEFAULT_MODEL else ""), description, available)
    console.print(table)
    cached = Table("cached conversion", "source", "sha256", title="cache")
    for record in cached_conversions():
        cached.add_row(record["path"], record["source"], record["sha256"][:16])
    console.print(cached)


@app.command()
def sites(
    model: ModelArg = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    pos: Annotated[int, typer.Option(help="sequence length for the shapes")] = 8,
    layer: Annotated[int | None, typer.Option(help="only this layer's sites")] = None,
) -> None:
    """Table of site names with their shapes (batch 1, --pos tokens)."""
    m = _load(model, device, dtype, max_memory, offload_folder)
    if layer is not None:
        m.site(f"blocks.{layer}.resid_pre")  # validates the layer
    table = Table("site", "shape", title=f"{m.name}: sites (batch 1, {pos} tokens)")
    for name, shape in m.site_shapes(batch=1, pos=pos):
        if layer is None or name.startswith(f"blocks.{layer}."):
            table.add_row(name, str(list(shape)))
    console.print(table)


@app.command()
def run(
    args: Annotated[list[str], typer.Argument(help="[MODEL] TEXT", show_default=False)],
    capture: Annotated[list[str], typer.Option("--capture", "-c", help="site to capture (repeatable)")] = [],  # noqa: B006
    save: Annotated[Path | None, typer.Option(help="write the captures to this .safetensors file")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
) -> None:
    """Run TEXT through MODEL and print the shapes and norms of the captured sites."""
    if len(args) > 2:
        raise LmscopeError("expected [MODEL] TEXT (quote the text)")
    model, text = (DEFAULT_MODEL, args[0]) if len(args) == 1 else args
    for name in capture:
        parse_site(name)  # a misspelt site fails before the model loads
    m = _load(model, device, dtype, max_memory, offload_folder)
    for name in capture:
        m.site(name)  # layer and head ranges
    result = m.run(text, capture=capture or [f"blocks.{m.n_layers - 1}.resid_post"])
    table = Table("site", "shape", "norm", "max |x|", title=f"{m.name}: {result.input_ids.shape[1]} tokens")
    for name, value in result.cache.items():
        table.add_row(name, str(list(value.shape)), f"{value.norm():.4g}", f"{value.abs().max():.4g}")
    console.print(table)
    next_token = m.tokenizer.decode(result.logits[0, -1].argmax())
    console.print(f"next token: {next_token!r}")
    if save is not None:
        console.print(f"saved {len(result.cache)} tensors to {result.cache.save(save)}")


@app.command()
def verify(
    model: ModelArg = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    check: Annotated[list[str], typer.Option("--check", help="run only this check (repeatable)")] = [],  # noqa: B006
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/verify"),
) -> None:
    """Correctness certificate of MODEL: every check against an independent reference (exit 1 if one fails)."""
    from lmscope.verify import certify

    out = output_dir(out)
    m = _load(model, device, dtype, max_memory, offload_folder, certify=False)
    cert = certify(m, check or None)
    payload = header("verify", model, m, {"checks": check or "all", "derived_family": m.derived})
    payload["certificate"] = cert.to_json()
    write_json(out / "results.json", payload)
    table = Table("check", "result", "detail", title=f"{m.name}: certificate ({m.hf.config.model_type})")
    colour = {"pass": "green", "fail": "red", "n/a": "yellow"}
    for c in cert.checks:
        table.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", c.detail)
    console.print(table)
    counts = cert.counts()
    console.print(
        f"{counts['pass']} passed, {counts['fail']} failed, {counts['n/a']} not applicable; wrote {out / 'results.json'}"
    )
    if not cert.passed:
        err.print(f"[red]refused:[/red] failed check(s): {', '.join(cert.failed)}", highlight=False)
        raise typer.Exit(1)


@app.command()
def scan(
    model: ModelArg = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/scan"),
    quick: Annotated[bool, typer.Option(help="less data per part (a few minutes on a 2-core CPU)")] = False,
) -> None:
    """Scan MODEL: outliers, keys/values and KV quantisation, head roles, an IOI circuit, as report.html."""
    from lmscope.scan import FULL, QUICK
    from lmscope.scan import scan as run_scan

    out = output_dir(out)
    m = _load(model, device, dtype, max_memory, offload_folder)
    result = run_scan(m, out, QUICK if quick else FULL, name=model)
    timings = Table("part", "seconds", title=f"{m.name}: scan{' (quick)' if quick else ''}")
    for part, seconds in result.payload["timings"].items():
        timings.add_row(part, f"{seconds:.1f}")
    timings.add_row("total", f"{sum(result.payload['timings'].values()):.1f}")
    console.print(timings)
    console.print(f"wrote {out / 'report.html'}, {out / 'results.json'} and PNG plots")


@app.command()
def temporal(
    model: ModelArg = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    categories: Annotated[
        str | None, typer.Option(help="comma-separated category keys, e.g. presidents,ceo,roman (default: all)")
    ] = None,
    data: Annotated[
        list[Path] | None, typer.Option(help="category files or directories in the paper's format (repeatable)")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="EAP-IG steps (default 100; --quick: 5)")] = None,
    schedule: Annotated[
        str, typer.Option(help="EAP-IG schedule: paper (k=1..steps) or upstream (k=0..steps-1)")
    ] = "paper",
    top: Annotated[int, typer.Option(help="edges per circuit, by |score| (capped at the graph's)")] = 5000,
    ratio: Annotated[float, typer.Option(help="a node is major in >= ceil(ratio n) of a group's n circuits")] = 0.9,
    years: Annotated[int | None, typer.Option(help="only the first N years of each temporal category")] = None,
    max_pairs: Annotated[int | None, typer.Option(help="at most N pairs per circuit (default: all)")] = None,
    samples: Annotated[int | None, typer.Option(help="at most N samples per category for recall and ablation")] = None,
    edits: Annotated[Path | None, typer.Option(help="JSONL of edit experiments (default: the paper's 15)")] = None,
    no_edit: Annotated[bool, typer.Option("--no-edit", help="skip the value-editing sweep")] = False,
    sample: Annotated[bool, typer.Option(help="sample when generating edits (default: greedy)")] = False,
    seed: Annotated[int, typer.Option(help="seed for --sample")] = 42,
    max_new_tokens: Annotated[int, typer.Option(help="tokens generated per edit (the trigger window)")] = 50,
    corpus: Annotated[
        str, typer.Option(help="perplexity corpus: wikitext2, a text or JSONL file, or none")
    ] = "wikitext2",
    no_bos: Annotated[bool, typer.Option("--no-bos", help="do not prepend BOS (the paper's code does)")] = False,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/temporal"),
    quick: Annotated[bool, typer.Option(help="a small run: 2 categories, 2 years, 2 pairs, 5 steps, 1 edit")] = False,
) -> None:
    """Temporal Heads (Park et al., ACL 2025): recall, circuits per year, temporal heads, ablation, lens, editing."""
    from lmscope.temporal.data import select_categories
    from lmscope.temporal.edit import load_experiments
    from lmscope.temporal.workflow import QUICK, QUICK_CATEGORIES, TemporalSettings, run_study

    keys = [k.strip() for k in categories.split(",") if k.strip()] if categories else None
    if keys is None and quick and not data:
        keys = list(QUICK_CATEGORIES)
    chosen, problems = select_categories(keys, data or None)
    if edits is not None:
        load_experiments(edits)  # bad experiments fail before the model loads
    base = QUICK if quick else TemporalSettings()
    changes = {
        "schedule": schedule, "top": top, "ratio": ratio, "sample": sample, "seed": seed,
        "max_new_tokens": max_new_tokens, "bos": not no_bos, "edit": not no_edit,
        "corpus": None if corpus == "none" else corpus, "edits": str(edits) if edits else None,
    }  # fmt: skip
    for key, value in (("steps", steps), ("years", years), ("max_pairs", max_pairs), ("recall_samples", samples)):
        if value is not None:
            changes[key] = value
    settings = replace(base, **changes)
    for problem in problems:
        err.print(f"skipped: {problem}", soft_wrap=True, highlight=False)
    out = output_dir(out)
    m = _load(model, device, dtype, max_memory, offload_folder)
    study = run_study(m, chosen, out, settings, name=model, problems=problems)
    _print_study(m.name, study)
    console.print(f"wrote {out / 'report.html'}, {out / 'results.json'}, graph_*.json and PNG plots")


def _print_study(name: str, study) -> None:
    recall_table = Table("category", "kind", "n", "accuracy", "p(gold)", "chance", title=f"{name}: recall")
    for row in study.results["recall"].tables()[0].rows:
        cells = [row["category"], row["kind"], str(row["n"])]
        recall_table.add_row(*cells, *(f"{row[k]:.3f}" for k in ("accuracy", "gold probability", "chance")))
    console.print(recall_table)
    for key in ("recall", "circuits", "heads", "ablation", "edit"):
        text = study.results[key].text()
        if text:
            console.print(f"{key}: {text}", highlight=False)


@app.command()
def locate(
    model: ModelArg = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    data: DataOpt = None,
    task: TaskOpt = None,
    n: PairsOpt = None,
    method: Annotated[str, typer.Option(help="exact, attribution or eap-ig")] = "exact",
    level: Annotated[
        str, typer.Option(help="head, layer (attention and MLP), position (residual) or expert (mixture-of-experts)")
    ] = "head",
    metric: MetricOpt = "logit_diff",
    direction: Annotated[str, typer.Option(help="denoising or noising (exact only)")] = "denoising",
    steps: Annotated[int, typer.Option(help="EAP-IG interpolation steps")] = 100,
    align: AlignOpt = "strict",
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/locate"),
    top: Annotated[int, typer.Option(help="rows to print")] = 10,
) -> None:
    """Find where a behaviour lives: patch or attribute every head, layer or position."""
    from lmscope.circuits.locate import locate as run_locate
    from lmscope.circuits.pairs import tokenize_pairs
    from lmscope.circuits.tasks import pairs_for

    out = output_dir(out)
    m = _load(model, device, dtype, max_memory, offload_folder)
    pairs = tokenize_pairs(m, pairs_for(m, data, task, n), align)
    budget = _budget(m, max_memory)
    with PeakMemory(m.device) as peak:
        results = run_locate(m, pairs, method, level, metric, steps, direction, max_memory=budget)
    settings = {
        "data": str(data) if data else None,
        "task": task,
        "n_pairs": len(pairs),
        "method": method,
        "level": level,
        "metric": metric,
        "direction": direction,
        "steps": steps,
        "align": align,
    }
    payload = {
        **header("locate", model, m, settings),
        "metric": {"name": metric, "clean": results[0].clean, "corrupt": results[0].corrupt},
        "memory": _memory_record(m, budget, peak),
        "results": [r.to_json() for r in results],
    }
    save(out, payload, [figure for r in results for figure in r.figures()])
    table = Table(
        "component",
        "layer",
        "expert" if level == "expert" else "head",
        "position",
        "score",
        title=f"{method} on {len(pairs)} pairs: clean {results[0].clean:.3f}, corrupt {results[0].corrupt:.3f}",
    )
    rows = sorted(
        (dict(row, component=r.component) for r in results for row in r.rows()), key=lambda row: -abs(row["score"])
    )[:top]
    for row in rows:
        table.add_row(
            row["component"],
            str(row["layer"]),
            _dash(row.get("expert", row["head"])),
            _dash(row["position"]),
            f"{row['score']:+.4f}",
        )
    console.print(table)
    console.print(f"wrote {out / 'results.json'} and plots")


# The command's earlier name.
app.command("patch", hidden=True, help="The earlier name of `lmscope locate`.")(locate)


def _dash(value) -> str:
    return "-" if value is None else str(value)


@app.command()
def circuit(
    model: ModelArg = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    data: DataOpt = None,
    task: TaskOpt = None,
    n: PairsOpt = None,
    top: Annotated[int | None, typer.Option(help="keep the top N edges by |score|")] = None,
    threshold: Annotated[float | None, typer.Option(help="keep edges with |score| >= X")] = None,
    metric: MetricOpt = "logit_diff",
    steps: Annotated[int, typer.Option(help="EAP-IG interpolation steps (1: plain EAP)")] = 100,
    align: AlignOpt = "strict",
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/circuit"),
) -> None:
    """EAP-IG edge scores, a pruned circuit, its faithfulness and CRS, as JSON and a drawing."""
    from lmscope.circuits import draw, edge_attribution, faithfulness, select
    from lmscope.circuits.pairs import tokenize_pairs
    from lmscope.circuits.tasks import pairs_for

    if (top is None) == (threshold is None):
        raise LmscopeError("give exactly one of --top N or --threshold X")
    out = output_dir(out)
    m = _load(model, device, dtype, max_memory, offload_folder)
    pairs = tokenize_pairs(m, pairs_for(m, data, task, n), align)
    budget = _budget(m, max_memory)
    with PeakMemory(m.device) as peak:
        scores = edge_attribution(m, pairs, metric, steps, max_memory=budget)
    chosen = select(scores, top=top, threshold=threshold)
    faith = faithfulness(m, pairs, chosen, metric)
    settings = {
        "data": str(data) if data else None,
        "task": task,
        "n_pairs": len(pairs),
        "top": top,
        "threshold": threshold,
        "metric": metric,
        "steps": steps,
        "align": align,
    }
    graph = {**chosen.to_json(), "metric": metric, "faithfulness": faith.to_json()}
    write_json(out / "graph.json", graph)
    payload = {
        **header("circuit", model, m, settings),
        "metric": {"name": metric, "clean": scores.clean, "corrupt": scores.corrupt},
        "memory": _memory_record(m, budget, peak),
        "faithfulness": faith.to_json(),
        "circuit": graph,
        "edges": [{"from": u, "to": v, "score": s} for u, v, s in scores.edges()],
    }
    save(out, payload)
    draw(chosen, out / "circuit.png", f"{m.name}: {len(chosen.edges)} edges, CRS {faith.crs:.1f}")
    table = Table("from", "to", "score", title=f"circuit: {len(chosen.edges)} edges, {len(chosen.nodes)} nodes")
    for u, v, score in sorted(chosen.edges, key=lambda e: -abs(e[2]))[:15]:
        table.add_row(u, v, f"{score:+.4f}")
    console.print(table)
    console.print(
        f"full model B = {faith.baseline:.3f}, circuit C = {faith.circuit:.3f}, corrupted = {faith.corrupt:.3f}: "
        f"faithfulness {faith.normalised:.3f}, CRS {faith.crs:.1f}"
    )
    console.print(f"wrote {out / 'results.json'}, {out / 'graph.json'} and {out / 'circuit.png'}")


@app.command()
def heads(
    model: ModelArg = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/heads"),
    length: Annotated[int, typer.Option(help="length of the repeated random sequence")] = 30,
    batch: Annotated[int, typer.Option(help="number of sequences")] = 8,
) -> None:
    """Induction, previous-token and duplicate-token scores of every head."""
    from lmscope.circuits.head_roles import ROLES, head_roles

    out = output_dir(out)
    m = _load(model, device, dtype, max_memory, offload_folder)
    roles = head_roles(m, batch=batch, length=length, loss=True)
    payload = {**header("heads", model, m, {"length": length, "batch": batch}), **roles.to_json()}
    # the PNGs keep this command's names: induction.png, ... (the scan's are heads_induction.png, ...)
    save(out, payload, [replace(f, name=f.name.removeprefix("heads_")) for f in roles.figures()])
    table = Table("role", "top heads (layer.head: score)", title=f"{m.name}: head roles")
    for role in ROLES:
        table.add_row(role, ", ".join(f"{layer}.{head}: {score:.2f}" for layer, head, score in roles.top(role)))
    console.print(table)
    first, second = roles.repeated_loss
    console.print(f"repeated random tokens: loss {first:.2f} on the first half, {second:.2f} on the second")
    console.print(f"wrote {out / 'results.json'} and plots")


CorpusOpt = Annotated[str, typer.Option(help="text or JSONL file, or the bundled 'wikitext2' (test split)")]
WindowOpt = Annotated[int, typer.Option(help="tokens per window")]


@app.command()
def outliers(
    model: ModelArg = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    corpus: CorpusOpt = "wikitext2",
    tokens: Annotated[int, typer.Option(help="number of corpus tokens")] = 4096,
    window: WindowOpt = 512,
    osp_protocol: Annotated[bool, typer.Option(help="OSP's protocol: every token as its own sequence")] = False,
    site: Annotated[list[str], typer.Option("--site", help="another site to measure (repeatable)")] = [],  # noqa: B006
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/outliers"),
) -> None:
    """Activation outliers: OSP excess kurtosis per hidden state, max |x|, massive activations."""
    from lmscope.quant.corpus import load_corpus
    from lmscope.quant.outliers import activation_stats, residual_sites, site_label

    for name in site:
        parse_site(name)  # a misspelt site fails before the model loads
    out = output_dir(out)
    m = _load(model, device, dtype, max_memory, offload_folder)
    for name in site:
        m.site(name)
    text = load_corpus(m, corpus, max_tokens=tokens)
    protocol = "osp" if osp_protocol else "in-context"
    sites = residual_sites(m.n_layers) + [s for s in site if s not in residual_sites(m.n_layers)]
    summary = activation_stats(m, text, sites=sites, protocol=protocol, window=window).summary(m.tokenizer)
    payload = header("outliers", model, m, {"corpus": corpus, "tokens": len(text), "window": window})
    payload["outliers"] = summary.to_json()
    save(out, payload, summary.figures())
    table = Table("hidden state", "OSP kurtosis", "max |x|", "channel", "median |x|", title=f"{m.name}: outliers")
    for name, row in summary.sites.items():
        table.add_row(
            site_label(name),
            f"{row['osp_kurtosis']:.2f}",
            f"{row['max_abs']:.4g}",
            str(row["max_abs_channel"]),
            f"{row['median_abs']:.3g}",
        )
    console.print(table)
    channels = sorted({row["channel"] for row in summary.massive})
    console.print(f"OSP excess kurtosis ({protocol}, {len(text)} tokens): {summary.osp_kurtosis:.2f}")
    console.print(f"massive activations (|x| > 100 and > 1000 x median): channels {channels or 'none'}")
    console.print(f"wrote {out / 'results.json'} and plots")


@app.command()
def kv(
    model: ModelArg = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    corpus: CorpusOpt = "wikitext2",
    tokens: Annotated[int, typer.Option(help="number of corpus tokens")] = 2048,
    window: WindowOpt = 512,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/kv"),
) -> None:
    """Key vs value norms and singular-value spectra per layer and KV head, and W_k / W_v norms."""
    from lmscope.quant.corpus import load_corpus
    from lmscope.quant.kv import kv_norms

    out = output_dir(out)
    m = _load(model, device, dtype, max_memory, offload_folder)
    text = load_corpus(m, corpus, max_tokens=tokens)
    norms = kv_norms(m, text, window=window)
    payload = {**header("kv", model, m, {"corpus": corpus, "tokens": len(text), "window": window}), **norms.to_json()}
    save(out, payload, norms.figures())
    table = Table(
        "layer", "|K|_F", "|V|_F", "K/V", "|K|_2", "|V|_2", "|W_k|_F", "|W_v|_F", title=f"{m.name}: keys vs values"
    )
    for row in norms.tables()[0].rows:
        cells = [f"{row[c]:.4g}" for c in ("|K|_F", "|V|_F", "|K|_2", "|V|_2", "|W_k|_F", "|W_v|_F")]
        ratio = f"{row['K/V']:.2f}" if row["K/V"] is not None else "-"
        table.add_row(str(row["layer"]), *cells[:2], ratio, *cells[2:])
    console.print(table)
    console.print(f"wrote {out / 'results.json'} and plots")


@app.command()
def quant(
    model: ModelArg = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    kv_specs: Annotated[
        str, typer.Option("--kv", help="comma-separated KV settings, e.g. k4v2,k2v4,k4v4")
    ] = "k8v8,k4v4,k4v2,k2v4,k2v2",
    weights: Annotated[int | None, typer.Option(help="weight bits (symmetric per channel)")] = None,
    weight_group: Annotated[int | None, typer.Option(help="weight group size (inputs)")] = None,
    acts: Annotated[int | None, typer.Option(help="activation bits (per token, inputs of linear layers)")] = None,
    budget: Annotated[float | None, typer.Option(help="average KV bits: add per-layer allocations")] = None,
    group: Annotated[int, typer.Option(help="KV group size (channels per token, or tokens per channel)")] = 64,
    k_axis: Annotated[str, typer.Option(help="key quantisation axis: token or channel")] = "token",
    v_axis: Annotated[str, typer.Option(help="value quantisation axis: token or channel")] = "token",
    kv_window: Annotated[int, typer.Option(help="most recent tokens kept in full precision")] = 0,
    scheme: Annotated[
        str, typer.Option(help="minmax (the settings above) or osp: Outlier-Safe Pre-Training's W/A/KV setting")
    ] = "minmax",
    bits: Annotated[int, typer.Option(help="--scheme osp: bits of weights, activations, keys and values")] = 4,
    rotate: Annotated[bool, typer.Option(help="add each quantised setting with a Hadamard rotation fused in")] = False,
    rotation: Annotated[
        str, typer.Option(help="--rotate: quarot (residual stream, heads, MLP) or ffn (MLP only, OSP's FFN Had)")
    ] = "quarot",
    corpus: CorpusOpt = "wikitext2",
    tokens: Annotated[int, typer.Option(help="number of corpus tokens")] = 4096,
    window: WindowOpt = 512,
    stride: Annotated[int | None, typer.Option(help="perplexity window stride (default: the window)")] = None,
    choices: Annotated[Path | None, typer.Option(help="multiple-choice JSONL: context, choices, answer")] = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/quant"),
) -> None:
    """Perplexity (and multiple-choice accuracy) under simulated KV / weight / activation quantisation."""
    from lmscope.quant.configs import QuantConfigs, parse_kv_specs, quant_configs
    from lmscope.quant.corpus import load_corpus
    from lmscope.quant.evaluation import QuantTable, load_choices, quant_table
    from lmscope.quant.fake import QuantConfig
    from lmscope.quant.rotation import check

    options = {"group_size": group, "k_axis": k_axis, "v_axis": v_axis, "window": kv_window}
    kv_configs = parse_kv_specs(kv_specs, **options)  # bad specs fail before the model loads
    QuantConfig(scheme=scheme, rotation=rotation)  # a bad --scheme or --rotation fails before the model loads
    osp = [QuantConfig.osp(bits)] if scheme == "osp" else []
    items = load_choices(choices) if choices is not None else None
    out = output_dir(out)
    m = _load(model, device, dtype, max_memory, offload_folder)
    if rotate:
        check(m, rotation)
    text = load_corpus(m, corpus, max_tokens=tokens)
    wa = {"weight_bits": weights, "weight_group": weight_group, "act_bits": acts}
    kv_options = {"group_size": group, "k_axis": k_axis, "v_axis": v_axis, "kv_window": kv_window}
    if osp:  # OSP's setting replaces the KV / weight / activation settings
        plan = QuantConfigs([QuantConfig(), *osp])
    else:
        plan = quant_configs(m, kv_configs, **wa, budget=budget, corpus=text, window=window, **kv_options)
    if rotate:
        plan.configs += [replace(config, rotation=rotation) for config in plan.configs[1:]]
    settings = {"corpus": corpus, "tokens": len(text), "window": window, "stride": stride, "kv": options}
    settings.update(
        budget=budget, **wa, scheme=scheme, bits=bits if osp else None, rotation=rotation if rotate else None
    )
    payload = {**header("quant", model, m, settings), **plan.to_json()}

    def on_row(partial: QuantTable) -> None:  # results.json after every row, the plot once all are done
        complete = len(partial.rows) == len(plan.configs)
        save(out, {**payload, **partial.to_json()}, partial.figures() if complete else [])

    result = quant_table(m, text, plan.configs, window=window, stride=stride, choices=items, on_row=on_row)
    table = Table("config", "K bits", "V bits", "perplexity", "change", title=f"{m.name}: simulated quantisation")
    if items:
        table.add_column("accuracy")
    for row in result.rows:
        cells = [row["config"], _bits(row["k_bits"]), _bits(row["v_bits"]), f"{row['perplexity']:.3f}"]
        cells.append(f"{row['delta_perplexity']:+.3f}")
        if items:
            cells.append(f"{row['accuracy']:.3f}")
        table.add_row(*cells)
    console.print(table)
    console.print(f"wrote {out / 'results.json'} and plots")


@app.command()
def experts(
    model: ModelArg = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    corpus: Annotated[
        list[str] | None,
        typer.Option(help="a domain: text or JSONL file, or 'wikitext2' (repeatable; default wikitext2)"),
    ] = None,
    tokens: Annotated[int, typer.Option(help="tokens per corpus")] = 8192,
    window: WindowOpt = 256,
    batch_size: Annotated[int, typer.Option(help="windows per forward")] = 4,
    top: Annotated[int, typer.Option(help="top-activating tokens kept per expert")] = 5,
    resect: Annotated[int | None, typer.Option(help="remove each domain's N most specialised experts")] = None,
    draws: Annotated[int, typer.Option(help="random resections to compare with (averaged)")] = 3,
    seed: Annotated[int, typer.Option(help="seed of the random resections")] = 0,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/experts"),
) -> None:
    """Which experts do what: load, routing entropy, co-activation, top tokens, domain specialisation, resection."""
    from lmscope.experts import ExpertStats, Resection, expert_stats, moe_layers
    from lmscope.experts import resection as run_resection
    from lmscope.quant.corpus import load_corpus
    from lmscope.reports.report import PartWriter

    sources = corpus or ["wikitext2"]
    if resect is not None and len(sources) < 2:
        raise LmscopeError("--resect needs at least two --corpus domains (experts specialised to one of them)")
    if resect is not None and resect < 1:
        raise LmscopeError(f"--resect must be at least 1 (got {resect})")
    out = output_dir(out)
    m = _load(model, device, dtype, max_memory, offload_folder)
    moe_layers(m)  # a dense model fails before any corpus is read
    corpora = [load_corpus(m, source, max_tokens=tokens) for source in sources]
    settings = {"corpora": sources, "tokens": [len(c) for c in corpora], "window": window, "top": top}
    settings.update(resect=resect, draws=draws, seed=seed)
    payload = {**header("experts", model, m, settings), "model_name": model}
    earlier = _earlier_parts(out, payload)  # an interrupted run with the same settings resumes
    writer = PartWriter(out, f"lmscope experts: {model}", payload, planned=1 if resect is None else 2)
    options = {"window": window, "batch_size": batch_size}
    if "routing" in earlier:
        stats = ExpertStats.from_json(earlier["routing"])
        err.print(f"read back the routing statistics from {out / 'results.json'}")
    else:
        stats = expert_stats(m, corpora, top=top, **options)
    writer.add("routing", "Expert routing", "Load, routing entropy, co-activation and top tokens per expert.", stats)
    table = Table("layer", "balance", "busiest expert", "its load", title=f"{m.name}: expert routing")
    for row in stats.tables()[0].rows:
        table.add_row(str(row["layer"]), f"{row['balance']:.3f}", str(row["busiest expert"]), f"{row['its load']:.3f}")
    console.print(table)
    if resect is not None:
        description = (
            f"Each domain's {resect} most specialised experts removed (routing weight 0), against {resect} random "
            f"experts ({draws} draws); mean next-token loss per domain."
        )
        before = Resection.from_json(earlier["resection"]) if "resection" in earlier else None
        save_row = lambda r: writer.update("resection", r)
        result = run_resection(
            m, corpora, stats, resect, draws=draws, seed=seed, on_row=save_row, earlier=before, **options
        )
        writer.add("resection", "Expert resection", description, result)
        table = Table("removed", *(f"Δ loss {d}" for d in stats.domains), title=f"{m.name}: expert resection")
        for row in result.tables()[0].rows[1:]:
            table.add_row(row["removed"], *(f"{row[f'change {d}']:+.3f}" for d in stats.domains))
        console.print(table)
    console.print(f"wrote {out / 'report.html'}, {out / 'results.json'} and PNG plots")


@app.command()
def lens(
    args: Annotated[list[str], typer.Argument(help="[MODEL] TEXT", show_default=False)],
    tuned: Annotated[Path | None, typer.Option(help="a tuned lens saved by --train-tuned --save")] = None,
    train_tuned: Annotated[bool, typer.Option(help="train a tuned lens on --corpus first")] = False,
    corpus: CorpusOpt = "wikitext2",
    tokens: Annotated[int, typer.Option(help="corpus tokens for --train-tuned")] = 8192,
    steps: Annotated[int, typer.Option(help="Adam steps for --train-tuned")] = 100,
    lr: Annotated[float, typer.Option(help="learning rate for --train-tuned")] = 1e-3,
    save_tuned: Annotated[Path | None, typer.Option("--save", help="write the trained tuned lens here")] = None,
    token: Annotated[
        list[str], typer.Option("--token", help="a token to follow instead of the next (repeatable)")
    ] = [],  # noqa: B006
    position: Annotated[int, typer.Option(help="position of the top-token table (-1: last)")] = -1,
    top: Annotated[int, typer.Option(help="top tokens per layer")] = 5,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/lens"),
) -> None:
    """Logit lens, or tuned lens (Belrose et al. 2023), of TEXT: per layer and position, the next token's
    probability and rank, and the top tokens per layer."""
    from lmscope.circuits.lenses import lens as read_lens
    from lmscope.circuits.lenses import load_tuned_lens, train_tuned_lens
    from lmscope.quant.corpus import BUNDLED, load_corpus

    if len(args) > 2:
        raise LmscopeError("expected [MODEL] TEXT (quote the text)")
    if tuned is not None and train_tuned:
        raise LmscopeError("give --tuned PATH or --train-tuned, not both")
    if save_tuned is not None and not train_tuned:
        raise LmscopeError("--save writes a lens trained with --train-tuned")
    if tuned is not None and not tuned.is_file():
        raise LmscopeError(f"tuned lens {tuned}: no such file")
    if train_tuned and corpus not in BUNDLED and not Path(corpus).is_file():
        raise LmscopeError(f"corpus {corpus}: no such file")
    model, text = (DEFAULT_MODEL, args[0]) if len(args) == 1 else args
    out = output_dir(out)
    m = _load(model, device, dtype, max_memory, offload_folder)
    settings: dict = {"text": text, "tokens": token, "position": position, "top": top}
    lens_obj = None
    if tuned is not None:
        lens_obj = load_tuned_lens(m, tuned)
        settings["tuned"] = str(tuned)
    elif train_tuned:
        ids = load_corpus(m, corpus, max_tokens=tokens).tokens
        lens_obj = train_tuned_lens(m, ids, steps=steps, lr=lr)
        settings["train_tuned"] = {"corpus": corpus, **lens_obj.info}
        if save_tuned is not None:
            console.print(f"saved the tuned lens to {lens_obj.save(save_tuned)}")
    result = read_lens(m, text, tuned=lens_obj, tokens=token or None, position=position, top_k=top)
    payload = header("lens", model, m, settings)
    payload["lens"] = result.to_json()
    save(out, payload, result.figures())
    table = Table("layer", "KL", "top tokens", title=f"{m.name}: {result.lens} lens at position {result.position}")
    for row in result.tables()[1].rows:
        table.add_row(row["layer"], f"{row['KL']:.3f}", row["top tokens"])
    console.print(table)
    console.print(result.text(), soft_wrap=True, highlight=False, markup=False)
    console.print(f"wrote {out / 'results.json'} and plots")


def _float_list(spec: str, name: str) -> list[float]:
    try:
        return [float(x) for x in spec.split(",")]
    except ValueError:
        raise LmscopeError(f"--{name}: expected comma-separated numbers, got {spec!r}") from None


def _int_list(spec: str | None, name: str) -> list[int] | None:
    try:
        return None if spec is None else [int(x) for x in spec.split(",")]
    except ValueError:
        raise LmscopeError(f"--{name}: expected comma-separated integers, got {spec!r}") from None


@app.command()
def probe(
    model: ModelArg = DEFAULT_MODEL,
    data: Annotated[
        Path, typer.Option(help="JSONL: {text, label} or contrastive {positive, negative[, prompt]}")
    ] = ...,
    layers: Annotated[str | None, typer.Option(help="comma-separated layers (default: all)")] = None,
    site: Annotated[str, typer.Option(help="per-layer site, e.g. resid_post, resid_mid, attn.out")] = "resid_post",
    position: Annotated[str, typer.Option(help="last, mean, or span ([[marked]] in each text)")] = "last",
    test_fraction: Annotated[float, typer.Option(help="held-out fraction (pairs kept together)")] = 0.25,
    seed: Annotated[int, typer.Option(help="split seed")] = 0,
    save_to: Annotated[Path | None, typer.Option("--save", help="write the directions (safetensors)")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/probe"),
) -> None:
    """Difference-of-means, first-principal-component and logistic-regression probes per layer, with
    held-out accuracy per layer."""
    from lmscope.steering.directions import load_examples
    from lmscope.steering.directions import probe as fit_probes
    from lmscope.steering.store import save as save_tensors

    examples = load_examples(data)
    chosen = _int_list(layers, "layers")
    out = output_dir(out)
    m = _load(model, device, dtype, None, None)
    result = fit_probes(m, examples, chosen, site=site, position=position, test_fraction=test_fraction, seed=seed)
    payload = header("probe", model, m, {"data": str(data), "site": site, "position": position, "seed": seed})
    save(out, {**payload, "probe": result.to_json()}, result.figures())
    if save_to is not None:
        tensors = {
            f"{method}.{layer}": d[i]
            for method, d in result.directions.items()
            for i, layer in enumerate(result.layers)
        }
        meta = {"model": m.name, "site": site, "method": "probe", "position": position, "data": result.data}
        console.print(f"saved directions to {save_tensors(save_to, tensors, layers=result.layers, **meta)}")
    table = Table("layer", *result.accuracy, title=f"{m.name}: held-out accuracy ({site}, {position})")
    for row in result.tables()[0].rows:
        table.add_row(str(row["layer"]), *(f"{row[k]:.3f}" for k in result.accuracy))
    console.print(table)
    console.print(result.text(), highlight=False, markup=False)
    console.print(f"wrote {out / 'results.json'} and plots")


@app.command()
def steer(
    model: ModelArg = DEFAULT_MODEL,
    pairs: Annotated[Path, typer.Option(help="contrastive pairs (JSONL: positive, negative[, prompt])")] = ...,
    eval_file: Annotated[Path, typer.Option("--eval", help="JSONL: prompt, target[, opposite]")] = ...,
    layers: Annotated[str | None, typer.Option(help="settings' layers, e.g. 6,9,12+15 (+ joins)")] = None,
    coeffs: Annotated[str, typer.Option(help="comma-separated coefficients")] = "1,2,4,8",
    instruction: Annotated[str, typer.Option(help="the prompting baseline's prefix")] = "",
    neutral: Annotated[Path | None, typer.Option(help="neutral prompts, one per line (default: bundled)")] = None,
    windows: Annotated[int, typer.Option(help="WikiText-2 windows for perplexity")] = 4,
    window: WindowOpt = 64,
    position: Annotated[str, typer.Option(help="where the vector is read: last, mean or span")] = "last",
    max_kl: Annotated[float, typer.Option(help="choice: largest KL to unsteered allowed")] = 0.2,
    max_ppl_rise: Annotated[float, typer.Option(help="choice: largest relative perplexity rise")] = 0.1,
    samples: Annotated[int, typer.Option(help="prompts with sample generations")] = 3,
    lineas: Annotated[bool, typer.Option(help="also learn LinEAS maps (negatives -> positives, unpaired)")] = False,
    lineas_steps: Annotated[int, typer.Option(help="LinEAS Adam steps")] = 100,
    lineas_strengths: Annotated[str, typer.Option(help="LinEAS strengths to sweep")] = "0.5,1",
    lineas_sparsity: Annotated[float, typer.Option(help="LinEAS group-sparsity weight")] = 1e-3,
    save_to: Annotated[Path | None, typer.Option("--save", help="write the vectors (safetensors)")] = None,
    gguf: Annotated[Path | None, typer.Option(help="write the chosen setting as a llama.cpp control vector")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/steer"),
) -> None:
    """Steering vectors (contrastive activation addition) swept over layers x coefficients, with behaviour,
    side effects (KL on neutral prompts, perplexity) and a prompting baseline side by side; with --lineas,
    LinEAS maps (Rodriguez et al. 2025) learned from the same examples, in the same table."""
    from lmscope.quant.corpus import load_corpus
    from lmscope.reports.report import PartWriter
    from lmscope.steering.directions import load_examples
    from lmscope.steering.lineas import METHOD, train_lineas
    from lmscope.steering.steer import (
        Setting,
        SweepData,
        caa,
        combined,
        load_eval,
        neutral_prompts,
        parse_layers,
        steering_vectors,
        sweep,
    )
    from lmscope.steering.store import export_control_vector, save_vectors

    examples, items, texts = load_examples(pairs), load_eval(eval_file), neutral_prompts(neutral)
    values, strengths = _float_list(coeffs, "coeffs"), _float_list(lineas_strengths, "lineas-strengths")
    out = output_dir(out)
    m = _load(model, device, dtype, None, None)
    n = m.n_layers
    groups = (
        parse_layers(layers, n) if layers else [(layer,) for layer in range(n // 4, 3 * n // 4 + 1, max(1, n // 8))]
    )
    settings = [Setting(g, c) for g in groups for c in values]
    vectors = steering_vectors(m, examples, sorted({layer for g in groups for layer in g}), position=position)
    corpus = load_corpus(m, "wikitext2", max_tokens=windows * window) if windows else None
    data = SweepData(items, texts, [w.tolist() for w in corpus.windows(window)] if corpus else [])
    steerer = caa(vectors)
    if lineas:
        texts = {y: [t for t, label in zip(examples.texts, examples.labels, strict=True) if label == y] for y in (0, 1)}
        transport = train_lineas(m, texts[0], texts[1], steps=lineas_steps, sparsity=lineas_sparsity, position=position)
        console.print(f"LinEAS: {len(transport.active())} of {m.n_layers} layers active")
        settings += [transport.setting(v) for v in strengths]
        steerer = combined({"": steerer, METHOD: transport.steerer()})
        if save_to is not None:
            console.print(f"saved the LinEAS maps to {transport.save(out / 'lineas.safetensors', model=m.name)}")
    start = time.perf_counter()
    result = sweep(
        m, steerer, settings, data, instruction=instruction, max_kl=max_kl, max_ppl_rise=max_ppl_rise, samples=samples
    )
    options = {"pairs": str(pairs), "eval": str(eval_file), "instruction": instruction, "position": position}
    payload = header("steer", model, m, {**options, "windows": windows, "window": window, "data": examples.source})
    writer = PartWriter(out, f"lmscope steer: {model}", payload, planned=1)
    what = "Contrastive activation addition vs a prompting baseline."
    writer.add("steer", "Steering sweep", what, result, time.perf_counter() - start)
    if save_to is not None:
        meta = {
            "model": m.name,
            "site": "resid_post",
            "method": "mean_diff",
            "position": position,
            "data": examples.source,
        }
        console.print(f"saved vectors to {save_vectors(save_to, vectors, **meta)}")
    if gguf is not None and result.chosen is not None and not result.chosen.startswith(METHOD):
        setting = next(s for s in settings if s.name == result.chosen)
        chosen = {layer: setting.coeff * vectors[layer] for layer in setting.layers}
        console.print(f"saved the chosen setting to {export_control_vector(gguf, chosen, m.hf.config.model_type)}")
    table = Table("setting", "behaviour", "p(target)", "KL", "perplexity", title=f"{m.name}: steering sweep")
    for row in result.rows:
        p, ppl = row["p_target"], row["perplexity"]
        cells = [
            f"{row['behaviour']:+.3f}",
            "-" if p is None else f"{p:.3f}",
            f"{row['kl']:.3f}",
            "-" if ppl is None else f"{ppl:.2f}",
        ]
        table.add_row(row["setting"] + (" *" if row["setting"] == result.chosen else ""), *cells)
    console.print(table)
    console.print(result.text(), highlight=False, markup=False, soft_wrap=True)
    console.print(f"wrote {out / 'results.json'}, {out / 'report.html'} and plots")


@app.command()
def pretrain(
    recipe: Annotated[
        str, typer.Option(help="adam, muon, muon-all, osp (Muon + SSNorm + EmbProj), osp-ssnorm or osp-embproj")
    ] = "osp",
    compare: Annotated[
        str | None, typer.Option(help="recipes to train side by side with the same data and seed, e.g. adam,muon,osp")
    ] = None,
    corpus: Annotated[
        str, typer.Option(help="training text: text or JSONL file, or 'wikitext2' (the bundled validation split)")
    ] = "wikitext2",
    eval_corpus: Annotated[
        str, typer.Option(help="evaluation text: text or JSONL file, or 'wikitext2' (the bundled test split)")
    ] = "wikitext2",
    tokenizer: Annotated[str, typer.Option(help="model whose tokenizer to use (SmolLM2's by default)")] = DEFAULT_MODEL,
    layers: Annotated[int, typer.Option(help="decoder layers")] = 4,
    d_model: Annotated[int, typer.Option(help="hidden size")] = 128,
    heads: Annotated[int, typer.Option(help="attention heads")] = 2,
    seq_len: Annotated[int, typer.Option(help="tokens per training window (and evaluation window)")] = 128,
    batch_size: Annotated[int, typer.Option(help="windows per step")] = 8,
    steps: Annotated[int, typer.Option(help="training steps")] = 300,
    lr: Annotated[float, typer.Option(help="peak learning rate (AdamW)")] = 3e-3,
    muon_lr: Annotated[float | None, typer.Option(help="peak learning rate of Muon (default: --lr)")] = None,
    weight_decay: Annotated[float, typer.Option(help="decoupled weight decay of the matrices")] = 0.1,
    warmup: Annotated[int | None, typer.Option(help="warm-up steps (default: 10% of --steps)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the initialisation and the data order")] = 0,
    log_every: Annotated[int, typer.Option(help="log the loss and OSP kurtosis every N steps")] = 25,
    checkpoint_every: Annotated[int, typer.Option(help="write a checkpoint every N steps")] = 100,
    train_tokens: Annotated[int | None, typer.Option(help="use only the first N training tokens")] = None,
    eval_tokens: Annotated[int, typer.Option(help="evaluation tokens (perplexity, massive activations)")] = 16384,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out from its checkpoints")] = False,
    device: DeviceOpt = "auto",
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/pretrain"),
) -> None:
    """Pre-train a small Llama from scratch with Adam, Muon or Outlier-Safe Pre-Training (Park et al.
    2025); --compare trains several recipes: kurtosis over training, massive activations, perplexity
    in full precision and 4-bit (W4A4KV4) with and without rotation."""
    from lmscope.training import PretrainSettings, get_recipe, run_pretraining

    recipes = [r.strip() for r in compare.split(",") if r.strip()] if compare is not None else [recipe]
    for name in recipes:
        get_recipe(name)  # an unknown recipe fails before anything loads
    settings = PretrainSettings(
        d_model=d_model, n_layers=layers, n_heads=heads, seq_len=seq_len, batch_size=batch_size, steps=steps,
        lr=lr, muon_lr=muon_lr, weight_decay=weight_decay, warmup=warmup, seed=seed, log_every=log_every,
        checkpoint_every=checkpoint_every, corpus=corpus, eval_corpus=eval_corpus, tokenizer=tokenizer,
        train_tokens=train_tokens, eval_tokens=eval_tokens,
    )  # fmt: skip
    out = output_dir(out)
    result = run_pretraining(
        recipes, settings, out, resume=resume, device=device, earlier=lambda payload: _earlier_parts(out, payload)
    )
    table = Table(
        "recipe", "loss", "kurtosis", "max |x|", "massive", *result.schemes, "ms/step",
        title=f"pretrain: {settings.steps} steps of {settings.batch_size} x {settings.seq_len} tokens; "
        "final loss, OSP kurtosis, outliers, perplexity per setting",
    )  # fmt: skip
    for row in result.tables()[0].rows:
        cells = [row["final loss"], row["OSP kurtosis"], row["max |x|"], row["massive"]]
        cells += [row[f"ppl {s}"] for s in result.schemes] + [row["ms/step"]]
        table.add_row(row["recipe"], *(_number(v) for v in cells))
    console.print(table)
    console.print(
        f"wrote {out / 'report.html'}, {out / 'results.json'}, PNG plots and the models in {out}/<recipe>/model"
    )


def _earlier_parts(out: Path, payload: dict) -> dict:
    """The parts of ``out/results.json`` when it was written by the same command with the same
    settings (an interrupted run to resume), else nothing."""
    import json

    try:
        earlier = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    same = earlier.get("command") == payload["command"] and earlier.get("settings") == json.loads(
        json.dumps(payload["settings"])
    )
    return earlier.get("parts", {}) if same else {}


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _bits(value) -> str:
    return "fp" if value is None else f"{value:.3g}"


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning bad input into a one-line error and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    console.quiet = not distributed.is_main()  # under torchrun, rank 0 prints the tables
    try:
        app(args=argv, prog_name="lmscope")  # usage errors: typer prints them, exit code 2
    except LmscopeError as e:
        if debug:
            raise
        if distributed.is_main():  # under torchrun, one line for the whole run
            err.print(f"[red]error:[/red] {e}", soft_wrap=True, highlight=False)
        sys.exit(2)
    finally:
        distributed.shutdown()

"""The ``lmscope`` command: a thin shell over the Python API.

Bad input raises :class:`~lmscope.errors.LmscopeError`, which becomes a one-line
``error: ...`` on stderr and exit code 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lmscope import load
from lmscope.errors import LmscopeError
from lmscope.loading import ALIASES, DEFAULT_MODEL, cached_conversions
from lmscope.sites import parse_site

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
    pos: Annotated[int, typer.Option(help="sequence length for the shapes")] = 8,
    layer: Annotated[int | None, typer.Option(help="only this layer's sites")] = None,
) -> None:
    """Table of site names with their shapes (batch 1, --pos tokens)."""
    m = load(model)
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
) -> None:
    """Run TEXT through MODEL and print the shapes and norms of the captured sites."""
    if len(args) > 2:
        raise LmscopeError("expected [MODEL] TEXT (quote the text)")
    model, text = (DEFAULT_MODEL, args[0]) if len(args) == 1 else args
    for name in capture:
        parse_site(name)  # a misspelt site fails before the model loads
    m = load(model)
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
def scan(model: ModelArg = DEFAULT_MODEL) -> None:
    """Model card, site table and a capture summary of MODEL."""
    m = load(model)
    card = Table("", "", title="model card", show_header=False)
    for key, value in m.card().items():
        card.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(card)
    text = "The capital of France is Paris. When Mary and John went to the store, John gave a drink to"
    shapes = dict(m.site_shapes(batch=1, pos=len(m.tokenize(text)[0][0])))
    kinds = Table("site (layer 0 of each kind)", "shape", title=f"sites ({len(shapes)} in all)")
    for name, shape in shapes.items():
        if not name.startswith("blocks.") or name.startswith("blocks.0."):
            kinds.add_row(name.replace("blocks.0.", "blocks.{L}."), str(list(shape)))
    console.print(kinds)
    sites_ = [f"blocks.{L}.resid_post" for L in range(m.n_layers)]
    result = m.run(text, capture=sites_)
    summary = Table("layer", "resid_post norm/token", "max |x|", "channel of max", title=f"capture: {text!r}")
    for layer, name in enumerate(sites_):
        x = result.cache[name][0]
        channel = int(x.abs().amax(0).argmax())
        summary.add_row(str(layer), f"{x.norm(dim=-1).mean():.4g}", f"{x.abs().max():.4g}", str(channel))
    console.print(summary)
    console.print(f"next token: {m.tokenizer.decode(result.logits[0, -1].argmax())!r}")


def _pairs(m, data: Path | None, task: str | None, n: int | None):
    from lmscope import tasks

    if (data is None) == (task is None):
        raise LmscopeError("give exactly one of --data pairs.jsonl or --task ioi|induction|capitals")
    if data is not None:
        pairs = tasks.load_pairs(data)
    elif n is not None:
        if task not in tasks.GENERATORS:
            tasks.builtin(m, task)  # raises the unknown-task error
        pairs = tasks.GENERATORS[task](m, n=n)
    else:
        pairs = tasks.builtin(m, task)
    return pairs


@app.command()
def patch(
    model: ModelArg = DEFAULT_MODEL,
    data: DataOpt = None,
    task: TaskOpt = None,
    n: PairsOpt = None,
    method: Annotated[str, typer.Option(help="exact, attribution or eap-ig")] = "exact",
    level: Annotated[str, typer.Option(help="head, layer (attention and MLP) or position (residual)")] = "head",
    metric: MetricOpt = "logit_diff",
    direction: Annotated[str, typer.Option(help="denoising or noising (exact only)")] = "denoising",
    steps: Annotated[int, typer.Option(help="EAP-IG interpolation steps")] = 100,
    align: AlignOpt = "strict",
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/patch"),
    top: Annotated[int, typer.Option(help="rows to print")] = 10,
) -> None:
    """Find where a behaviour lives: patch or attribute every head, layer or position."""
    from lmscope.discovery import locate
    from lmscope.reports.plots import heatmap
    from lmscope.reports.results import output_dir, versions, write_json

    out = output_dir(out)
    m = load(model)
    pairs = _pairs(m, data, task, n)
    results = locate(m, pairs, method, level, metric, steps, direction, align)
    settings = {
        "model": model,
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
        "command": "patch",
        "settings": settings,
        "versions": versions(),
        "model": m.card(),
        "metric": {"name": metric, "clean": results[0].clean, "corrupt": results[0].corrupt},
        "results": [
            {
                "component": r.component,
                "per_position": r.per_position,
                "method": r.method,
                "tokens": r.tokens,
                "rows": r.rows(),
            }
            for r in results
        ],
    }
    write_json(out / "results.json", payload)
    for r in results:
        scores = r.scores
        if r.per_position:
            grid, xlabel, xticks = scores[:, :, 0], "position", r.tokens or None
        elif r.component == "head":
            grid, xlabel, xticks = scores[:, 0, :], "head", None
        else:
            grid, xlabel, xticks = scores[:, 0, :], r.component, [r.component]
        heatmap(
            grid,
            out / f"{r.component}.png",
            f"{method} {r.component} ({metric}, {r.direction})",
            xlabel,
            "layer",
            xticks=xticks,
        )
    table = Table(
        "component",
        "layer",
        "head",
        "position",
        "score",
        title=f"{method} on {len(pairs)} pairs: clean {results[0].clean:.3f}, corrupt {results[0].corrupt:.3f}",
    )
    rows = sorted(
        (dict(row, component=r.component) for r in results for row in r.rows()), key=lambda row: -abs(row["score"])
    )[:top]
    for row in rows:
        table.add_row(
            row["component"], str(row["layer"]), _dash(row["head"]), _dash(row["position"]), f"{row['score']:+.4f}"
        )
    console.print(table)
    console.print(f"wrote {out / 'results.json'} and plots")


def _dash(value) -> str:
    return "-" if value is None else str(value)


@app.command()
def circuit(
    model: ModelArg = DEFAULT_MODEL,
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
    from lmscope.circuits import draw, faithfulness, select
    from lmscope.edges import edge_attribution
    from lmscope.reports.results import output_dir, versions, write_json

    if (top is None) == (threshold is None):
        raise LmscopeError("give exactly one of --top N or --threshold X")
    out = output_dir(out)
    m = load(model)
    pairs = _pairs(m, data, task, n)
    scores = edge_attribution(m, pairs, metric, steps, align)
    chosen = select(scores, top=top, threshold=threshold)
    faith = faithfulness(m, pairs, chosen, metric, align)
    settings = {
        "model": model,
        "data": str(data) if data else None,
        "task": task,
        "n_pairs": len(pairs),
        "top": top,
        "threshold": threshold,
        "metric": metric,
        "steps": steps,
        "align": align,
    }
    graph = {**chosen.to_json(), "metric": metric, "faithfulness": vars(faith)}
    write_json(out / "graph.json", graph)
    write_json(
        out / "results.json",
        {
            "command": "circuit",
            "settings": settings,
            "versions": versions(),
            "model": m.card(),
            "metric": {"name": metric, "clean": scores.clean, "corrupt": scores.corrupt},
            "faithfulness": vars(faith),
            "circuit": graph,
            "edges": [{"from": u, "to": v, "score": s} for u, v, s in scores.edges()],
        },
    )
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
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/heads"),
    length: Annotated[int, typer.Option(help="length of the repeated random sequence")] = 30,
    batch: Annotated[int, typer.Option(help="number of sequences")] = 8,
) -> None:
    """Induction, previous-token and duplicate-token scores of every head."""
    from lmscope.head_roles import ROLES, head_roles, repeated_loss
    from lmscope.reports.plots import heatmap
    from lmscope.reports.results import output_dir, versions, write_json

    out = output_dir(out)
    m = load(model)
    roles = head_roles(m, batch=batch, length=length)
    first, second = repeated_loss(m, batch=batch, length=length)
    payload = {
        "command": "heads",
        "settings": {"model": model, "length": length, "batch": batch},
        "versions": versions(),
        "model": m.card(),
        "repeated_loss": {"first_half": first, "second_half": second},
        "rows": roles.rows(),
    }
    write_json(out / "results.json", payload)
    table = Table("role", "top heads (layer.head: score)", title=f"{m.name}: head roles")
    for role in ROLES:
        heatmap(getattr(roles, role), out / f"{role}.png", f"{role} score", "head", "layer", diverging=False)
        table.add_row(role, ", ".join(f"{layer}.{head}: {score:.2f}" for layer, head, score in roles.top(role)))
    console.print(table)
    console.print(f"repeated random tokens: loss {first:.2f} on the first half, {second:.2f} on the second")
    console.print(f"wrote {out / 'results.json'} and plots")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning bad input into a one-line error and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        app(args=argv, prog_name="lmscope")  # usage errors: typer prints them, exit code 2
    except LmscopeError as e:
        if debug:
            raise
        err.print(f"[red]error:[/red] {e}", soft_wrap=True, highlight=False)
        sys.exit(2)

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
out = Console()
err = Console(stderr=True)

ModelArg = Annotated[str, typer.Argument(help="alias, model directory, .gguf file or cached hub id")]


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
    out.print(table)
    cached = Table("cached conversion", "source", "sha256", title="cache")
    for record in cached_conversions():
        cached.add_row(record["path"], record["source"], record["sha256"][:16])
    out.print(cached)


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
    out.print(table)


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
    out.print(table)
    next_token = m.tokenizer.decode(result.logits[0, -1].argmax())
    out.print(f"next token: {next_token!r}")
    if save is not None:
        out.print(f"saved {len(result.cache)} tensors to {result.cache.save(save)}")


@app.command()
def scan(model: ModelArg = DEFAULT_MODEL) -> None:
    """Model card, site table and a capture summary of MODEL."""
    m = load(model)
    card = Table("", "", title="model card", show_header=False)
    for key, value in m.card().items():
        card.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    out.print(card)
    text = "The capital of France is Paris. When Mary and John went to the store, John gave a drink to"
    shapes = dict(m.site_shapes(batch=1, pos=len(m.tokenize(text)[0][0])))
    kinds = Table("site (layer 0 of each kind)", "shape", title=f"sites ({len(shapes)} in all)")
    for name, shape in shapes.items():
        if not name.startswith("blocks.") or name.startswith("blocks.0."):
            kinds.add_row(name.replace("blocks.0.", "blocks.{L}."), str(list(shape)))
    out.print(kinds)
    sites_ = [f"blocks.{L}.resid_post" for L in range(m.n_layers)]
    result = m.run(text, capture=sites_)
    summary = Table("layer", "resid_post norm/token", "max |x|", "channel of max", title=f"capture: {text!r}")
    for layer, name in enumerate(sites_):
        x = result.cache[name][0]
        channel = int(x.abs().amax(0).argmax())
        summary.add_row(str(layer), f"{x.norm(dim=-1).mean():.4g}", f"{x.abs().max():.4g}", str(channel))
    out.print(summary)
    out.print(f"next token: {m.tokenizer.decode(result.logits[0, -1].argmax())!r}")


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

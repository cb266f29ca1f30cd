"""The ``lmscope`` command, generated from :func:`lmscope.commands.commands`.

Each analysis command is a :class:`~lmscope.reports.command.Command` (a settings dataclass and
``run(model, settings, out)``) defined in its package; this module turns its settings' fields
into options, adds the shared load options (model, device, dtype, max-memory, offload folder;
``--families`` and ``--trust-remote-code`` before the command), loads the model, runs it through
a :class:`~lmscope.reports.command.RunWriter` and prints the result's text and tables. No
analysis logic lives here.

Options are checked where their settings declare it (:func:`~lmscope.reports.command.option`)
before the model loads. No traceback reaches a user (:func:`main`); ``--debug`` shows it.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from lmscope.commands import commands
from lmscope.core import distributed, load
from lmscope.core.errors import LmscopeError
from lmscope.core.loading import ALIASES, DEFAULT_MODEL, cached_conversions, check_memory_spec, resolve_device
from lmscope.core.loading import parse_max_memory
from lmscope.core.sites import parse_site
from lmscope.reports.command import Command, RunWriter, check_out, check_path, check_settings, check_values, option
from lmscope.reports.results import Result, Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Look inside causal language models. Add --debug to any command for tracebacks.",
)
console = Console()
err = Console(stderr=True)
MAX_ROWS = 20  # rows of each table printed; results.json holds all


# -- loading -------------------------------------------------------------------------------------

_GLOBAL = {"trust_remote_code": False}  # set by the app callback for this invocation


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How to load the model: shared by every command that loads one (checked as settings are)."""

    model: str = option(DEFAULT_MODEL, "alias, model directory, .gguf file or cached hub id", flag="MODEL")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (CUDA when available)", parse=resolve_device)
    dtype: str = option("float32", "float32, bfloat16 or float16", choices=("float32", "bfloat16", "float16"))
    max_memory: str | None = option(
        None, "memory per device, e.g. cpu=2GB,0=20GB: the model is spread within it (rest to disk); "
        "a bare size (4GB) only bounds the working memory of gradient methods", parse=check_memory_spec,
    )  # fmt: skip
    offload_folder: Path | None = option(None, "folder for layers offloaded to disk (default: a temporary one)")


LOAD_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(LoadOptions)}


def load_model(options: LoadOptions, certify: bool = True):
    """Load ``options.model``; with ``DEVICE=SIZE`` entries in ``max_memory``, spread over devices
    and disk (accelerate). A model whose family has no entry gets a derived one, used only once
    its certificate passes."""
    check_settings(options)
    trust, spec = _GLOBAL["trust_remote_code"], options.max_memory
    if spec is None or "=" not in spec:  # no limit, or a working-memory budget only
        m = load(options.model, device=options.device, dtype=options.dtype, derive=True, trust_remote_code=trust)
    else:
        folder = str(options.offload_folder or tempfile.mkdtemp(prefix="lmscope-offload-"))
        m = load(
            options.model, dtype=options.dtype, device_map="auto", max_memory=parse_max_memory(spec),
            offload_folder=folder, derive=True, trust_remote_code=trust,
        )  # fmt: skip
    m.max_memory = spec  # the working-memory budget of gradient methods (memory.model_budget)
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
        typer.Option(envvar="LMSCOPE_FAMILIES", help="TOML/JSON file of family entries {model_type: {field: value}}"),
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="run a model's own modeling code shipped with it (auto_map)")
    ] = False,
) -> None:
    _GLOBAL["trust_remote_code"] = trust_remote_code
    if families is not None:
        from lmscope.core.families import load_families

        load_families(families)


# -- generating a command's options ---------------------------------------------------------------


def _param(name: str, annotation: Any, default: Any, info: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, info])


def _path(text: str | Path) -> Path:
    """A path option's value (or its default): an empty one, which ``Path`` reads as ``.``, is refused."""
    if not str(text).strip():
        raise typer.BadParameter("must not be empty")
    return Path(text)


def _option(annotation: Any, *names: str, **kwargs: Any) -> Any:
    """``typer.Option``, with :func:`_path` reading the values of a path option."""
    paths = Path in (annotation, *typing.get_args(annotation))
    return typer.Option(*names, parser=_path if paths else None, **kwargs)


def _settings_params(cls: type) -> tuple[list[inspect.Parameter], str | None]:
    """One option per settings field (the positional TEXT field, if any, named apart)."""
    hints = typing.get_type_hints(cls)
    params, text = [], None
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("argument"):
            text = f.name
            continue
        names = [meta["flag"]] if meta.get("flag") else []
        if meta.get("short"):
            names.append(meta["short"])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = inspect.Parameter.empty if required else (f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
        annotation = hints[f.name]
        if typing.get_origin(annotation) is tuple:  # frozen settings keep lists as tuples
            annotation = list[typing.get_args(annotation)[0]]
        params.append(_param(f.name, annotation, default, _option(annotation, *names, help=meta.get("help", ""),
                                                                  show_default=not required)))  # fmt: skip
    return params, text


def _cli(command: Command) -> Callable[..., None]:
    """The typer function of ``command``: its positional arguments, load options, settings
    options, presets, ``--out`` and ``--overwrite``."""
    settings_params, text_field = _settings_params(command.settings)
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    if text_field:
        args = typer.Argument(help="[MODEL] TEXT", show_default=False)
        params.append(inspect.Parameter("args", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[list[str], args]))
    elif command.model:
        model = typer.Argument(help="alias, model directory, .gguf file or cached hub id")
        params.append(inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=DEFAULT_MODEL,
                                        annotation=Annotated[str, model]))  # fmt: skip
    params += settings_params
    if command.model:
        for f in dataclasses.fields(LoadOptions)[1:]:
            annotation = typing.get_type_hints(LoadOptions)[f.name]
            params.append(_param(f.name, annotation, f.default, _option(annotation, help=LOAD_HELP[f.name])))
    for preset, (_, help_text) in command.presets.items():
        params.append(_param(preset, bool, False, typer.Option(help=help_text)))
    params.append(_param("out", Path, Path("out", *command.name.split()), _option(Path, help="output directory")))
    overwrite = typer.Option(help="replace the results of another run in --out (default: resume the same run)")
    params.append(_param("overwrite", bool, False, overwrite))

    def cli(ctx: typer.Context, **kwargs: Any) -> None:
        if text_field:
            args = kwargs.pop("args")
            if len(args) > 2 or not args:
                raise LmscopeError("expected [MODEL] TEXT (quote the text)")
            kwargs["model"], kwargs[text_field] = (DEFAULT_MODEL, args[0]) if len(args) == 1 else args
        run_command(command, ctx, kwargs)

    cli.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cli.__annotations__ = {p.name: p.annotation for p in params}
    cli.__doc__ = command.summary
    return cli


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given (command line or environment), not left at its default."""
    source = ctx.get_parameter_source(name)  # typer's click may be its own copy: compare by name
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def run_command(command: Command, ctx: typer.Context, kwargs: dict[str, Any]) -> Result:
    """Build the settings (a preset, then the options given), load the model, run, print."""
    names = {f.name for f in dataclasses.fields(command.settings)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items() if k in names}
    given = {k: v for k, v in values.items() if _given(ctx, k)}
    check_values(command.settings, values)  # every option, before the settings are made and the model loads
    check_out(kwargs["out"])
    base = None
    for preset, (settings, _) in command.presets.items():
        if kwargs.pop(preset):
            base = settings(given) if callable(settings) else settings
    settings = command.settings(**values) if base is None else dataclasses.replace(base, **given)
    load_options = LoadOptions(**{f.name: kwargs[f.name] for f in dataclasses.fields(LoadOptions) if f.name in kwargs})
    model = load_model(load_options, certify=command.name != "verify") if command.model else None
    out = RunWriter(kwargs["out"], command.name, settings, model=model,
                    model_name=load_options.model if command.model else None, overwrite=kwargs["overwrite"])  # fmt: skip
    result = command.run(model, settings, out)
    out.finish()
    print_result(result)
    console.print(f"wrote {out.out / 'results.json'}, {out.out / 'report.html'} and PNG plots")
    if getattr(result, "exit_code", 0):
        raise typer.Exit(result.exit_code)
    return result


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def print_table(table: Table) -> None:
    """A result's table on the terminal (at most :data:`MAX_ROWS` rows)."""
    columns = list(dict.fromkeys(k for row in table.rows for k in row))
    if not columns:
        return
    rich = RichTable(*columns, title=table.caption or None)
    for row in table.rows[:MAX_ROWS]:
        rich.add_row(*(_cell(row.get(c)) for c in columns))
    if len(table.rows) > MAX_ROWS:
        rich.caption = f"{len(table.rows) - MAX_ROWS} more rows in results.json"
    console.print(rich)


def print_result(result: Result) -> None:
    """The result's tables, then its headline text."""
    for table in result.tables():
        print_table(table)
    if result.text():
        console.print(result.text(), soft_wrap=True, highlight=False, markup=False)


_GROUPS: dict[str, typer.Typer] = {}  # "features" -> the app of `lmscope features ...`


def register(command: Command) -> None:
    """Add ``command`` (and its hidden earlier names) to the app; a name of two words
    (``"features train"``) is a sub-command of a group, made on first use."""
    function = _cli(command)
    parent, _, name = command.name.rpartition(" ")
    if parent and parent not in _GROUPS:
        _GROUPS[parent] = typer.Typer(no_args_is_help=True, help=f"lmscope {parent} commands.")
        app.add_typer(_GROUPS[parent], name=parent)
    target = _GROUPS[parent] if parent else app
    target.command(name, help=command.summary)(function)
    for alias in command.hidden_aliases:
        target.command(alias, hidden=True, help=f"The earlier name of `lmscope {command.name}`.")(function)


# -- the commands that only look ----------------------------------------------------------------


@app.command()
def models() -> None:
    """Built-in model aliases and cached GGUF conversions."""
    table = RichTable("alias", "model", "available", title="aliases")
    for name, (description, locate) in ALIASES.items():
        try:
            available = str(locate())
        except LmscopeError as e:
            available = f"no: {e}"
        table.add_row(name + (" (default)" if name == DEFAULT_MODEL else ""), description, available)
    console.print(table)
    cached = RichTable("cached conversion", "source", "sha256", title="cache")
    for record in cached_conversions():
        cached.add_row(record["path"], record["source"], record["sha256"][:16])
    console.print(cached)


ModelArg = Annotated[str, typer.Argument(help="alias, model directory, .gguf file or cached hub id")]


@app.command()
def sites(
    model: ModelArg = DEFAULT_MODEL,
    pos: Annotated[int, typer.Option(help="sequence length for the shapes", min=1)] = 8,
    layer: Annotated[int | None, typer.Option(help="only this layer's sites")] = None,
    device: Annotated[str, typer.Option(help=LOAD_HELP["device"])] = "auto",
    dtype: Annotated[str, typer.Option(help=LOAD_HELP["dtype"])] = "float32",
) -> None:
    """Table of site names with their shapes (batch 1, --pos tokens)."""
    m = load_model(LoadOptions(model, device, dtype))
    if layer is not None and not 0 <= layer < m.n_layers:
        raise LmscopeError(f"--layer {layer} out of range (model has {m.n_layers} layers)")
    table = RichTable("site", "shape", title=f"{m.name}: sites (batch 1, {pos} tokens)")
    for name, shape in m.site_shapes(batch=1, pos=pos):
        if layer is None or name.startswith(f"blocks.{layer}."):
            table.add_row(name, str(list(shape)))
    console.print(table)


@app.command()
def run(
    args: Annotated[list[str], typer.Argument(help="[MODEL] TEXT", show_default=False)],
    capture: Annotated[list[str], typer.Option("--capture", "-c", help="site to capture (repeatable)")] = [],  # noqa: B006
    save: Annotated[Path | None, _option(Path, help="write the captures to this .safetensors file")] = None,
    device: Annotated[str, typer.Option(help=LOAD_HELP["device"])] = "auto",
    dtype: Annotated[str, typer.Option(help=LOAD_HELP["dtype"])] = "float32",
) -> None:
    """Run TEXT through MODEL and print the shapes and norms of the captured sites."""
    if len(args) > 2:
        raise LmscopeError("expected [MODEL] TEXT (quote the text)")
    model, text = (DEFAULT_MODEL, args[0]) if len(args) == 1 else args
    if not text.strip():
        raise LmscopeError("TEXT must not be empty")
    if save is not None:
        check_path("--save", save, "out")
    for name in capture:
        parse_site(name)  # a misspelt site fails before the model loads
    m = load_model(LoadOptions(model, device, dtype))
    for name in capture:
        m.site(name)  # layer and head ranges
    result = m.run(text, capture=capture or [f"blocks.{m.n_layers - 1}.resid_post"])
    table = RichTable("site", "shape", "norm", "max |x|", title=f"{m.name}: {result.input_ids.shape[1]} tokens")
    for name, value in result.cache.items():
        table.add_row(name, str(list(value.shape)), f"{value.norm():.4g}", f"{value.abs().max():.4g}")
    console.print(table)
    console.print(f"next token: {m.tokenizer.decode(result.logits[0, -1].argmax())!r}")
    if save is not None:
        console.print(f"saved {len(result.cache)} tensors to {result.cache.save(save)}")


def _fail(message: str, code: int) -> int:
    """Print ``error: message`` as one line on stderr (rank 0 only under torchrun); return ``code``."""
    if distributed.is_main():
        err.print(Text.assemble(("error:", "red"), " ", " ".join(message.split())), soft_wrap=True, highlight=False)
    return code


def main(argv: list[str] | None = None) -> None:
    """Entry point; no traceback reaches a user. Bad input (an :class:`LmscopeError`, an unknown
    option, a value of the wrong type) is one line ``error: ...`` and exit code 2, any other
    exception one line ``error: internal error: ...`` and exit code 1, Ctrl-C exit code 130;
    ``--debug`` raises instead. Files already written stay (every write is atomic)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    console.quiet = not distributed.is_main()  # under torchrun, rank 0 prints the tables
    try:
        code = typer.main.get_command(app).main(args=argv, prog_name="lmscope", standalone_mode=False)
        code = code if isinstance(code, int) else 0  # an exit code (help: 0, verify: 1, Ctrl-C: 130) or None
        if code == 130:
            _fail("interrupted", 130)
    except typer.TyperException as e:  # click's usage errors and bad values (typer's own copy of click)
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare `lmscope`: the help
            e.show()
            code = 2
        else:
            ctx = getattr(e, "ctx", None)
            code = _fail(e.format_message() + (f" (see {ctx.command_path} --help)" if ctx else ""), 2)
    except (typer.Abort, KeyboardInterrupt):
        code = _fail("interrupted", 130)
    except Exception as e:
        if debug:
            raise
        internal = f"internal error: {type(e).__name__}" + f": {e}" * bool(str(e))
        internal += "; rerun with --debug for the traceback"
        code = _fail(str(e), 2) if isinstance(e, LmscopeError) else _fail(internal, 1)
    finally:
        distributed.shutdown()
    sys.exit(code)


for _command in commands():
    register(_command)

"""What the ``graphtricks`` commands share: consoles, option types, error handling, model loading.

Nothing here imports torch at module level: ``graphtricks --help`` and usage errors answer in
well under a second, and torch is imported when a command first needs a model.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Iterable
from contextlib import contextmanager, nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

from graphtricks.errors import GraphtricksError, InputShapeError, SpecError
from graphtricks.io.inputs import DTYPE_NAMES, parse_input_shapes, parse_named_input

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

InputDtype = Enum("InputDtype", {k: k for k in DTYPE_NAMES}, type=str)
Device = Enum("Device", {k: k for k in ("cpu", "cuda", "meta")}, type=str)


def choices(enum: type[Enum]) -> str:
    """A choice option's metavar: ``cpu|cuda|meta``."""
    return "|".join(e.value for e in enum)


def _check_shape(value: str | None) -> str | None:
    """``--input-shape`` is checked while parsing (exit 2), before any model loads."""
    if value is not None:
        try:
            parse_input_shapes(value)
        except InputShapeError as e:
            raise typer.BadParameter(str(e)) from None
    return value


def _check_named(values: list[str] | None) -> list[str] | None:
    """``--input NAME=SHAPE[:DTYPE]`` is checked while parsing (exit 2), names given once."""
    seen = set()
    for value in values or []:
        try:
            name = parse_named_input(value)[0]
        except InputShapeError as e:
            raise typer.BadParameter(str(e)) from None
        if name in seen:
            raise typer.BadParameter(f"keyword input {name} is given twice")
        seen.add(name)
    return values


# -- shared options --------------------------------------------------------------------
InputShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-shape", metavar="SHAPE", callback=_check_shape,
        help="Example input shape, dimensions separated by commas: 8,3,32,32; several inputs: 8,16;8,16.",
    ),
]
NamedInputOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input", metavar="NAME=SHAPE[:DTYPE]", callback=_check_named,
        help="A keyword input of forward, e.g. attention_mask=8,128:int64 (repeatable; with or without --input-shape).",
    ),
]
InputDtypeOpt = Annotated[
    InputDtype | None,
    typer.Option(
        "--input-dtype", metavar=choices(InputDtype),
        help="dtype of the random example inputs (default float32; int64 token ids for text models).",
    ),
]
DeviceOpt = Annotated[
    Device,
    typer.Option(
        "--device", metavar=choices(Device), help="Where to build and capture the model; meta plans without allocating weights."
    ),
]
ModelArgOpt = Annotated[
    list[str] | None,
    typer.Option("--model-arg", metavar="KEY=VALUE", help="Passed to the model's class or factory (repeatable)."),
]
WeightsOpt = Annotated[
    Path | None, typer.Option("--weights", metavar="FILE", help="State dict to load: .safetensors, or .pt read weights-only.")
]
PretrainedOpt = Annotated[
    bool, typer.Option("--pretrained", help="tv:/timm:/hf: models with their published weights, from each library's cache"
                       " (downloaded there when missing and online).")
]
TrustPickleOpt = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow unpickling a whole-model .pt (unpickling runs arbitrary code).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a non-empty --out folder.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks of errors.")]


# the library speaks Python (``force=True``); the command line rephrases with its flags
_FLAG_WORDS = {"output folder ": "--out ", "pass force=True": "pass --force", "pass overwrite=True": "pass --force"}


def _cli_words(message: str) -> str:
    for python, flag in _FLAG_WORDS.items():
        message = message.replace(python, flag)
    return message


@contextmanager
def user_errors(verbose: bool):
    """Turn library errors into one red line and exit code 1."""
    try:
        yield
    except GraphtricksError as e:
        if verbose:
            traceback.print_exc()
        err.print(f"[red]error:[/red] {escape(_cli_words(str(e)))}", markup=True, highlight=False)
        raise typer.Exit(code=1) from None
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - last resort: any other failure is still one line, not a traceback
        if verbose:
            traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        err.print(
            f"[red]internal error:[/red] {type(e).__name__}: {first} (rerun with --verbose for the traceback)",
            markup=True,
            highlight=False,
        )
        raise typer.Exit(code=1) from None


def status(message: str, quiet: bool):
    """A spinner on stderr for long work, only where a person is watching."""
    return err.status(message) if not quiet and err.is_terminal else nullcontext()


PROGRESS_DELAY = 1.0  # seconds a stage runs before its line is printed outside a terminal


@contextmanager
def progress(message: str, quiet: bool):
    """Report a long stage on stderr: a spinner on a terminal, plain lines elsewhere (a log, CI).

    Yields the callback the library takes (``progress=``): on a terminal each line becomes the
    spinner's text; elsewhere each is printed, one whole line ending with the stage's count
    (``validating: random draws (step 3/6)``), once its stage has run for ``PROGRESS_DELAY``
    seconds, so a 30-80 s export is not silent while a quick command, or an error, stays the one
    line it was. Nothing is shown when ``quiet`` (``--json``).
    """
    if quiet:
        yield lambda line: None
        return
    if err.is_terminal:
        with err.status(message) as spinner:
            yield lambda line: spinner.update(escape(line))
        return
    timer: list[threading.Timer] = []

    def later(line: str) -> None:
        for t in timer:
            t.cancel()
        if PROGRESS_DELAY <= 0:
            err.print(line, markup=False, highlight=False)
            return
        timer[:] = [threading.Timer(PROGRESS_DELAY, err.print, (line,), {"markup": False, "highlight": False})]
        timer[0].daemon = True
        timer[0].start()

    try:
        yield later
    finally:
        for t in timer:
            t.cancel()


def table(title: str | None, columns: dict[str, str], **options) -> Table:
    """A table whose ``"name"`` columns are never broken and whose ``"text"`` columns wrap at spaces.

    Args:
        title: shown above the table.
        columns: header → ``"name"`` (module paths, check names, numbers: one line per cell;
            write a long header on two lines, ``"worst\\nabs"``) or ``"text"`` (sentences:
            wrapped at spaces to fit).
        options: passed to :class:`rich.table.Table`.
    """
    made = Table(title=title, **options)
    for header, kind in columns.items():
        made.add_column(header, no_wrap=kind == "name", overflow="fold")
    return made


def _needed(cell, whole: bool) -> int:
    """The width a cell needs: its longest line when kept whole, else its longest word."""
    text = cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain
    parts = text.splitlines() if whole else text.split()
    return max((cell_len(p) for p in parts), default=0)


def print_table(made: Table, console: Console | None = None) -> None:
    """Print a table within the console's width (80 columns in a pipe), wrapping text columns
    only at spaces; a table whose names alone are wider is printed wider rather than break one."""
    console = console or out
    needed = len(made.columns) + 1 + 2 * len(made.columns)  # borders, and a space either side of a cell
    for column in made.columns:
        needed += max(_needed(c, whole=column.no_wrap) for c in [column.header, *column.cells])
    if needed <= console.width:
        console.print(made, soft_wrap=False)
        return
    previous = console._width  # rich caps a print's width at the console's: widen it for this table
    console.width = needed
    try:
        console.print(made, soft_wrap=False)
    finally:
        console._width = previous


def warn(messages: list[str], as_json: bool) -> None:
    """Each distinct warning once, as a yellow line on stderr (none in JSON mode)."""
    if not as_json:
        for m in dict.fromkeys(messages):
            err.print(f"[yellow]warning:[/yellow] {m}", markup=True, highlight=False)


def note(messages: Iterable[str]) -> None:
    """Informational lines on stderr, dimmed."""
    for m in messages:
        err.print(f"[dim]note:[/dim] {m}", markup=True, highlight=False)


def load_source(
    spec: str,
    input_shape: str | None,
    input_dtype: InputDtype | None,
    model_args: list[str] | None,
    weights: Path | None,
    trust_pickle: bool,
    device: Device = Device.cpu,
    named_inputs: list[str] | None = None,
    pretrained: bool = False,
):
    """The model a SPEC or saved DIR names, its example inputs, its source record, prior passes,
    and its keyword inputs (``--input NAME=SHAPE[:DTYPE]``; a saved DIR's own unless given).

    Text models (a Hugging Face config with a ``vocab_size``) get int64 token ids below the
    vocabulary size unless ``--input-dtype`` (or the input's own dtype) says otherwise.
    """
    import torch

    from graphtricks.io.folder import is_saved_model, load_saved
    from graphtricks.io.inputs import (
        check_inputs_agree,
        make_example_inputs,
        make_keyword_inputs,
        positional_names,
        value_limits,
    )
    from graphtricks.io.specs import load_model, load_weights, parse_model_args

    # the enums' plain strings: the dtype is written into the recipe, the device goes to torch
    dtype_name = input_dtype.value if input_dtype else None
    device_name = device.value
    if is_saved_model(spec):
        if device_name != "cpu":
            raise SpecError("a saved folder is rebuilt on the CPU; --device applies to model specs")
        if pretrained:
            raise SpecError("--pretrained applies to tv:, timm: and hf: specs; a saved folder has its own weights")
        saved = load_saved(spec, trust_pickle=trust_pickle)
        source = dict(saved.recipe.source)
        inputs, keywords = saved.example_inputs, saved.example_kwargs
        if named_inputs:
            dtype = dtype_name or source.get("input_dtype", "float32")
            keywords = make_keyword_inputs(_named(named_inputs), dtype, high=source.get("token_high", 100),
                                           highs=value_limits(saved.model))
            inputs = () if not input_shape else inputs
        if input_shape:
            shapes = parse_input_shapes(input_shape)
            dtype = dtype_name or source.get("input_dtype", "float32")
            high = source.get("token_high", 100)
            source.update(input_shapes=[list(s) for s in shapes], input_dtype=dtype)
            inputs = make_example_inputs(shapes, dtype, high=high, names=positional_names(saved.model.forward),
                                         highs=value_limits(saved.model))
        check_inputs_agree(inputs, keywords, saved.model.forward)
        if weights:
            load_weights(saved.model, weights)
        return saved.model, inputs, source, list(saved.recipe.passes), keywords
    if Path(spec).is_dir():
        raise SpecError(f"{spec} is a folder but not a graphtricks model (no recipe.toml)")
    if ":" not in spec and not Path(spec).exists() and ("/" in spec or "\\" in spec):
        raise SpecError(f"{spec} does not exist (give a model spec file.py:Name, package.module:Name, or a saved folder)")
    if not input_shape and not named_inputs:
        raise SpecError("give the example input shape with --input-shape, e.g. --input-shape 8,3,32,32"
                        " (or keyword inputs with --input NAME=SHAPE[:DTYPE])")
    if device_name == "meta" and weights:
        raise SpecError("--device meta builds the model without weights; drop --weights")
    shapes = parse_input_shapes(input_shape) if input_shape else []
    kwargs = parse_model_args(model_args)
    with torch.device(device_name):
        model = load_model(spec, kwargs, trust_pickle=trust_pickle, pretrained=pretrained)
    if weights:
        load_weights(model, weights)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    dtype = dtype_name or ("int64" if isinstance(vocab, int) else "float32")
    high = vocab if isinstance(vocab, int) and dtype.startswith("int") else 100
    source: dict[str, Any] = {"spec": spec, "input_shapes": [list(s) for s in shapes], "input_dtype": dtype}
    if high != 100:
        source["token_high"] = high
    if kwargs:
        source["model_args"] = kwargs
    if trust_pickle:
        source["trust_pickle"] = True
    if not shapes:
        del source["input_shapes"]
    keywords = make_keyword_inputs(_named(named_inputs or []), dtype, device=device_name, high=high,
                                   highs=value_limits(model))
    inputs = make_example_inputs(shapes, dtype, device=device_name, high=high, names=positional_names(model.forward),
                                 highs=value_limits(model))
    check_inputs_agree(inputs, keywords, model.forward)
    return model, inputs, source, [], keywords


def _named(values: list[str]) -> dict[str, str]:
    """``{name: "SHAPE[:DTYPE]"}`` from ``--input NAME=SHAPE[:DTYPE]`` values."""
    return dict(v.split("=", 1) for v in values)

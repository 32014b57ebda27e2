"""The ``graphtricks`` command line: a thin typer layer over the library.

User errors print one red line on stderr and exit 1 (typer's usage errors exit 2); a
traceback is shown only with ``--verbose``. Each command lives in its own module; this one
builds the app from them.
"""

from __future__ import annotations

import functools
import sys
from typing import Annotated

import typer

try:  # typer >= 0.25 vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as click_exceptions

from graphtricks.cli.common import err
from graphtricks.cli.experiment_cmd import experiment
from graphtricks.cli.inspect_cmd import inspect
from graphtricks.cli.onnx_cmd import export, validate
from graphtricks.cli.rewrite_cmd import rewrite

__all__ = ["app", "main"]

app = typer.Typer(
    name="graphtricks",
    help="Apply classic training techniques to an existing PyTorch model with torch.fx, and prove it deploys.",
    no_args_is_help=True,
    # plain click help: metavars as written (DIR, GLOB, P; no <bool>), and help text is not
    # read as rich markup (a recipe's [[passes]] stays visible)
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from graphtricks import __version__

        typer.echo(f"graphtricks {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Apply classic training techniques to an existing PyTorch model with torch.fx, and prove it deploys."""
INTERRUPTED = "interrupted; nothing written"  # every output folder is written atomically


def _interruptible(command):
    """The command, with Ctrl-C as one line on stderr and exit code 130 (128 + SIGINT)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            err.print(INTERRUPTED, highlight=False)
            raise typer.Exit(code=130) from None

    return run


# registration order is the order `graphtricks --help` lists them in
for command in (rewrite, inspect, export, validate, experiment):
    app.command(name=command.__name__)(_interruptible(command))


def main() -> None:
    """Console-script entry point: usage errors are one line too (exit code 2)."""
    try:
        code = app(standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError:
        code = 0  # typer has printed the help while building this exception
    except click_exceptions.UsageError as e:
        hint = f" (see `graphtricks {e.ctx.info_name} --help`)" if e.ctx and e.ctx.parent else " (see `graphtricks --help`)"
        err.print(f"[red]error:[/red] {e.format_message()}{hint}", markup=True, highlight=False)
        code = 2
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a command (while parsing)
        err.print(INTERRUPTED, highlight=False)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)

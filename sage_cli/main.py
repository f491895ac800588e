"""The `sage` root app: one module per command, registered here."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
import typer.core

from sage import __version__
from sage.cli import ask, bench, convert, explain, heads, models, traces

def _flags_without_metavar() -> None:
    """Help shows `--vote` without typer's `<bool>`: a flag takes no value to describe.
    (typer renders an option's type with TyperOption.display_type_rich; a flag's is None.)"""
    opt = getattr(typer.core, "TyperOption", None)
    show = getattr(opt, "display_type_rich", None)
    if show is None or getattr(show, "_sage", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else show(self, ctx)

    display_type_rich._sage = True
    opt.display_type_rich = display_type_rich


_flags_without_metavar()

app = typer.Typer(
    name="sage",
    no_args_is_help=True,
    add_completion=True,  # sage --install-completion / --show-completion
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sage {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    """Local reasoning that explains itself: a small GGUF model reasons step by step
    while sage records how certain it was of every token.

    Example: sage ask "A pen costs $3. How much do 4 pens cost?"
    """


app.command("ask")(ask.ask)
app.command("explain")(explain.explain)
app.command("bench")(bench.bench)
app.command("convert")(convert.convert)
app.add_typer(models.app, name="models")
app.add_typer(heads.app, name="heads")
app.add_typer(traces.app, name="traces")


def main() -> None:
    app()

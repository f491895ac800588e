"""`sage models`: the presets and which are on this machine (`list`, also the bare
command), and `pull` to download one."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from sage.cli.options import JsonOpt, user_errors
from sage.presets import DEFAULT_MODEL, PRESETS, preset_status

app = typer.Typer(
    name="models",
    invoke_without_command=True,  # bare `sage models` lists, as it always did
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _list(json_out: bool) -> None:
    rows = []
    for p in PRESETS.values():
        path = preset_status(p)
        rows.append((p.name, p.description, p.source, path, p.name == DEFAULT_MODEL))
    if json_out:
        print(json.dumps([
            {"name": n, "description": d, "source": s, "path": path, "default": dflt}
            for n, d, s, path, dflt in rows
        ], indent=1))
        return
    from sage.cli.ui import console, models_table

    console.print(models_table(rows, width=console.width))


@app.callback()
@user_errors
def models(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """List model presets and whether each is available locally (no network); `pull`
    downloads one from the Hugging Face hub.

    Example: sage models pull qwen3-0.6b
    """
    if ctx.invoked_subcommand is None:
        _list(json_out)


@app.command("list")
@user_errors
def list_(json_out: JsonOpt = False) -> None:
    """List model presets and whether each is available locally (no network).

    Example: sage models list --json
    """
    _list(json_out)


@app.command("pull")
@user_errors
def pull(
    name: Annotated[str, typer.Argument(help="A preset (see `sage models`) or hf:ORG/REPO/FILE.gguf.", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Download again even if the file is already here.")] = False,
) -> None:
    """Download a hub model into sage's cache, with a progress bar, and say where it is.

    Embedded presets ship inside pip packages and need no download. Without a network
    (or with HF_HUB_OFFLINE=1 or SAGE_OFFLINE=1) it stops at once; a failed download
    leaves no partial file.

    Example: sage models pull qwen3-0.6b
    """
    from sage.cli.ui import pulled
    from sage.presets import pull as pull_model

    pulled(pull_model(name, force=force))

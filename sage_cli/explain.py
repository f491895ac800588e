"""`sage explain --tree [TRACE]`: a saved trace as a tree, optionally exported to SVG/HTML.

Reads the trace file only: no model is loaded and nothing heavy is imported.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Optional

import typer

from model.errors import SageError
from model.trace import load_trace
from sage_cli.common import sage_home, user_errors


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temp file in the same directory and a rename (never half a file)."""
    # open("x") rather than mkstemp: the export gets the user's umask, not mode 0600
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_target(path: Path, force: bool) -> None:
    if path.is_dir():
        raise SageError(f"{path} is a directory; give a file name")
    if path.exists() and not force:
        raise SageError(f"{path} exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise SageError(f"cannot write {path}: directory {path.parent} does not exist")


@user_errors
def explain(
    trace: Annotated[
        Optional[Path],
        typer.Argument(
            metavar="TRACE", help="A trace file. Default: last.json in the user data dir.", show_default=False
        ),
    ] = None,
    tree: Annotated[
        bool, typer.Option("--tree", help="Show the reasoning as a tree (the default view).")
    ] = False,
    svg: Annotated[
        Optional[Path], typer.Option("--svg", metavar="FILE", help="Also write the tree as SVG.", show_default=False)
    ] = None,
    html: Annotated[
        Optional[Path], typer.Option("--html", metavar="FILE", help="Also write the tree as HTML.", show_default=False)
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing export files.")] = False,
) -> None:
    """Show a saved reasoning trace as a tree: the steps along the chosen path, and at each
    decision point the alternatives and the answers they lead to.

    Reads TRACE, by default last.json of the latest `sage ask` ($SAGE_HOME overrides).

    No model is loaded. --svg and --html also write the tree to a file.

    Example: sage explain --tree --svg reasoning.svg
    """
    from sage_cli.ui_tree import export_tree, exported, show_tree

    del tree  # the tree is the only view; the flag is accepted as users type it
    if trace is None:
        trace = sage_home() / "last.json"
        if not trace.exists():
            raise SageError(f"no trace yet: run `sage ask \"PROBLEM\"` first (nothing at {trace})")
    loaded = load_trace(trace)
    exports = [(p, fmt) for p, fmt in ((svg, "svg"), (html, "html")) if p is not None]
    if svg is not None and html is not None and svg.resolve() == html.resolve():
        raise SageError("--svg and --html name the same file")
    for path, _ in exports:
        _check_target(path, force)  # before any output: refuse early, not after rendering

    show_tree(loaded)
    for path, fmt in exports:
        try:
            _write_atomic(path, export_tree(loaded, fmt))
        except OSError as e:
            raise SageError(f"cannot write {path}: {e.strerror or e}") from None
        exported(fmt, path)

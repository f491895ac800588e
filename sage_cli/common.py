"""Shared option aliases, the user data dir, and the user-error boundary of every command."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from model.errors import SageError
from model.trace import TraceError

ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        help="A .gguf path, a preset name (see `sage models`), or hf:ORG/REPO/FILE.gguf. "
        "Default: smollm2-135m (embedded).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON only (no markup).")]


def sage_home() -> Path:
    """Where traces live: $SAGE_HOME, else the platform's user data dir."""
    env = os.environ.get("SAGE_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "sage"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home())) / "sage"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "sage"


def user_errors(fn: Callable) -> Callable:
    """Turn SageError/TraceError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (SageError, TraceError) as e:
            from sage_cli.ui import error

            error(str(e))
            raise typer.Exit(2) from None

    return wrapper

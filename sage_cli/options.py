"""Shared option aliases and the user-error boundary of every command."""

from __future__ import annotations

import functools
from typing import Annotated, Callable, Optional

import typer

from sage.errors import SageError
from sage.trace import TraceError

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


def user_errors(fn: Callable) -> Callable:
    """Turn SageError/TraceError (and an OSError from a path) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (SageError, TraceError) as e:
            from sage.cli.ui import error

            error(str(e))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            # Ctrl-C (or SIGTERM, sage.cli.entry) where the command has no handler of its
            # own: what it was writing is cleaned up by then (temp files are removed)
            raise typer.Exit(130) from None
        except OSError as e:
            # a path the user gave that the system refuses (a name too long, no permission)
            from sage.cli.ui import error

            where = f" {e.filename}" if getattr(e, "filename", None) else ""
            error(f"cannot use{where}: {e.strerror or e}")
            raise typer.Exit(2) from None
        except ModuleNotFoundError as e:
            if e.name != "torch":
                raise
            from sage.cli.ui import error

            # torch is the optional extra of the torch side (--exact, heads train, convert)
            error("this needs torch, which is not installed: pip install 'sage[torch]'")
            raise typer.Exit(2) from None

    return wrapper

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
        except BrokenPipeError:
            raise  # stdout closed early (sage ... | head): sage.cli.entry ends quietly
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


MaxTokensOpt = Annotated[
    int, typer.Option("--n-predict", "-n", "--max-tokens", help="Most tokens to generate (per answer).")
]
SeedOpt = Annotated[int, typer.Option("--seed", "-s", help="Seed of the chain's sampling (with --temp > 0) and of the samples.")]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", "-t", envvar="SAGE_THREADS", help="CPU threads (default: all, up to 8).",
                 show_default=False),
]
WorkersOpt = Annotated[
    Optional[int],
    typer.Option("--workers", "-w", help="Worker processes, one model loaded in each, problems shared out as they "
                 "finish; the threads are divided among them. Default: the cores available.", show_default=False),
]
RayOpt = Annotated[
    Optional[str],
    typer.Option("--ray", metavar="ADDRESS", help="Run the workers as Ray actors instead (pip install 'sage[ray]'): "
                 "'local' starts Ray on this machine, 'auto' joins the cluster `ray start` set up here, or "
                 "HOST:PORT. --workers then defaults to one per CPU Ray offers.", show_default=False),
]
MAX_PROBLEM_BYTES = 1 << 20  # a problem read from stdin; the context refuses far less anyway


def read_problem(problem: Optional[str]) -> str:
    """The problem argument, or stdin for '-' (or no argument while stdin is a pipe)."""
    import sys

    if problem is not None and problem != "-":
        return problem
    if problem is None and sys.stdin.isatty():
        raise SageError('give the problem: sage ask "PROBLEM" (or - to read it from stdin)')
    try:
        data = sys.stdin.buffer.read(MAX_PROBLEM_BYTES + 1)
    except OSError as e:
        raise SageError(f"cannot read the problem from stdin: {e.strerror or e}") from None
    if len(data) > MAX_PROBLEM_BYTES:
        raise SageError(f"the problem on stdin is over {MAX_PROBLEM_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SageError("the problem on stdin is not UTF-8 text") from None
    if not text.strip():
        raise SageError("stdin held no problem (it was empty)")
    return text.strip()

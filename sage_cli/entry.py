"""The `sage` command's entry point: the signals first, then the app.

Importing the app (typer, rich, numpy) takes a while; Ctrl-C then, or anywhere a command
does not handle it, exits with code 130 and no traceback. SIGTERM is handled as Ctrl-C
is (a KeyboardInterrupt), so what a command cleans up on Ctrl-C (temp files, a partial
trace) it cleans up on SIGTERM too.

A Ctrl-C can land where Python cannot raise it: in a weakref callback of the import
machinery, a __del__, the garbage collector. Python then prints "Exception ignored in"
with a traceback and runs on, so the command would finish as if never interrupted. The
unraisable hook below catches that case and delivers the interrupt again a moment later
(SIGALRM, 10 ms), from ordinary code, where it is raised.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130


REDELIVER_S = 0.01


def _as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _unraisable(args) -> None:
    if args.exc_type is not None and issubclass(args.exc_type, KeyboardInterrupt):
        # swallowed where it landed: raise it again from the next ordinary moment; if that
        # one is swallowed too, this hook runs again
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, REDELIVER_S)
            return
        # (no interval timer on this system: a swallowed interrupt is lost, as it was)
    sys.__unraisablehook__(args)


def install() -> None:
    """The handlers `main` runs under: SIGTERM as Ctrl-C, and no interrupt lost."""
    signal.signal(signal.SIGTERM, _as_interrupt)
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _as_interrupt)
    sys.unraisablehook = _unraisable


def main() -> None:
    try:
        install()
        from sage.cli.main import app

        app()
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # the reader of stdout went away (sage traces list | head -1): stop quietly, as
        # other tools do; point stdout at /dev/null so the interpreter's final flush
        # does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)

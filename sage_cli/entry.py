"""The `sage` command's entry point: the signals first, then the app.

Importing the app (typer, rich, numpy) takes a while; Ctrl-C then, or anywhere a command
does not handle it, exits with code 130 and no traceback. SIGTERM is handled as Ctrl-C
is (a KeyboardInterrupt), so what a command cleans up on Ctrl-C (temp files, a partial
trace) it cleans up on SIGTERM too.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130


def _as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    try:
        signal.signal(signal.SIGTERM, _as_interrupt)
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

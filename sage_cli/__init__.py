"""sage command-line interface: parses options, calls the library, renders with Rich.

A Ctrl-C that lands while the `sage` command is still importing its entry point (before
`sage.cli.entry.main` handles it) would end in a KeyboardInterrupt traceback; from here on
it ends quietly instead (the interpreter then exits by SIGINT, as an interrupted program
does). Other exceptions go to the hook that was there.
"""

import sys


def _quiet_interrupt(exc_type, value, tb, _previous=sys.excepthook):
    if issubclass(exc_type, KeyboardInterrupt):
        sys.stderr.write("\n")
        return
    _previous(exc_type, value, tb)


sys.excepthook = _quiet_interrupt

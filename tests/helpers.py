"""Helpers the test modules share (pytest puts tests/ on sys.path)."""

from __future__ import annotations


def one_line_error(result, *needles) -> str:
    """A command's refusal of bad input: exit code 2, one line `error: ...` on stderr
    containing every needle, no traceback. Returns the line."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# sage.workers' tests: a worker imports these by name (module `helpers`, on the spawned
# interpreter's sys.path as on this one's)
def worker_init(tag: str, threads: int | None) -> dict:
    import os

    return {"tag": tag, "threads": threads, "pid": os.getpid()}


def worker_work(state: dict, item):
    import os

    from sage.errors import SageError

    if item == "boom":
        raise SageError("boom in a worker")
    if item == "die":
        os._exit(3)  # as a worker killed or out of memory
    if isinstance(item, str) and item.startswith("pidfile:"):
        from pathlib import Path

        Path(item[len("pidfile:"):]).write_text(str(os.getpid()))
        import time

        time.sleep(60)  # a long problem, to be interrupted
    import time

    time.sleep(0.2)  # work that takes a while, as a problem does: both workers get some
    return state["pid"], state["threads"], state["tag"], item * 2

"""Problems over worker processes on one machine: one model per worker, problems as tasks.

`run_tasks(init, init_args, work, items, workers, threads)` starts `workers` processes
(spawned: a fresh interpreter each, nothing of this process's llama.cpp state inherited);
each calls `init(*init_args, threads)` once (it loads the model) and then `work(state,
item)` for every item it is handed. Results come back as they finish, in any order, as
(index, result), so a caller can save each one the moment it exists (a resumable file).
With one worker everything runs in this process, as before.

Threads: llama.cpp spins a thread per core it is given, and two processes that each take
every core slow down many times over, so each worker gets its share: the cores (or the
caller's thread count) divided by the workers, at least one.

Ctrl-C: the workers ignore SIGINT (it reaches the whole process group); this process
stops them and raises the KeyboardInterrupt. A worker's exception (a SageError, say) ends
the run with that exception; a worker that dies (killed, out of memory) ends it with a
SageError naming that.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator, Sequence

from sage.errors import SageError

_state: Any = None


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_per_worker(workers: int, threads: int | None = None) -> int:
    return max(1, (threads or available_cores()) // max(1, workers))


def _init(init: Callable, init_args: tuple, threads: int) -> None:
    global _state
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _state = init(*init_args, threads)


def _run(work: Callable, index: int, item: Any) -> tuple[int, Any]:
    return index, work(_state, item)


def _close(state: Any) -> None:
    close = getattr(state, "close", None)
    if callable(close):
        close()


def run_tasks(init: Callable, init_args: tuple, work: Callable, items: Sequence, workers: int = 1,
              threads: int | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (index, work(state, items[index])) for every item, as each finishes.

    init and work must be module-level functions (a worker imports them by name); items
    and results must pickle. threads: the threads all workers share (default: the cores)."""
    if workers < 1:
        raise SageError("--workers must be at least 1")
    items = list(items)
    if not items:
        return
    n = min(workers, len(items))
    if n == 1:
        state = init(*init_args, threads)
        try:
            for i, item in enumerate(items):
                yield i, work(state, item)
        finally:
            _close(state)
        return
    import multiprocessing

    ex = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                             initargs=(init, init_args, threads_per_worker(n, threads)))
    finished = False
    try:
        # at most one queued task per worker beyond the running ones: a stopped run has
        # few tasks in flight to throw away
        todo = list(enumerate(items))[::-1]
        pending = set()
        while todo or pending:
            while todo and len(pending) < 2 * n:
                i, item = todo.pop()
                pending.add(ex.submit(_run, work, i, item))
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
        finished = True
    except BrokenProcessPool:
        raise SageError("a worker process died (killed, or out of memory); what it finished is kept") from None
    finally:
        if not finished:  # interrupted, failed, or the caller stopped reading: stop the workers now
            for p in list(getattr(ex, "_processes", {}).values()):
                p.terminate()
        ex.shutdown(wait=True, cancel_futures=True)

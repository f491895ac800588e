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

Ray (optional, `pip install 'sage[ray]'`): with `ray=` an address, the workers are Ray
actors instead, one model loaded in each, the items Ray tasks on them: "local" starts a
Ray instance on this machine for the run (unless one is running in this process already),
"auto" joins the cluster `ray start` set up on this machine, host:port joins that
cluster. Each node needs sage and the model file at the same path. Without Ray the
local workers above are the way.
"""

from __future__ import annotations

import os
import re
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


_RAY_ADDRESS = re.compile(r"(local|auto|(ray://)?[A-Za-z0-9._-]+:[0-9]{1,5})")


def check_ray_address(address: str) -> str:
    """'local', 'auto' or HOST:PORT (ray://HOST:PORT for Ray Client), else a SageError."""
    if not _RAY_ADDRESS.fullmatch(address):
        raise SageError("--ray takes 'local', 'auto' or HOST:PORT")
    return address


class _RayWorker:
    """One Ray actor: the state init made (a loaded model), and work run on it."""

    def __init__(self, init: Callable, init_args: tuple, threads: int) -> None:
        self.state = init(*init_args, threads)

    def run(self, work: Callable, index: int, item: Any) -> tuple[int, Any]:
        return index, work(self.state, item)


def _run_on_ray(init: Callable, init_args: tuple, work: Callable, items: list, workers: int | None,
                threads: int | None, address: str) -> Iterator[tuple[int, Any]]:
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise SageError("--ray needs Ray, which is not installed: pip install 'sage[ray]'") from None
    started = not ray.is_initialized()
    if started:
        import logging

        logging.getLogger("ray").setLevel(logging.ERROR)  # its start-up notices are not sage's output
        try:
            if address == "local":
                ray.init(num_cpus=threads or available_cores(), include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise SageError(f"cannot start or join Ray at {address!r}: {str(e).splitlines()[0] if str(e) else e}") from None
    actors = []
    try:
        cpus = max(1, int(ray.available_resources().get("CPU", 1)))
        n = min(workers or cpus, len(items))
        per = max(1, cpus // n)
        actor = ray.remote(num_cpus=per)(_RayWorker)
        actors = [actor.remote(init, init_args, per) for _ in range(n)]
        pool = ActorPool(actors)
        results = pool.map_unordered(lambda a, v: a.run.remote(work, v[0], v[1]), list(enumerate(items)))
        while True:
            try:
                yield next(results)
            except StopIteration:
                break
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, SageError):
                    raise SageError(str(cause)) from None
                raise SageError(f"a Ray worker failed: {str(cause or e).splitlines()[0]}") from None
            except ray.exceptions.RayActorError:
                raise SageError("a Ray worker died (killed, or out of memory); what it finished is kept") from None
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()


def run_tasks(init: Callable, init_args: tuple, work: Callable, items: Sequence, workers: int | None = 1,
              threads: int | None = None, ray: str | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (index, work(state, items[index])) for every item, as each finishes.

    init and work must be module-level functions (a worker imports them by name); items
    and results must pickle. threads: the threads all workers share (default: the cores).
    ray: run on Ray at that address ("local", "auto", host:port); workers None there means
    one per CPU Ray offers."""
    if workers is not None and workers < 1:
        raise SageError("--workers must be at least 1")
    items = list(items)
    if not items:
        return
    if ray is not None:
        check_ray_address(ray)
        yield from _run_on_ray(init, init_args, work, items, workers, threads, ray)
        return
    workers = workers or available_cores()
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

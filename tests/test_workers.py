"""sage.workers (problems over worker processes) and label collection over them: every
result once, workers with their share of the threads, failures and kills that end the
run cleanly, and a labels file that a killed run resumes without losing or duplicating a
problem."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import worker_init, worker_work
from sage.errors import SageError
from sage.workers import run_tasks, threads_per_worker


def test_every_item_once_over_two_workers_with_a_thread_each():
    got = dict(run_tasks(worker_init, ("t",), worker_work, list(range(7)), workers=2, threads=2))
    assert sorted(got) == list(range(7))
    assert [r[3] for _, r in sorted(got.items())] == [2 * i for i in range(7)]
    pids = {r[0] for r in got.values()}
    assert len(pids) == 2 and os.getpid() not in pids  # two processes, neither this one
    assert {r[1] for r in got.values()} == {1}  # 2 threads shared by 2 workers


def test_one_worker_runs_here_with_all_the_threads():
    got = dict(run_tasks(worker_init, ("t",), worker_work, [1, 2], workers=1, threads=3))
    assert {r[0] for r in got.values()} == {os.getpid()} and {r[1] for r in got.values()} == {3}


def test_threads_per_worker():
    assert threads_per_worker(2, 2) == 1 and threads_per_worker(3, 2) == 1 and threads_per_worker(2, 8) == 4


def test_a_workers_error_ends_the_run_with_it():
    with pytest.raises(SageError, match="boom in a worker"):
        list(run_tasks(worker_init, ("t",), worker_work, [1, "boom", 2, 3], workers=2))


def test_a_worker_that_dies_is_an_error_not_a_hang():
    with pytest.raises(SageError, match="worker process died"):
        list(run_tasks(worker_init, ("t",), worker_work, [1, "die", 2, 3], workers=2))


def test_workers_must_be_positive():
    with pytest.raises(SageError, match="--workers"):
        list(run_tasks(worker_init, ("t",), worker_work, [1], workers=0))


_INTERRUPTED = """
import sys
sys.path.insert(0, sys.argv[1])
from helpers import worker_init, worker_work
from sage.workers import run_tasks
try:
    list(run_tasks(worker_init, ("t",), worker_work, ["pidfile:" + p for p in sys.argv[2:]], workers=2))
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_stops_the_workers(tmp_path):
    # a terminal's Ctrl-C reaches the whole process group: the workers ignore it, this
    # process stops them, and none is left running
    files = [tmp_path / "a", tmp_path / "b"]
    p = subprocess.Popen([sys.executable, "-c", _INTERRUPTED, str(Path(__file__).parent), *map(str, files)],
                         stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not all(f.exists() and f.read_text() for f in files) and time.time() < deadline:
        time.sleep(0.05)
    pids = [int(f.read_text()) for f in files]
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and b"Traceback" not in err, err
    time.sleep(0.2)
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)  # (not our child: raises; a zombie would be reaped)
        except ChildProcessError:
            pass
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --- Ray: the same, with the workers as actors ----------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (sage[ray]); the test extra installs it")
    # the actors import this folder's helpers by name, as the local workers do
    here = str(Path(__file__).parent)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}})
    yield
    ray.shutdown()


def test_ray_actors_every_item_once(local_ray):
    got = dict(run_tasks(worker_init, ("t",), worker_work, list(range(6)), workers=None, ray="local"))
    assert sorted(got) == list(range(6)) and [r[3] for _, r in sorted(got.items())] == [2 * i for i in range(6)]
    pids = {r[0] for r in got.values()}
    assert len(pids) == 2 and os.getpid() not in pids  # one actor per CPU Ray offers, 1 thread each
    assert {r[1] for r in got.values()} == {1}


def test_ray_worker_error_is_the_sage_error(local_ray):
    with pytest.raises(SageError, match="boom in a worker"):
        list(run_tasks(worker_init, ("t",), worker_work, [1, "boom", 2], workers=2, ray="local"))


@pytest.mark.parametrize("address", ["", "http://x", "host", "a b:1", "[x]:1"])
def test_bad_ray_address(address):
    with pytest.raises(SageError, match="--ray takes"):
        list(run_tasks(worker_init, ("t",), worker_work, [1], ray=address))


# --- labels over workers ------------------------------------------------------------------------

_COLLECT = """
import sys
from pathlib import Path
from sage.labels import LabelSettings, collect
from sage.problems import arithmetic_problems
items = [("arithmetic", p, i % 2 == 0) for i, p in enumerate(arithmetic_problems(int(sys.argv[3]), seed=7))]
ray = sys.argv[6] if len(sys.argv) > 6 else None
s = LabelSettings.for_model("smollm2-135m", max_tokens=40, n_random=2, n_candidates=0, samples=3, alternatives=1)
collect(Path(sys.argv[1]), items, Path(sys.argv[2]), s, n_threads=int(sys.argv[4]), workers=int(sys.argv[5]), ray=ray)
"""


def _collect(model, labels, n, threads, workers, *ray, **kw):
    return subprocess.Popen([sys.executable, "-c", _COLLECT, str(model), str(labels), str(n), str(threads), str(workers),
                             *ray], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _kill_when(p, path: Path, lines: int) -> None:
    """SIGKILL p's whole process group once `path` holds `lines` lines."""
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            break
        time.sleep(0.2)
    assert p.poll() is None, p.stderr.read()
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def _examples(path: Path, cut_ok: bool = False) -> dict[str, dict]:
    exs = []
    for ln in path.read_text().splitlines()[1:]:
        try:
            exs.append(json.loads(ln))
        except json.JSONDecodeError:
            assert cut_ok, ln  # only a killed run leaves a line cut short, its last
            break
    texts = [e["problem"]["text"] for e in exs]
    assert len(texts) == len(set(texts)), "a problem labelled twice"
    return {e["problem"]["text"]: e for e in exs}


@pytest.mark.slow
@pytest.mark.parametrize("ray", [None, "local"], ids=["local-workers", "ray"])
def test_labels_over_two_workers_equal_one_and_a_killed_run_resumes(tmp_path, one_worker_labels, smollm2_path, ray):
    if ray:
        pytest.importorskip("ray", reason="Ray is an optional extra (sage[ray]); the test extra installs it")
    backend = (ray,) if ray else ()  # Ray: a local instance of 2 CPUs, two actors
    ref, n = one_worker_labels, len(one_worker_labels)

    # two workers, killed (SIGKILL, the whole process group) once two problems are in
    path = tmp_path / "two.jsonl"
    _kill_when(_collect(smollm2_path, path, n, 2, 2, *backend, start_new_session=True), path, 3)
    part = _examples(path, cut_ok=True)
    assert 2 <= len(part) < n
    # resumed: what was there is kept, the rest is collected, nothing twice
    again = _collect(smollm2_path, path, n, 2, 2, *backend)
    _, err = again.communicate(timeout=900)
    assert again.returncode == 0, err
    done = _examples(path)
    assert set(done) == set(ref)
    for text, ex in done.items():
        assert _labelled(ex) == _labelled(ref[text]), text


@pytest.fixture(scope="module")
def one_worker_labels(smollm2_path, tmp_path_factory) -> dict[str, dict]:
    """The reference, collected once for both backends: 6 problems, one worker with one
    thread. Two workers with one thread each run the same kernels on the same batch
    shapes, so their labels are the same numbers."""
    path = tmp_path_factory.mktemp("one") / "one.jsonl"
    one = _collect(smollm2_path, path, 6, 1, 1)
    _, err = one.communicate(timeout=900)
    assert one.returncode == 0, err
    ref = _examples(path)
    assert len(ref) == 6
    return ref


def _labelled(ex: dict) -> dict:
    """What an example says (its trace's timings aside)."""
    keep = {k: ex[k] for k in ("prompt_tokens", "in_problem", "start", "tokens", "answer", "correct")}
    keep["chain"] = [t["id"] for t in ex["trace"]["tokens"]]
    return keep

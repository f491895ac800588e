"""Shared fixtures: the user data dir and HF cache redirected to temp dirs, no network,
and the embedded SmolLM2 model loaded once per session."""

from __future__ import annotations

import os

import pytest

# never touch the network or the real user dirs, whatever the test does
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# `make test` runs the files over pytest-xdist workers, one per core: each worker's
# llama.cpp and torch get one thread (two spinning llama.cpp thread pools on the same
# cores decode far slower than one each); the `sage` subprocesses a test starts inherit it
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("SAGE_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# the files with the longest tests first (in this order; the others after them, as
# collected): with --no-loadscope-reorder (the Makefile) xdist hands out files in this order,
# so the longest, `sage heads train` end to end (about 5 minutes), starts at once instead
# of running alone at the end
LONGEST_FIRST = ("test_heads_train.py", "test_workers.py", "test_arch.py", "test_presets.py", "test_bench.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGE_HOME", str(tmp_path / "sage-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def smollm2_path():
    from sage.presets import resolve_model

    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="session")
def engine(smollm2_path):
    from sage.engine import Engine

    eng = Engine(smollm2_path, n_ctx=1024, name="smollm2-135m")
    yield eng
    eng.close()


@pytest.fixture
def run_sage():
    """Run the installed `sage` command in a subprocess (the test's SAGE_HOME applies)."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("sage")

    def run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)

    return run


# property-based tests (hypothesis): a few hundred examples in the default run, 1 500 in
# the slow-marked twins (scripts/fuzz_loaders.py runs 10 000 and more outside the suite,
# which must stay near 10 minutes on 2 cores); no example database in the repository
try:
    from hypothesis import HealthCheck, settings

    _fuzz = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("sage-fuzz", max_examples=300, **_fuzz)
    settings.register_profile("sage-fuzz-slow", max_examples=1_500, **_fuzz)
except ImportError:  # the test extra is not installed: those tests skip
    pass

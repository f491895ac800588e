"""The Python API (sage.ask, sage.open_ask, sage.explain) and the one import name."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import sage
from sage.errors import SageError
from sage.trace import save_trace

PROBLEM = "Tom has 3 boxes with 12 eggs in each box. He uses 7 eggs. How many eggs are left?"
ROOT = Path(__file__).resolve().parents[1]


def test_import_sage_is_light():
    """`import sage` and the API module load neither llama.cpp nor torch (fresh process)."""
    code = (
        "import sys, sage, sage.api\n"
        "assert callable(sage.ask) and callable(sage.explain)\n"
        "heavy = [m for m in ('llama_cpp', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/", env=dict(os.environ))


def test_ask_streams_the_same_trace_it_returns():
    kw = dict(max_tokens=40, max_decisions=1, alternatives=1)
    trace = sage.ask(PROBLEM, **kw)
    with sage.open_ask(PROBLEM, **kw) as run:
        streamed = [t.id for t in run]
        again = run.analyze()
    assert streamed == [t.id for t in again.tokens] == [t.id for t in trace.tokens]  # greedy: same kernels, same shapes
    assert trace.analysis is not None and trace.analysis.tracker == "native"
    assert trace.analysis.heads.startswith("trained")  # the shipped sidecar of the embedded model


def test_ask_without_tracking_and_with_analytic_heads():
    plain = sage.ask(PROBLEM, max_tokens=16, track=False)
    assert plain.analysis is None and len(plain.tokens) == 16
    analytic = sage.ask(PROBLEM, max_tokens=24, heads="none", alternatives=0, threshold=0.5)
    assert analytic.analysis.heads == "analytic (built in)" and analytic.analysis.threshold == 0.5


def test_api_refusals():
    with pytest.raises(SageError, match="empty"):
        sage.ask("  ")
    with pytest.raises(SageError, match="needs tracking"):
        sage.ask(PROBLEM, track=False, exact=True)
    with pytest.raises(SageError, match="no heads sidecar"):
        sage.ask(PROBLEM, heads="/nonexistent.sage.gguf")


def test_explain_reads_the_newest_trace():
    with pytest.raises(SageError, match="no trace yet"):
        sage.explain()
    trace = sage.ask(PROBLEM, max_tokens=24, alternatives=0)
    from sage.paths import sage_home

    saved = save_trace(trace, sage_home())
    got = sage.explain()
    assert got.exact is None and got.trace.to_dict() == trace.to_dict()
    assert sage.explain(saved).trace.to_dict() == trace.to_dict()
    assert sage.explain(trace).trace is trace


@pytest.mark.slow  # builds the wheel (compiles the tracker)
def test_the_wheel_installs_one_import_name(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("sage-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"sage", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    for needed in ("sage/__init__.py", "sage/cli/main.py", "sage/inverse/observe.py", "sage/reference/arch/llama.py",
                   "sage/kernels/metal/reductions.metal", "sage/convert/verify.py",
                   "sage/sidecars/smollm2-135m.sage.gguf", "sage/sidecars/qwen2.5-coder-0.5b.sage.gguf"):
        assert needed in names, needed
    assert any(n.startswith("sage/kernels/_tracker") for n in names)


def test_without_torch_the_torch_side_is_one_line(tmp_path):
    """torch is an extra: without it `sage ask` runs and `sage convert` says what to install."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # as if torch were not installed
        "from sage.cli.main import main\n"
        "sys.argv = ['sage'] + sys.argv[1:]; main()\n"
    )
    convert = subprocess.run([sys.executable, "-c", code, "convert", str(tmp_path)], capture_output=True, text=True)
    lines = convert.stderr.strip().splitlines()
    assert convert.returncode == 2 and len(lines) == 1 and "pip install 'sage[torch]'" in lines[0], convert.stderr
    ask = subprocess.run([sys.executable, "-c", code, "ask", "What is 2 + 2?", "--max-tokens", "8", "--json"],
                         capture_output=True, text=True)
    assert ask.returncode == 0, ask.stderr

"""Count what the loaders raise on mutated input: the trace loader (and the views, for
what loads), the SAGE heads sidecar reader, and the GGUF check. The mutations are the
property-based tests' (tests/test_hostile.py); here every outcome is counted instead of
the first failure stopping the run.

    .venv/bin/python scripts/fuzz_loaders.py [--n 10000] [--only trace,sidecar,gguf]

Documented outcomes: loaded, TraceError (traces), SageError (sidecars; GGUFError is one)
and GGUFError (the check). Anything else is a crash, listed by exception type.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--only", default="trace,sidecar,gguf")
    args = ap.parse_args()

    from hypothesis import HealthCheck, given, settings

    import conftest  # noqa: F401  (registers the hypothesis profiles test_hostile uses)
    import test_hostile as th

    prof = settings(max_examples=args.n, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
    tmp = Path(tempfile.mkdtemp())
    crashes = 0

    def trace(raw: str) -> str:
        from sage.trace import TraceError, load_trace

        f = tmp / "t.json"
        f.write_text(raw, encoding="utf-8", errors="surrogatepass")
        try:
            t = load_trace(f)
        except TraceError:
            return "TraceError"
        th._render_all(t)
        return "loaded (and rendered)"

    def sidecar(data: bytes) -> str:
        from sage.errors import SageError
        from sage.heads import SageHeads

        f = tmp / "h.sage.gguf"
        f.write_bytes(data)
        try:
            SageHeads.load(f)
        except SageError as e:
            return type(e).__name__ if type(e).__name__ == "SageError" else "SageError"
        return "loaded"

    def gguf(data: bytes) -> str:
        from sage.gguf_check import GGUFError, check_model

        f = tmp / "m.gguf"
        f.write_bytes(data)
        try:
            check_model(f)
        except GGUFError:
            return "GGUFError"
        return "passed"

    documented = {"TraceError", "SageError", "GGUFError", "loaded", "loaded (and rendered)", "passed"}
    jobs = {
        "trace": (trace, th.trace_mutations()),
        "sidecar": (sidecar, th.edits(th.SHIPPED_HEADS.read_bytes(), 2500)),
    }
    if "gguf" in args.only:
        jobs["gguf"] = (gguf, th.edits(th._tiny_model(tmp / "tiny.gguf").read_bytes(), 1200))
    for name in args.only.split(","):
        fn, strategy = jobs[name]
        counts: collections.Counter = collections.Counter()

        @prof
        @given(strategy)
        def run(x):
            try:
                counts[fn(x)] += 1
            except Exception as e:  # noqa: BLE001 - counted, that is the point
                counts[f"crash: {type(e).__name__}"] += 1

        t0 = time.time()
        run()
        n = sum(counts.values())
        bad = sum(c for k, c in counts.items() if k not in documented)
        crashes += bad
        print(f"{name}: {n} inputs in {time.time() - t0:.0f} s, {bad} crashes")
        for k, c in counts.most_common():
            print(f"  {c:6d}  {k}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed of `sage ask` against llama-cpp-python's own generation, in one run.

    .venv/bin/python scripts/bench_ask.py [--reps 5] [--tokens 200] [--model smollm2-135m]

Interleaves, per repetition, on the same GGUF, prompt, thread count and greedy decoding
(all produce the same tokens): (a) `Llama.create_completion`; sage's ReasonRun with the
live view rendering to a null terminal (b) without tracking, (c) with the native
attention tracker, (d) with the Python tracker callback. Reports tokens/s medians and
ratios. Then the cost of rollouts: one analyzed run, branch tokens per second against
the chain's own generation speed, exact (one branch per decode) and batched. Last, starts
`sage ask --json --no-track` as a fresh process a few times and reports the time from
process start to the first generated token (from /proc, see sage.reason).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


PROBLEM = "List the numbers from 1 to 100 in words, one per line, then say which is the longest word."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--starts", type=int, default=5, help="process starts for first-token timing")
    args = ap.parse_args()

    from llama_cpp import Llama
    from rich.console import Console

    from sage.engine import Engine
    from sage.reason import ReasonRun
    from sage.presets import resolve_model
    from sage.cli.ui import THEME, AskView

    path = resolve_model(args.model).path
    eng = Engine(path, n_ctx=2048)
    engines = {
        "sage": eng,
        "sage+track": Engine(path, n_ctx=2048, track=True),
        "sage+track(py)": Engine(path, n_ctx=2048, track=True, native_tracker=False),
    }
    llm = Llama(str(path), n_ctx=2048, n_threads=eng.n_threads, n_threads_batch=eng.n_threads, verbose=False)
    view = AskView(Console(file=io.StringIO(), theme=THEME, force_terminal=True, width=100))

    def run_llama() -> tuple[int, float]:
        prompt, _ = eng.build_prompt(PROBLEM)
        toks = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        n, t_first = 0, None
        for _ in llm.create_completion(toks, max_tokens=args.tokens, temperature=0.0, stream=True):
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
        return n, time.perf_counter() - t_first

    def run_sage(e) -> tuple[int, float]:
        run = ReasonRun(e, PROBLEM, max_tokens=args.tokens)
        n, t_first = 0, None
        for rec in run:
            view.token(rec.text, rec.prob)
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
        return n, time.perf_counter() - t_first

    fns = {"llama": run_llama, **{k: (lambda e=e: run_sage(e)) for k, e in engines.items()}}
    for fn in fns.values():  # warm-up
        fn()
    rates = {k: [] for k in fns}
    for _ in range(args.reps):
        for name, fn in fns.items():
            n, dt = fn()
            # tokens after the first, over the time after the first (prompt excluded)
            rates[name].append((n - 1) / dt)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"model {path.name}, {eng.n_threads} threads, {args.tokens} tokens x {args.reps} reps (interleaved)")
    for k, v in rates.items():
        print(f"  {k:15s} tok/s median {med[k]:7.1f}  min {min(v):7.1f}  max {max(v):7.1f}")
    print(f"  sage / llama-cpp-python            = {med['sage'] / med['llama']:.3f}")
    print(f"  sage+track / sage (native tracker) = {med['sage+track'] / med['sage']:.3f}")
    print(f"  sage+track(py) / sage              = {med['sage+track(py)'] / med['sage']:.3f}")
    for e in engines.values():
        e.close()
    llm.close()

    from sage.inverse import AnalysisConfig
    from sage.reason import reason

    problem = "Tom has 3 boxes with 12 eggs in each box. He uses 7 eggs. How many eggs are left?"
    reng = Engine(path, n_ctx=4096, track=True, n_seq_max=7)
    for batch in (False, True):
        tr = reason(reng, problem, max_tokens=args.tokens,
                    analysis=AnalysisConfig(max_decisions=3, alternatives=2, batch_rollouts=batch, method="greedy"))
        t = tr.analysis.timings
        print(f"rollouts ({'batched' if batch else 'exact, one branch per decode'}): "
              f"{t['rollout_tokens']:.0f} branch tokens in {t['rollout_s']:.2f} s = {t['rollout_tokens_per_s']:.1f} tok/s "
              f"vs chain {tr.timings['tokens_per_s']:.1f} tok/s (ratio {t['rollout_tokens_per_s'] / tr.timings['tokens_per_s']:.2f}); "
              f"analysis without rollouts {t['significance_s'] * 1000:.1f} ms")
    reng.close()

    sage = Path(sys.executable).with_name("sage")
    firsts = []
    for _ in range(args.starts):
        out = subprocess.run(
            [str(sage), "ask", "What is 6 * 7?", "--max-tokens", "4", "--json", "--no-track", "--model", args.model],
            capture_output=True, text=True, env=dict(os.environ, SAGE_HOME=os.environ.get("SAGE_HOME", "/tmp/sage-bench")),
        )
        firsts.append(json.loads(out.stdout)["timings"]["first_token_s"])
    print(f"process start -> first token: median {statistics.median(firsts):.2f} s "
          f"(min {min(firsts):.2f}, max {max(firsts):.2f}, {args.starts} starts)")


if __name__ == "__main__":
    main()

"""Where the tracking overhead comes from: decode speed against the number of observed layers.

    .venv/bin/python scripts/bench_tracking.py [--reps 3] [--tokens 200] [--threads 2]

The tracker observes two tensors per tracked layer (kq_soft_max-L and Vcur-L) through
llama.cpp's scheduler eval callback; every observed node ends a graph split (the graph is
computed up to it, the callback reads it, the rest is computed after). If the cost were
the callback's own work it would be small and the same for the native and the Python
tracker; if it is the splits, it grows with the number of observed nodes. This script
interleaves, per repetition, the same greedy chain without tracking and with 1, 2, 4 and
8 tracked layers (native tracker), plus 4 layers with the Python callback, and reports
tokens/s medians, the ratio to untracked, and the cost per observed node in microseconds.

Two more configurations separate the callback's asking from the observing: "callback
only" installs the callback (native or Python) but observes nothing, so llama.cpp asks it
about every node of every graph and computes each graph in one piece, as without a
callback. The nodes asked per generated token are counted once, with a counting Python
callback, so the Python callback's cost per call can be read off.
"""

from __future__ import annotations

import argparse
import statistics
import time


PROBLEM = "List the numbers from 1 to 100 in words, one per line, then say which is the longest word."


def decode_speed(engine, tokens: int) -> float:
    """Tokens per second of the chain after its first token (the prompt excluded)."""
    from sage.reason import ReasonRun

    run = ReasonRun(engine, PROBLEM, max_tokens=tokens)
    t_first, n = None, 0
    for _ in run:
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
    return (n - 1) / (time.perf_counter() - t_first)


def nodes_per_token(path, threads: int, tokens: int = 17) -> float:
    """How many graph nodes llama.cpp asks the eval callback about per generated token."""
    from sage.engine import Engine
    from sage.kernels import tracker as T
    from sage.reason import ReasonRun

    calls = [0]
    orig = T.PythonCallback.__call__

    def counting(self, tensor, ask, user_data):
        calls[0] += bool(ask)
        return orig(self, tensor, ask, user_data)

    T.PythonCallback.__call__ = counting
    try:
        eng = Engine(path, n_ctx=512, n_threads=threads, track=True, native_tracker=False)
        marks = []
        for _ in ReasonRun(eng, PROBLEM, max_tokens=tokens):
            marks.append(calls[0])
        eng.close()
    finally:
        T.PythonCallback.__call__ = orig
    return (marks[-1] - marks[0]) / (len(marks) - 1)


def callback_only(engine) -> None:
    """Keep the callback installed but never observe: every node is asked, none is needed."""
    tr = engine.tracker
    tr.before_decode = lambda pos0, n_tokens, row: tr.pause()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()

    from sage.bench import cpu_name
    from sage.engine import Engine
    from sage.presets import resolve_model

    path = resolve_model(args.model).path
    probe = Engine(path, n_ctx=1024, n_threads=args.threads)
    full = probe.full_attention_layers()
    probe.close()
    top = full[len(full) // 2:]

    def pick(k: int) -> list[int]:
        step = max(1, len(top) // k)
        return sorted(set(top[::-1][::step][:k]))

    configs = [("untracked", dict(track=False)),
               ("native, callback only (0 nodes)", dict(track=True, track_layers=pick(4))),
               ("python, callback only (0 nodes)", dict(track=True, track_layers=pick(4), native_tracker=False))]
    for k in (1, 2, 4, 8):
        configs.append((f"native, {k} layer{'s' if k > 1 else ''} ({2 * k} nodes)",
                        dict(track=True, track_layers=pick(k))))
    configs.append(("python, 4 layers (8 nodes)", dict(track=True, track_layers=pick(4), native_tracker=False)))
    engines = {name: Engine(path, n_ctx=1024, n_threads=args.threads, **kw) for name, kw in configs}
    for name, _ in configs[1:3]:
        callback_only(engines[name])
    asked = nodes_per_token(path, args.threads)
    speeds: dict[str, list[float]] = {name: [] for name, _ in configs}
    for name, _ in configs:  # warm up each once
        decode_speed(engines[name], 16)
    for _ in range(args.reps):
        for name, _ in configs:
            speeds[name].append(decode_speed(engines[name], args.tokens))
    for e in engines.values():
        e.close()
    base = statistics.median(speeds["untracked"])
    print(f"{args.model}, {args.tokens} tokens, {args.threads} threads, {args.reps} reps interleaved; CPU: {cpu_name()}")
    print(f"nodes asked per generated token: {asked:.0f}")
    print(f"{'configuration':34} {'tok/s':>8} {'ratio':>7} {'µs per observed node':>21}")
    for name, kw in configs:
        s = statistics.median(speeds[name])
        if "callback only" in name:
            per_call = (1 / s - 1 / base) / asked * 1e6
            print(f"{name:34} {s:8.1f} {s / base:7.3f} {'':>21}  ({per_call:.2f} µs per node asked)")
            continue
        nodes = 2 * len(kw.get("track_layers") or [])
        per = (1 / s - 1 / base) / nodes * 1e6 if nodes else float("nan")
        print(f"{name:34} {s:8.1f} {s / base:7.3f} {per:21.0f}" if nodes else f"{name:34} {s:8.1f} {1:7.3f} {'':>21}")


if __name__ == "__main__":
    main()

"""How well the llama.cpp path's proxy ranks like exact eq. 7, and what the exact form costs.

    .venv/bin/python scripts/bench_exact.py [--problems 10] [--max-tokens 120] [--model smollm2-135m]

For each of the first N GSM8K training problems: a greedy chain with attention tracking
(no rollouts), the proxy significance from llama.cpp's tracker rows exactly as `sage ask`
computes it, the exact significance (torch reference model, gradients) on the same trace,
and their Spearman correlation per step over the candidate positions. Also reported, to
read that number honestly: the gradient factor alone (value-norm proxy vs |grad L_i|;
both significances share the attention factor w), attention w alone against the exact
significance (the baseline the proxy factor should beat), and llama.cpp's proxy against the
same formula on the torch model (parity, ~1). Last, the time of the exact computation for a
200-token trace.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from sage.reference.compare import compare_on_problem

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_train.jsonl"


def spread(xs: list[float]) -> str:
    xs = [x for x in xs if np.isfinite(x)]
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    mid, lo, hi = statistics.median(xs), min(xs), max(xs)
    return f"{statistics.fmean(xs):+.3f} ± {sd:.3f} (median {mid:+.3f}, min {lo:+.3f}, max {hi:+.3f}, n={len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=120)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--grad-layer", type=int, default=None, help="default: the first tracked layer; 0 = embeddings")
    ap.add_argument("--timing-tokens", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of the exact computation")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the engine's)")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()

    import torch

    from sage.engine import Engine
    from sage.reference.exact import exact_significance, load_model
    from sage.reason import reason
    from sage.presets import resolve_model

    path = resolve_model(args.model).path
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(f"model {args.model}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    t = time.perf_counter()
    load_model(path)
    print(f"torch reference model loaded from the GGUF in {time.perf_counter() - t:.1f} s (once per process)\n")

    problems = [json.loads(line)["question"] for line in DATA.read_text().splitlines()[: args.problems]]
    if problems:
        correlations(problems, path, args)

    eng = Engine(path, n_ctx=2048, n_threads=args.threads)
    try:
        # the first GSM8K problem whose chain runs the whole token budget
        for q in [json.loads(line)["question"] for line in DATA.read_text().splitlines()[:20]]:
            trace = reason(eng, q, max_tokens=args.timing_tokens)
            if len(trace.tokens) >= args.timing_tokens:
                break
        times = []
        for _ in range(args.reps):
            res = exact_significance(trace, path, grad_layer=args.grad_layer, engine=eng)
            times.append(res.timings)
    finally:
        eng.close()
    med = {k: statistics.median(t[k] for t in times) * 1000 for k in ("forward_s", "backward_s", "exact_s")}
    each = ", ".join(f"{t['exact_s'] * 1000:.0f}" for t in times)
    print(f"\nexact eq. 7 on a {len(trace.tokens)}-token trace ({trace.prompt_tokens} prompt tokens, "
          f"{len(trace.steps)} steps; load average {os.getloadavg()[0]:.1f}), "
          f"median of {args.reps}: {med['exact_s']:.0f} ms "
          f"(forward {med['forward_s']:.0f} ms, backward {med['backward_s']:.0f} ms for all steps); "
          f"each run: {each} ms")


def correlations(problems: list[str], path: Path, args: argparse.Namespace) -> None:
    keys = ("spearman", "factor_spearman", "attention_spearman", "torch_proxy_spearman", "parity_spearman")
    steps: dict[str, list[float]] = {k: [] for k in keys}
    means: list[float] = []
    print(" #  tokens steps  proxy~exact  factor~grad  attn~exact")
    for i, q in enumerate(problems):
        c = compare_on_problem(q, path, args.max_tokens, grad_layer=args.grad_layer, n_threads=args.threads)
        for k in keys:
            steps[k] += [float(x) for x in getattr(c, k) if np.isfinite(x)]
        means.append(c.mean)
        print(f"{i:2d}  {len(c.trace.tokens):6d} {len(c.trace.steps):5d}  {c.mean:+11.3f}  "
              f"{np.nanmean(c.factor_spearman):+11.3f}  {np.nanmean(c.attention_spearman):+10.3f}")
    print(f"\nper-step Spearman over candidate positions, gradient w.r.t. hidden[{c.exact.grad_layer}], "
          f"tracked layers {c.exact.layers}:")
    print(f"  llama.cpp proxy significance vs exact:        {spread(steps['spearman'])}")
    print(f"    per-problem means:                          {spread(means)}")
    print(f"  gradient factor alone (value norm vs |grad|): {spread(steps['factor_spearman'])}")
    print(f"  attention w alone vs exact (baseline):        {spread(steps['attention_spearman'])}")
    print(f"  proxy formula on torch tensors vs exact:      {spread(steps['torch_proxy_spearman'])}")
    print(f"  llama.cpp proxy vs torch proxy (parity):      {spread(steps['parity_spearman'])}")


if __name__ == "__main__":
    main()

"""The llama.cpp proxy against exact eq. 7 on one problem, factor by factor: what
scripts/bench_exact.py reports (a module of its own so that exact.py need not import the
reasoning run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sage.engine import Engine
from sage.errors import SageError
from sage.inverse import AnalysisConfig
from sage.inverse.observe import Observation
from sage.kernels.reference import aggregate_rows, value_norm_proxy
from sage.reason import reason
from sage.reference.exact import ExactResult, exact_significance, per_step_spearman
from sage.trace import Trace


@dataclass
class Comparison:
    """The llama.cpp path's proxy against exact eq. 7 on one freshly generated trace.
    Per-step arrays have nan where a step has fewer than two candidates or a constant row."""

    trace: Trace
    proxy: np.ndarray  # (n_steps, n_pos) Observation.significance from llama.cpp's tracker rows
    exact: ExactResult
    spearman: np.ndarray  # (n_steps,) llama.cpp proxy significance vs exact significance
    mean: float  # nanmean of `spearman`: the reported number
    factor_spearman: np.ndarray  # (n_steps,) gradient factor alone: value-norm proxy vs |grad L_i|
    attention_spearman: np.ndarray  # (n_steps,) baseline: llama.cpp attention w alone (no factor) vs exact
    torch_proxy_spearman: np.ndarray  # (n_steps,) the proxy formula on torch tensors vs exact
    parity_spearman: np.ndarray  # (n_steps,) llama.cpp proxy vs the same formula on torch (sanity, ~1)


def compare_on_problem(
    problem: str,
    model_path: str | Path,
    max_tokens: int = 120,
    grad_layer: int | None = None,
    n_threads: int | None = None,
) -> Comparison:
    """Generate a greedy chain for `problem` with tracking on (no rollouts), take the
    proxy significance from the llama.cpp tracker's rows as `sage ask` does, compute the
    exact significance on the same trace, and correlate them per step. n_threads: llama.cpp's
    (default: the engine's)."""
    eng = Engine(model_path, n_ctx=2048, n_threads=n_threads, track=True, n_seq_max=1)
    try:
        trace = reason(eng, problem, max_tokens=max_tokens, analysis=AnalysisConfig(alternatives=0, budget=0))
        if not trace.tokens:
            raise SageError("nothing was generated to compare")
        obs = Observation.from_engine(eng, trace, eng.tokenize_prompt(trace.prompt, trace.problem))
        proxy, attn, vattn = obs.significance, obs.attn, obs.vattn
        exact = exact_significance(trace, model_path, grad_layer=grad_layer, engine=eng)
    finally:
        eng.close()
    n_pos = proxy.shape[1]
    # the two factors of the proxy apart: attention alone, and the value-norm factor alone
    w, factor = np.zeros_like(proxy), np.zeros_like(proxy)
    for s in trace.steps:
        a, b = s.token_start, s.token_end
        w[s.index] = aggregate_rows(attn[a:b, :n_pos])
        factor[s.index] = value_norm_proxy(w[s.index], aggregate_rows(vattn[a:b, :n_pos]))
    rho = per_step_spearman(proxy, exact.significance, exact.candidates)
    return Comparison(
        trace=trace,
        proxy=proxy,
        exact=exact,
        spearman=rho,
        mean=float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan"),
        factor_spearman=per_step_spearman(factor, exact.grad_norm, exact.candidates),
        attention_spearman=per_step_spearman(w, exact.significance, exact.candidates),
        torch_proxy_spearman=per_step_spearman(exact.proxy, exact.significance, exact.candidates),
        parity_spearman=per_step_spearman(proxy, exact.proxy, exact.candidates),
    )

"""Exact eq. 7 over a saved trace, against what the trace recorded: what `sage explain
--exact` shows (imports torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sage.engine import Engine
from sage.errors import SageError
from sage.heads import SageHeads, resolve_heads
from sage.inverse.observe import map_prompt
from sage.presets import Resolved
from sage.reference.exact import exact_significance, proxy_agreement
from sage.trace import Dependency, Trace

EXACT_TOP = 3  # earlier tokens shown per step


@dataclass
class DecisionCheck:
    """A decision point of the trace under exact eq. 7. Significance of a generated token:
    its largest normalized significance over the steps (as Decision.significance); rank
    among the generated tokens that could be decision points (non-blank text), 1 = most."""

    rank: int  # the decision's rank in the trace
    step: int
    text: str
    recorded: float  # significance the trace recorded (the proxy's, or exact with ask --exact)
    exact: float
    exact_rank: int
    proxy: float  # the proxy formula on the torch model's attention and values
    proxy_rank: int


@dataclass
class ExactReport:
    method: str  # how the gradient factor was computed
    attention: str  # how the attention rows w_ij were aggregated
    spearman: float | None  # proxy formula vs exact: mean per-step Spearman (None: undefined)
    timings: dict[str, float]  # exact_s, forward_s, backward_s, load_s
    n_ranked: int  # generated tokens ranked
    steps: list[tuple[int, list[Dependency]]]  # per step: its most significant earlier tokens (exact)
    decisions: list[DecisionCheck]


def trace_heads(trace: Trace, model_path: Path):
    """The SAGE heads sidecar the trace was analyzed with, found as `sage ask` finds one
    (beside the model, the user dir, the shipped one) and recognized by its description;
    None for the built-in analytic heads or when it is not found."""
    recorded = trace.analysis.heads if trace.analysis is not None else None
    if not recorded or "sidecar" not in recorded:
        return None
    where = resolve_heads(None, model_path, Resolved(model_path, trace.model.name).preset)
    if where is None:
        return None
    try:
        heads = SageHeads.load(where)
    except SageError:
        return None
    return heads if heads.describe() == recorded else None


def exact_report(trace: Trace, top: int = EXACT_TOP) -> ExactReport:
    """Exact eq. 7 over a saved trace with the trace's own model file (imports torch)."""
    path = Path(trace.model.path)
    if not path.is_file():
        raise SageError(f"exact eq. 7 needs the model that made this trace, and there is no file at {path}")
    if not trace.tokens or not trace.steps:
        raise SageError("exact eq. 7: the trace has no generated steps")
    heads = trace_heads(trace, path)
    # the tokenizer (the prompt is re-tokenized as `sage ask` did) and, with the trace's
    # own SAGE heads, the tracker's layers and head weights that aggregate the attention
    eng = Engine(path, n_ctx=256, heads=heads, track=heads is not None)
    try:
        res = exact_significance(trace, engine=eng)
        prompt_tokens = eng.tokenize_prompt(trace.prompt, trace.problem)
        texts = map_prompt(eng, prompt_tokens, trace.prompt, trace.problem).texts + [t.text for t in trace.tokens]
    finally:
        eng.close()
    rho = proxy_agreement(trace, res)
    n_prompt = res.n_prompt
    steps = []
    for s in trace.steps:
        row, mask = res.significance[s.index], res.candidates[s.index]
        order = [int(j) for j in np.argsort(-row, kind="stable") if mask[j] and row[j] > 0][:top]
        deps = [
            Dependency(j, texts[j], "prompt" if j < n_prompt else "output", float(row[j])) for j in order
        ]
        steps.append((s.index, deps))

    def best(sig: np.ndarray) -> np.ndarray:  # (n_gen,) a generated token's largest significance
        return sig[:, n_prompt:].max(axis=0)

    eligible = np.array([bool(t.text.strip()) for t in trace.tokens])
    ex, px = best(res.significance), best(res.proxy)

    def rank(v: np.ndarray, k: int) -> int:
        return 1 + int((v[eligible] > v[k]).sum())

    checks = [
        DecisionCheck(d.rank, d.step, d.text, d.significance, float(ex[d.token_index]), rank(ex, d.token_index),
                      float(px[d.token_index]), rank(px, d.token_index))
        for d in sorted(trace.analysis.decisions if trace.analysis else [], key=lambda d: d.rank)
        if 0 <= d.token_index < len(trace.tokens)
    ]
    if heads is not None:
        n = int((heads.head_weights > 0).sum())
        attention = f"{heads.describe()}: {n} heads in layers {', '.join(map(str, heads.tracked_layers))}"
    else:
        attention = f"mean over all heads of layers {', '.join(map(str, res.layers))}"
    return ExactReport(
        method=res.method,
        attention=attention,
        spearman=rho if math.isfinite(rho) else None,
        timings=dict(res.timings),
        n_ranked=int(eligible.sum()),
        steps=steps,
        decisions=checks,
    )

"""Stage 2 of the inverse analysis: the decision points, proposed from the significance
(analytic heads) or the SAGE heads' inverse analysis layer (trained heads)."""

from __future__ import annotations

import numpy as np

from sage.heads import FEATURES
from sage.inverse.config import AnalysisConfig, is_choice
from sage.inverse.forks import distinct_alternatives
from sage.inverse.observe import Observation, step_of_tokens
from sage.kernels.reference import normalize_max
from sage.trace import Decision, Dependency, Trace


def token_features(obs: Observation, sig: np.ndarray | None = None) -> np.ndarray:
    """(n_gen, len(FEATURES)) per-token features of the inverse analysis layer, in the
    order of sage.heads.FEATURES. sig: the significance to use (default: the proxy's)."""
    trace, n_prompt = obs.trace, obs.n_prompt
    sig = obs.significance if sig is None else sig
    attn, vattn = obs.attn, obs.vattn
    n_gen = len(trace.tokens)
    f = np.zeros((n_gen, len(FEATURES)), np.float32)
    col = FEATURES.index
    gen_sig = sig[:, n_prompt : n_prompt + n_gen]
    f[:, col("significance")] = gen_sig.max(axis=0) if len(trace.steps) else 0.0
    ans_end = trace.answer.char_end if trace.answer is not None and trace.answer.value is not None else None
    offset = 0
    for k, t in enumerate(trace.tokens):
        f[k, col("entropy")] = t.entropy
        f[k, col("varentropy")] = t.varentropy
        f[k, col("prob")] = t.prob
        f[k, col("margin")] = t.top[0].prob - (t.top[1].prob if len(t.top) > 1 else 0.0)
        alts = distinct_alternatives(t)
        f[k, col("alt_prob")] = alts[0].prob if alts else 0.0
        f[k, col("digit")] = float(any(c.isdigit() for c in t.text))
        f[k, col("alt_digit")] = float(bool(alts) and any(c.isdigit() for c in alts[0].text))
        f[k, col("before_answer")] = float(ans_end is None or offset < ans_end)
        offset += len(t.text)
    if n_gen:
        ent = np.array([t.entropy for t in trace.tokens], np.float64)
        csum = np.r_[0.0, np.cumsum(ent)]
        idx = np.arange(n_gen)
        lo, hi = np.maximum(idx - 8, 0), np.minimum(idx + 9, n_gen)
        before = np.where(idx > lo, (csum[idx] - csum[lo]) / np.maximum(idx - lo, 1), ent)
        f[:, col("entropy_delta")] = ent - before
        f[:, col("entropy_after")] = np.where(hi > idx + 1, (csum[hi] - csum[idx + 1]) / np.maximum(hi - idx - 1, 1), 0.0)
        f[:, col("chain_position")] = idx / max(n_gen - 1, 1)
    # rows r > k are the queries at positions >= the token's own
    cols = n_prompt + np.arange(n_gen)
    a = attn[:n_gen][:, cols]  # (rows, tokens)
    v = vattn[:n_gen][:, cols]
    later = np.triu(np.ones((n_gen, n_gen), bool), k=1).T  # later[r, k] = r > k
    n_later = np.maximum(later.sum(axis=0), 1)
    f[:, col("attention_received")] = (a * later).sum(axis=0) / n_later
    f[:, col("value_received")] = (v * later).sum(axis=0) / n_later
    f[:, col("attention_peak")] = (a * later).max(axis=0) if n_gen else 0.0
    for st in trace.steps:
        n = st.token_end - st.token_start
        if n > 0:
            f[st.token_start : st.token_end, col("position")] = np.arange(n) / max(n - 1, 1)
    return f


def find_decisions(
    trace: Trace,
    sig: np.ndarray,
    n_prompt: int,
    cfg: AnalysisConfig,
    scores: np.ndarray | None = None,
    threshold: float | None = None,
    trained: bool = False,
) -> tuple[list[Decision], int]:
    """Decision points; returns (ranked decisions, number of candidate tokens before
    merging). scores: the inverse analysis layer's per-token output (default: the eq. 7
    significance itself, which the analytic heads reproduce); a token is a candidate at
    scores >= threshold. Ranked by significance x (1 - p) for analytic scores, by the
    trained head's probability otherwise."""
    n_gen = len(trace.tokens)
    owner = step_of_tokens(trace)
    gen_sig = sig[:, n_prompt : n_prompt + n_gen]  # (n_steps, n_gen)
    best = gen_sig.max(axis=0) if len(trace.steps) else np.zeros(n_gen)
    scores = best if scores is None else scores
    threshold = cfg.threshold if threshold is None else threshold
    cands = []
    for k, tok in enumerate(trace.tokens):
        if scores[k] < threshold or not is_choice(tok, cfg.min_alt_prob):
            continue
        cands.append((float(scores[k]) if trained else float(best[k]) * (1.0 - tok.prob), k))
    by_step: dict[int, list[tuple[float, int]]] = {}
    for score, k in cands:
        by_step.setdefault(int(owner[k]), []).append((score, k))
    decisions = []
    for step, group in by_step.items():
        score, k = max(group)
        tok = trace.tokens[k]
        decisions.append(
            Decision(
                rank=0,
                token_index=k,
                position=n_prompt + k,
                step=step,
                text=tok.text,
                prob=tok.prob,
                entropy=tok.entropy,
                significance=float(best[k]),
                score=float(score),
                dependents=[int(i) for i in np.flatnonzero(gen_sig[:, k] >= cfg.threshold)],
                merged=len(group) - 1,
                alternatives=[a for a in tok.top if a.id != tok.id][:5],
                branches=[],
                dependencies=[],
                confirmed=None,
            )
        )
    decisions.sort(key=lambda d: -d.score)
    decisions = decisions[: cfg.max_decisions]
    for i, d in enumerate(decisions):
        d.rank = i + 1
    return decisions, len(cands)



def dependencies_of(k: int, obs: Observation, top: int = 5) -> list[Dependency]:
    """What the query that produced generated token k drew on most: attention-weighted
    value norm over earlier content tokens, normalized to the strongest."""
    n_prompt, texts = obs.n_prompt, obs.texts
    q = n_prompt + k - 1  # position of the query that produced token k
    row = obs.vattn[k, : q + 1]
    mask = obs.content[: q + 1].copy()
    mask[q] = False  # its own position
    w = normalize_max(row, mask)
    order = [int(j) for j in np.argsort(-w, kind="stable") if mask[j] and w[j] > 0][:top]
    return [
        Dependency(position=j, text=texts[j], source="prompt" if j < n_prompt else "output", weight=float(w[j]))
        for j in order
    ]

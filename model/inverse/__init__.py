"""Inverse reasoning: look back over a finished chain to find where it could have gone
another way, what the alternatives were, where they lead, and how confident to be.

Inputs: the trace (tokens with their top-5 alternatives and entropies, steps, answer)
and the attention rows the tracker recorded during generation. The stages, one module each:

1. `observe`: the prompt map, content mask and tracker rows of the chain, and from them
   the significance (paper eq. 7) of every earlier token for every step, normalized per step;
2. `decisions`: generated tokens at or above the threshold, merged per step, ranked by
   significance x (1 - p(chosen)) (or by the trained heads' decision score);
3. `rollout`: the strongest alternatives at each decision point are forced on a copy of
   the KV sequence (shared prefix, never re-evaluated) and decoded to an answer;
4. `explain`: confidence, consistency (share of decision points the rollouts confirm;
   below 0.8 the ranking is refined by the counterfactual evidence), and the explanation.
"""

from __future__ import annotations

import time

import numpy as np

from sage.heads import SageHeads
from sage.inverse.config import CONSISTENCY_TARGET, PROXY, AnalysisConfig
from sage.inverse.decisions import dependencies_of, find_decisions, token_features
from sage.inverse.explain import explain, meta_features, risk
from sage.inverse.observe import Observation, map_prompt
from sage.inverse.rollout import rollout
from sage.trace import Analysis, Trace


def analyze(
    engine,
    trace: Trace,
    prompt_tokens: list[int],
    cfg: AnalysisConfig | None = None,
    stops: tuple[str, ...] = (),
    significance: np.ndarray | None = None,
) -> Analysis:
    """Inverse analysis of a finished trace generated on `engine` with tracking on.

    significance: (n_steps, n_prompt + n_gen) normalized eq. 7 significance to use in
    place of the proxy from the tracker rows (exact eq. 7 with `sage ask --exact`)."""
    cfg = cfg or AnalysisConfig()
    tr = engine.tracker
    if tr is None:
        raise ValueError("analysis needs an engine created with track=True")
    t0 = time.time()
    obs = Observation.from_engine(engine, trace, prompt_tokens)
    if significance is None:
        sig = obs.significance
    else:
        sig = np.asarray(significance, dtype=np.float64)
        if sig.shape != (len(trace.steps), obs.n_pos):
            raise ValueError(f"significance of shape {sig.shape} does not fit the trace")
    heads: SageHeads | None = engine.heads
    if heads is not None and heads.trained:
        scores = heads.inverse(token_features(obs, sig))
        cand_threshold = heads.threshold if cfg.score_threshold is None else cfg.score_threshold
        decisions, n_cands = find_decisions(trace, sig, obs.n_prompt, cfg, scores, cand_threshold, trained=True)
    else:
        # analytic heads pass the significance feature through: the eq. 7 pipeline itself
        cand_threshold = cfg.threshold
        decisions, n_cands = find_decisions(trace, sig, obs.n_prompt, cfg)
    for d in decisions:
        d.dependencies = dependencies_of(d.token_index, obs)
    t1 = time.time()
    timings = {"significance_s": t1 - t0}
    if cfg.alternatives > 0 and decisions:
        timings.update(rollout(engine, trace, prompt_tokens, decisions, cfg, stops))
    notes: list[str] = []
    rolled = [d for d in decisions if d.branches]
    for d in rolled:
        d.confirmed = any(b.changed for b in d.branches)
    consistency = sum(d.confirmed for d in rolled) / len(rolled) if rolled else None
    refined = False
    if consistency is not None and consistency < CONSISTENCY_TARGET:
        # refine: the counterfactual evidence outranks the attention-based score
        before = [d.token_index for d in decisions]
        decisions.sort(key=lambda d: (-(1 if d.confirmed else 0), -risk(d), -d.score))
        for i, d in enumerate(decisions):
            d.rank = i + 1
        refined = True
        unconfirmed = [d for d in rolled if not d.confirmed]
        notes.append(
            f"consistency {consistency:.2f} < {CONSISTENCY_TARGET}: {len(unconfirmed)} of {len(rolled)} decision points "
            "did not change the answer when rolled out; re-ranked by counterfactual evidence"
            + (" (order changed)" if [d.token_index for d in decisions] != before else " (order unchanged)")
        )
    answer_conf = None
    if trace.answer and trace.answer.confidence is not None:
        answer_conf = trace.answer.confidence
        for d in rolled:
            answer_conf *= 1.0 - risk(d)
        if heads is not None and heads.trained:
            answer_conf = heads.meta(meta_features(trace, decisions, consistency, answer_conf))
    timings["analysis_s"] = time.time() - t0
    return Analysis(
        heads=heads.describe() if heads is not None else "analytic (built in)",
        tracked_layers=list(tr.layers),
        tracker="native" if tr.native else "python",
        proxy=PROXY,
        threshold=cand_threshold,
        max_decisions=cfg.max_decisions,
        alternatives=cfg.alternatives,
        candidates=n_cands,
        decisions=decisions,
        consistency=consistency,
        refined=refined,
        notes=notes,
        answer_confidence=answer_conf,
        explanation=explain(trace, decisions, consistency, answer_conf, trained=heads is not None and heads.trained),
        timings=timings,
    )


__all__ = [
    "AnalysisConfig", "Observation", "analyze", "map_prompt", "token_features", "find_decisions", "rollout",
    "explain", "meta_features", "risk", "PROXY", "CONSISTENCY_TARGET",
]

"""Inverse reasoning: look back over a finished chain to find where it could have gone
another way, what the alternatives were, where they lead, and how confident to be.

Inputs: the trace (tokens with their top-5 alternatives and entropies, steps, answer)
and the attention rows the tracker recorded during generation. The stages, one module each:

1. `observe`: the prompt map, content mask and tracker rows of the chain, and from them
   the significance (paper eq. 7) of every earlier token for every step, normalized per step;
2. `decisions`: the proposal score of every generated token: significance x (1 - p(chosen))
   (analytic heads) or the trained heads' decision score;
3. `forks` (with `sampler`, `outcomes`): outcome distributions sampled from the model
   itself, coarse to fine on a token budget: from the prompt (self-consistency, the
   answer's confidence), after every step (the anchor steps: where the distribution
   moves), then at the proposed candidates of the anchor steps, for the chosen token and
   its alternatives (the fork score). The decision points are the measured candidates;
4. `explain`: the explanation, each sentence from a number in the trace.

With a sidecar whose meta-cognitive head training kept (`SageHeads.calibrated`), the
answer's confidence is that head's estimate of the chance the answer is right, read from
the distribution sampled from the prompt and the chain's own uncertainty
(`explain.answer_features`); `Analysis.calibration` keeps the samples' share beside it and
what the sidecar measured on held-out answers.

`AnalysisConfig(method="greedy")` is the earlier analysis (schema 2): the top-threshold
tokens, one greedy rollout per alternative (`rollout`), consistency and refinement. It
stays for the token-identity tests of KV branching and scripts/bench_ask.py.
"""

from __future__ import annotations

import time

import numpy as np

from sage.heads import SageHeads
from sage.inverse.config import CONSISTENCY_TARGET, PROXY, AnalysisConfig
from sage.inverse.decisions import dependencies_of, find_decisions, token_features
from sage.inverse.explain import answer_features, explain, explain_sampled, risk
from sage.inverse.forks import branch_of, forks_score, sampled_analysis
from sage.inverse.observe import Observation, map_prompt, step_of_tokens
from sage.inverse.rollout import rollout
from sage.trace import Analysis, Decision, Trace


def analyze(
    engine,
    trace: Trace,
    prompt_tokens: list[int],
    cfg: AnalysisConfig | None = None,
    stops: tuple[str, ...] = (),
    significance: np.ndarray | None = None,
    on_progress=None,
) -> Analysis:
    """Inverse analysis of a finished trace generated on `engine` with tracking on.

    significance: (n_steps, n_prompt + n_gen) normalized eq. 7 significance to use in
    place of the proxy from the tracker rows (exact eq. 7 with `sage ask --exact`).
    on_progress(samples_done, tokens_spent, budget) while the outcome distributions are sampled."""
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
    if cfg.method != "greedy":
        return _sampled(engine, trace, prompt_tokens, cfg, stops, obs, sig, heads, t0, on_progress)
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
        # (the meta-cognitive head reads sampled answers: this method has none to give it)
    timings["analysis_s"] = time.time() - t0
    return Analysis(
        **_settings(heads, tr, cfg, cand_threshold),
        candidates=n_cands,
        decisions=decisions,
        consistency=consistency,
        refined=refined,
        notes=notes,
        answer_confidence=answer_conf,
        explanation=explain(trace, decisions, consistency, answer_conf, trained=heads is not None and heads.trained),
        timings=timings,
    )


def _settings(heads, tr, cfg, cand_threshold) -> dict:
    """The Analysis fields both methods fill alike: what ran, with which settings."""
    return dict(heads=heads.describe() if heads is not None else "analytic (built in)", tracked_layers=list(tr.layers),
                tracker="native" if tr.native else "python", proxy=PROXY, threshold=cand_threshold,
                max_decisions=cfg.max_decisions, alternatives=cfg.alternatives)


def _sampled(engine, trace, prompt_tokens, cfg, stops, obs, sig, heads, t0, on_progress) -> Analysis:
    """The sampled analysis (module docstring, stage 3)."""
    tr = engine.tracker
    n_prompt, n_gen = obs.n_prompt, len(trace.tokens)
    trained = heads is not None and heads.trained
    gen_sig = sig[:, n_prompt : n_prompt + n_gen]
    best = gen_sig.max(axis=0) if len(trace.steps) else np.zeros(n_gen)
    if trained:
        proposal = np.asarray(heads.inverse(token_features(obs, sig)), dtype=np.float64)
        cand_threshold = heads.threshold if cfg.score_threshold is None else cfg.score_threshold
    else:
        proposal = best * (1.0 - np.array([t.prob for t in trace.tokens]))
        cand_threshold = cfg.threshold
    timings = {"significance_s": time.time() - t0}
    # sampling needs sequences beside the chain's (an engine opened with n_seq_max=1 has none)
    budget = cfg.budget_tokens() if engine.n_seq_max > 1 else 0
    notes: list[str] = []
    if trace.answer is not None and trace.answer.expected == "open":
        # no short answer (a number, an option) to count across samples: nothing to sample
        budget = 0
        notes.append("an open question: no short answer (a number or an option letter) to compare across "
                     "samples, so no outcome distributions were sampled")
    outcomes, measured, forks = None, {}, {}
    if budget > 0 and trace.steps:
        progress = (lambda n, spent: on_progress(n, spent, budget)) if on_progress else None
        outcomes, measured, st = sampled_analysis(engine, trace, prompt_tokens, cfg, proposal, stops, progress,
                                                  threshold=cand_threshold)
        timings.update(st)
        forks = forks_score(measured)
        decisions, n_cands = _measured_decisions(trace, obs, cfg, gen_sig, best, proposal, measured, forks)
    else:
        # nothing sampled: the proposals, unmeasured
        decisions, n_cands = find_decisions(trace, sig, n_prompt, cfg, proposal if trained else None,
                                            cand_threshold, trained=trained)
        for d in decisions:
            d.dependencies = dependencies_of(d.token_index, obs)
    answer_conf, calibration = None, None
    value = trace.answer.value if trace.answer else None
    if outcomes is not None and outcomes.start is not None and value is not None:
        answer_conf = outcomes.start.share_of(value)
        x = answer_features(trace, outcomes.start)
        if heads is not None and heads.calibrated and x is not None:
            calibration = {"share": answer_conf, **heads.calibration()}
            answer_conf = heads.meta(x)
    timings["analysis_s"] = time.time() - t0
    return Analysis(
        **_settings(heads, tr, cfg, cand_threshold),
        candidates=outcomes.proposed if outcomes is not None else n_cands,
        decisions=decisions,
        consistency=None,
        refined=False,
        notes=notes,
        answer_confidence=answer_conf,
        explanation=explain_sampled(trace, decisions, outcomes, cfg.fork_threshold, trained,
                                    (answer_conf, calibration) if calibration is not None else None),
        timings=timings,
        outcomes=outcomes,
        calibration=calibration,
    )


def _measured_decisions(trace, obs, cfg, gen_sig, best, proposal, measured, forks):
    owner = step_of_tokens(trace)
    value = trace.answer.value if trace.answer else None
    decisions = []
    for k, (co, alts) in measured.items():
        tok = trace.tokens[k]
        f, fp = forks.get(k, (None, None))
        decisions.append(Decision(
            rank=0, token_index=k, position=obs.n_prompt + k, step=int(owner[k]), text=tok.text, prob=tok.prob,
            entropy=tok.entropy, significance=float(best[k]), score=float(proposal[k]),
            dependents=[int(i) for i in np.flatnonzero(gen_sig[:, k] >= cfg.threshold)], merged=0,
            alternatives=[a for a in tok.top if a.id != tok.id][:5],
            branches=[branch_of(a, o, value) for a, o in alts],
            dependencies=dependencies_of(k, obs), confirmed=f is not None and f >= cfg.fork_threshold and fp < cfg.alpha,
            outcome=co, fork=f, fork_p=fp,
        ))
    decisions.sort(key=lambda d: (-(d.fork or 0.0), d.token_index))
    # at most max_decisions forks; the cleared candidates stay listed
    forks = [d for d in decisions if d.confirmed][: cfg.max_decisions]
    decisions = forks + [d for d in decisions if not d.confirmed]
    for i, d in enumerate(decisions):
        d.rank = i + 1
    return decisions, len(measured)


__all__ = [
    "AnalysisConfig", "Observation", "analyze", "map_prompt", "token_features", "find_decisions", "rollout",
    "explain", "answer_features", "risk", "PROXY", "CONSISTENCY_TARGET",
]

"""Stage 3 of the inverse analysis: where the answer hinges, from outcome distributions
sampled from the model itself, coarse to fine, on a token budget.

- Coarse: the outcome distribution from the prompt alone (self-consistency: the share of
  the chain's answer is the answer's confidence, its majority the vote) and after every
  step of the chain: the Forking-Paths curve. The steps after which the distribution moved
  most (total variation from the one before) are the anchor steps.
- Fine: inside the anchor steps, candidate tokens proposed by the SAGE heads (or the
  analytic eq. 7 ranking) and by the entropy get outcome distributions for the chosen
  token and its strongest alternatives; their fork score (`outcomes.fork_score`) says
  whether the answer hinges there. The heads only propose: a decision point is a
  candidate whose fork was measured.
"""

from __future__ import annotations

import time

import numpy as np

from sage.inverse.config import AnalysisConfig, is_choice
from sage.inverse.outcomes import STOP_RULE, fork_score, tv, tv_pvalue
from sage.inverse.sampler import BranchSampler
from sage.trace import Branch, Outcome, Outcomes, Trace


def spread_order(n: int) -> list[int]:
    """0..n-1 so that any prefix of the order covers the range evenly (bisection order):
    when the budget runs out, the curve is coarser, not cut off."""
    out, seen = [], set()
    level = [(0, n - 1)]
    while level:
        nxt = []
        for lo, hi in level:
            if lo > hi:
                continue
            mid = (lo + hi + 1) // 2 if lo == 0 and hi == n - 1 else (lo + hi) // 2
            if mid not in seen:
                seen.add(mid)
                out.append(mid)
            nxt += [(lo, mid - 1), (mid + 1, hi)]
        level = nxt
    return out


def _known(o: Outcome | None) -> Outcome | None:
    return o if o is not None and o.n > 0 else None


class Coarse:
    """The start distribution and one after each step; `sample(budget)` can be called
    again to spend more on the same distributions (rounds continue where they stopped)."""

    def __init__(self, sampler: BranchSampler, trace: Trace, cfg: AnalysisConfig) -> None:
        self.sampler, self.cfg = sampler, cfg
        self.start = sampler.request(0, None, cfg.samples)
        self.start.first_round = cfg.start_samples  # the answer's confidence rests on it: more at once
        boundaries = [s.token_end for s in trace.steps]
        self.order = spread_order(len(boundaries))
        self.reqs = {i: sampler.request(boundaries[i], None, cfg.samples) for i in self.order}

    def sample(self, budget: int, on_progress=None) -> None:
        end = self.sampler.spent + budget
        if self.start.started == 0:
            # the answer's confidence rests on the start: its first round before anything else
            k_max, self.start.k_max = self.start.k_max, min(self.start.k_max, self.cfg.start_samples)
            self.sampler.budget = end
            self.sampler.run([self.start], on_progress)
            self.start.k_max = k_max
            if self.start.stop in ("budget", "max") and self.start.started < k_max:
                self.start.stop, self.start.committed = None, False
            budget = max(0, end - self.sampler.spent)
        reqs = [self.start] + [self.reqs[i] for i in self.order]
        for r in reqs[1:] if self.start.stop is None else reqs:
            if r.stop == "budget":  # continue its rounds
                r.stop, r.committed = None, False
        self.sampler.budget = self.sampler.spent + budget
        self.sampler.run(reqs, on_progress)

    def result(self):
        cfg = self.cfg
        start_o = _known(self.start.outcome())
        steps = [_known(self.reqs[i].outcome()) for i in range(len(self.reqs))]
        movement: list[float | None] = []
        movement_p: list[float | None] = []
        prev = start_o
        for o in steps:
            both = o is not None and prev is not None
            movement.append(tv(o, prev) if both else None)
            movement_p.append(tv_pvalue(o, prev) if both else None)
            if o is not None:
                prev = o
        ranked = sorted((m, i) for i, m in enumerate(movement)
                        if m is not None and m >= cfg.anchor_min and movement_p[i] < cfg.alpha)
        anchors = sorted(i for _, i in ranked[::-1][: cfg.anchors])
        return start_o, steps, movement, movement_p, anchors

    def unfinished(self) -> bool:
        return any(r.stop == "budget" for r in [self.start, *self.reqs.values()])


def anchor_span(steps: list[Outcome | None], i: int) -> range:
    """The steps an anchor stands for: those after the last sampled boundary before step i,
    up to i (the distribution moved somewhere in them)."""
    j = i - 1
    while j >= 0 and steps[j] is None:
        j -= 1
    return range(j + 1, i + 1)


def candidates_in(trace: Trace, span: range, proposal: np.ndarray, cfg: AnalysisConfig,
                  threshold: float = 0.0) -> list[int]:
    """The tokens of an anchor's steps worth measuring: the heads' best `per_anchor`
    choices at or above the threshold, and the most uncertain choice (highest entropy)
    if it is not among them."""
    ks = [k for i in span for k in range(trace.steps[i].token_start, trace.steps[i].token_end)
          if is_choice(trace.tokens[k], cfg.min_alt_prob)]
    if not ks:
        return []
    by_score = sorted((k for k in ks if proposal[k] >= threshold), key=lambda k: (-proposal[k], k))[: cfg.per_anchor]
    top_entropy = max(ks, key=lambda k: (trace.tokens[k].entropy, -k))
    if top_entropy not in by_score:
        by_score.append(top_entropy)
    return sorted(by_score)


def distinct_alternatives(tok, min_prob: float = 0.0) -> list:
    """The token's alternatives, most probable first, that a reader can tell apart: one
    whose text is the chosen token's or an earlier alternative's but for spaces (' /'
    beside '/') reads as the same word, so it is left out rather than sampled as a second
    alternative."""
    seen = {tok.text.strip()}
    out = []
    for a in tok.top:
        key = a.text.strip()
        if a.id == tok.id or a.prob < min_prob or key in seen:
            continue
        seen.add(key)
        out.append(a)
    return out


def fine(sampler: BranchSampler, trace: Trace, cfg: AnalysisConfig, spans: list[range], proposal: np.ndarray,
         on_progress=None, threshold: float = 0.0) -> tuple[dict[int, tuple[Outcome, list[tuple]]], int]:
    """Outcome distributions of the candidates of the anchor steps: for each candidate
    token k, (the chosen token's outcome, [(alternative, its outcome)]). Also returns how
    many candidates were proposed."""
    plan = []
    seen = set()
    for span in spans:
        for k in candidates_in(trace, span, proposal, cfg, threshold):
            if k in seen:
                continue
            seen.add(k)
            tok = trace.tokens[k]
            alts = distinct_alternatives(tok, cfg.min_alt_prob)[: cfg.alternatives]
            chosen = sampler.request(k, tok.id, cfg.samples)
            plan.append((k, chosen, [(a, sampler.request(k, a.id, cfg.samples)) for a in alts]))
    # the most promising first: a budget cut leaves the heads' best candidates measured
    plan.sort(key=lambda x: -proposal[x[0]])
    sampler.run([r for _, c, alts in plan for r in [c] + [ra for _, ra in alts]], on_progress)
    out = {}
    for k, c, alts in plan:
        co = _known(c.outcome())
        ao = [(a, _known(r.outcome())) for a, r in alts]
        if co is not None and ao and all(o is not None for _, o in ao):
            out[k] = (co, ao)
    return out, len(plan)


def branch_of(alt, o: Outcome, chain_answer: str | None) -> Branch:
    """An alternative with its outcome distribution (text: its first sample's)."""
    return Branch(
        token_id=alt.id, token_text=alt.text, prob=alt.prob, text=o.example, token_ids=[alt.id],
        answer=o.leader, changed=o.leader != chain_answer, n_tokens=round(o.tokens / max(o.n, 1)),
        finish_reason="stop", mean_logprob=0.0, outcome=o,
    )


def sampled_analysis(engine, trace: Trace, prompt_tokens: list[int], cfg: AnalysisConfig, proposal: np.ndarray,
                     stops: tuple[str, ...] = (), on_progress=None, threshold: float = 0.0):
    """Run coarse and fine on `engine` (sequence 0 still holds the chain). Returns
    (Outcomes, {token k: (chosen outcome, [(alternative, outcome)])}, timings)."""
    budget = cfg.budget_tokens()
    sampler = BranchSampler(engine, trace, prompt_tokens, cfg.sampling, stops, parallel=cfg.parallel,
                            round_size=cfg.round_size, budget=budget)
    t0 = time.time()
    co = Coarse(sampler, trace, cfg)
    co.sample(int(budget * cfg.coarse_share), on_progress)
    start, steps, movement, movement_p, anchors = co.result()
    if not anchors and co.unfinished() and budget > sampler.spent:
        # nothing to refine yet: the rest of the budget sharpens the curve instead
        co.sample(budget - sampler.spent, on_progress)
        start, steps, movement, movement_p, anchors = co.result()
    t1 = time.time()
    sampler.budget = budget
    spans = [anchor_span(steps, i) for i in anchors]
    measured, proposed = fine(sampler, trace, cfg, spans, proposal, on_progress, threshold) if anchors else ({}, 0)
    t2 = time.time()
    outcomes = Outcomes(
        sampling=cfg.sampling.as_dict(), rule=STOP_RULE, budget=budget, spent=sampler.spent, start=start,
        steps=steps, movement=movement, movement_p=movement_p, anchors=anchors, proposed=proposed, measured=len(measured),
        vote=vote_of(start), parallel=sampler.parallel,
    )
    dt = sampler.decode_s
    timings = {
        "coarse_s": t1 - t0, "fine_s": t2 - t1, "sample_tokens": float(sampler.spent),
        "sample_tokens_per_s": sampler.spent / (t2 - t0) if t2 > t0 else 0.0,
        "decode_s": dt, "decodes": float(sampler.decodes),
    }
    return outcomes, measured, timings


def vote_of(o: Outcome | None) -> str | None:
    """The most frequent answer, if one is: reached by more than one sample and by more
    samples than any other answer (None: a tie, all different, or no answer leads)."""
    if o is None or not o.answers or o.leader is None:
        return None
    top = o.answers[0].n
    if top < 2 or (len(o.answers) > 1 and o.answers[1].n == top):
        return None
    return o.answers[0].value


def forks_score(measured) -> dict[int, tuple[float, float]]:
    """{token k: (fork score, permutation p-value of the chosen token's samples against
    the alternatives' pooled)}."""
    out = {}
    for k, (co, ao) in measured.items():
        f = fork_score(co, [(a.prob, o) for a, o in ao])
        if f is not None:
            out[k] = (f, tv_pvalue(co, [o for _, o in ao]))
    return out

"""Stage 4 of the inverse analysis: confidence, the meta-cognitive head's features, and
the explanation, each sentence from a measured number in the trace."""

from __future__ import annotations

import numpy as np

from sage.heads import META_FEATURES, logit
from sage.trace import Decision, Explanation, Trace


def meta_features(trace: Trace, decisions: list[Decision], consistency: float | None, conf: float) -> np.ndarray:
    """Answer features of the meta-cognitive head, in the order of META_FEATURES."""
    x = np.zeros(len(META_FEATURES), np.float32)
    x[0] = logit(conf)
    x[1] = 1.0 - float(np.prod([1.0 - risk(d) for d in decisions])) if decisions else 0.0
    x[2] = consistency if consistency is not None else 0.0
    x[3] = float(np.mean([t.entropy for t in trace.tokens])) if trace.tokens else 0.0
    x[4] = len(decisions)
    x[5] = 1.0 if trace.answer and trace.answer.value is not None else 0.0
    return x


def risk(d: Decision) -> float:
    """Share of the explored probability mass at d that leads to another answer."""
    if not d.branches:
        return 0.0
    explored = d.prob + sum(b.prob for b in d.branches)
    return sum(b.prob for b in d.branches if b.changed) / explored if explored > 0 else 0.0


def _q(text: str) -> str:
    return repr(text.strip() or text)


def explain(trace: Trace, decisions: list[Decision], consistency: float | None, conf: float | None,
            trained: bool = False) -> Explanation:
    """The four parts of the paper's explanation, each sentence from a measured fact.
    trained: the decisions were scored by trained SAGE heads (d.score is their decision
    score: from a class-balanced fit, it ranks tokens; it is not a calibrated probability)."""
    just, alts, confs, deps = [], [], [], []
    for d in decisions:
        dep = ", ".join(str(i + 1) for i in d.dependents)
        sig = (f"normalized significance {d.significance:.2f} for step(s) {dep}" if dep
               else f"normalized significance {d.significance:.2f} (its largest for any later step)")
        head = f"; the trained heads give it a decision score of {d.score:.2f}" if trained else ""
        just.append(
            f"Decision {d.rank} (step {d.step + 1}): the model wrote {_q(d.text)} with p={d.prob:.2f}; {sig}{head}."
        )
        for b in d.branches:
            where = (
                f"a different answer ({b.answer if b.answer is not None else 'none found'})"
                if b.changed
                else f"the same answer ({b.answer})"
            )
            alts.append(
                f"At decision {d.rank}, {_q(b.token_text)} (p={b.prob:.2f}) instead of {_q(d.text)} leads to {where} "
                f"after {b.n_tokens} tokens."
            )
        rest = [a for a in d.alternatives if a.id not in {b.token_id for b in d.branches}]
        if rest:
            alts.append(
                f"At decision {d.rank}, not rolled out: "
                + ", ".join(f"{_q(a.text)} (p={a.prob:.2f})" for a in rest)
                + "."
            )
        if d.dependencies:
            top = ", ".join(f"{_q(x.text)} ({x.source}, {x.weight:.2f})" for x in d.dependencies[:3])
            deps.append(f"Decision {d.rank} drew most on {top}.")
    if trace.answer and trace.answer.value is not None:
        base = trace.answer.confidence
        confs.append(f"The answer {trace.answer.value} was written with token probability {base:.2f}.")
    else:
        confs.append("No final answer was found in the output.")
    rolled = [d for d in decisions if d.branches]
    if rolled:
        changed = sum(1 for d in rolled for b in d.branches if b.changed)
        total = sum(len(d.branches) for d in rolled)
        confs.append(f"{changed} of {total} rolled-out alternatives reach a different answer.")
    if conf is not None:
        confs.append(f"Answer confidence after the counterfactual check: {conf:.2f}.")
    if consistency is not None:
        confs.append(f"Consistency of the analysis with the rollouts: {consistency:.2f}.")
    if not decisions:
        just.append("No token reached the significance threshold with a plausible alternative: no decision points.")
    return Explanation(justification=just, alternatives=alts, confidence=confs, dependencies=deps)


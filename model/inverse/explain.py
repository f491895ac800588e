"""Stage 4 of the inverse analysis: confidence, the meta-cognitive head's features, and
the explanation, each sentence from a measured number in the trace."""

from __future__ import annotations

import numpy as np

from sage.heads import META_FEATURES, logit
from sage.trace import Decision, Explanation, Outcome, Trace


def answer_features(trace: Trace, start: Outcome | None) -> np.ndarray | None:
    """Answer features of the meta-cognitive head, in the order of META_FEATURES: the
    answers sampled from the problem alone (`start`) against the chain's answer, and the
    chain's own uncertainty. None without an answer or without samples."""
    a = trace.answer
    if a is None or a.value is None or start is None or start.n == 0:
        return None
    x = np.zeros(len(META_FEATURES), np.float32)
    col = META_FEATURES.index
    n, k = start.n, start.count(a.value)
    x[col("logit_share")] = logit((k + 0.5) / (n + 1.0))
    x[col("leader_agrees")] = float(start.leader == a.value)
    x[col("none_share")] = start.none / n
    x[col("distinct")] = (len(start.answers) + (1 if start.none else 0)) / n
    x[col("log_samples")] = float(np.log(n))
    x[col("logit_token_prob")] = logit(a.confidence) if a.confidence is not None else 0.0
    x[col("mean_entropy")] = float(np.mean([t.entropy for t in trace.tokens])) if trace.tokens else 0.0
    x[col("cut")] = float(trace.finish_reason == "length")
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
                else f"the same answer ({b.answer if b.answer is not None else 'none found'})"
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



def dist_words(o) -> str:
    """An outcome distribution in words: "18 in 6, 20 in 1, no answer in 1 of 8 samples"."""
    if o is None or not o.n:
        return "no samples"
    parts = [f"{a.value} in {a.n}" for a in o.answers[:4]]
    rest = sum(a.n for a in o.answers[4:])
    if rest:
        parts.append(f"other answers in {rest}")
    if o.none:
        parts.append(f"no answer in {o.none}")
    return ", ".join(parts) + f" of {o.n} sample{'s' if o.n != 1 else ''}"


def explain_sampled(trace: Trace, decisions: list[Decision], outcomes, fork_threshold: float,
                    trained: bool = False, calibrated: tuple[float, dict] | None = None) -> Explanation:
    """The explanation of the sampled analysis: every sentence names the distribution
    (answers and sample counts) it rests on. calibrated: (the meta-cognitive head's
    P(right), the sidecar's held-out calibration) where the trained heads gave one."""
    just, alts, confs, deps = [], [], [], []
    value = trace.answer.value if trace.answer else None
    open_question = trace.answer is not None and trace.answer.expected == "open"
    if outcomes is None:
        for d in decisions:
            head = (f"the trained heads give it a decision score of {d.score:.2f}" if trained
                    else f"normalized significance {d.significance:.2f}")
            just.append(f"Proposed {d.rank} (step {d.step + 1}): the model wrote {_q(d.text)} with p={d.prob:.2f}; "
                        f"{head}.")
        if open_question:
            just.append("The question asks for an explanation, not a number or an option letter: there is no "
                        "short answer to compare across samples, so none were sampled. These are the heads' "
                        "proposals, not measured forks.")
        else:
            just.append("No outcome distributions were sampled (budget 0): these are the heads' proposals, "
                        "not measured forks.")
    else:
        if outcomes.anchors:
            for i in outcomes.anchors:
                before = next((outcomes.steps[j] for j in range(i - 1, -1, -1) if outcomes.steps[j] is not None),
                              outcomes.start)
                m = outcomes.movement[i]
                just.append(
                    f"The answer distribution moved most over step {i + 1} (total variation {m:.2f}): "
                    f"before it {dist_words(before)}; after it {dist_words(outcomes.steps[i])}."
                )
        else:
            just.append("No step moved the answer distribution by more than the anchor threshold: "
                        "the reasoning has no step where the answer hinges.")
        forks = [d for d in decisions if d.confirmed]
        for d in forks:
            just.append(
                f"Decision {d.rank} (step {d.step + 1}): the model wrote {_q(d.text)} (p={d.prob:.2f}); "
                f"fork score {d.fork:.2f}: the alternatives lead elsewhere."
            )
        cleared = [d for d in decisions if not d.confirmed]
        if cleared:
            just.append(
                f"{len(cleared)} other candidate token{'s' if len(cleared) != 1 else ''} in the anchor steps "
                f"{'were' if len(cleared) != 1 else 'was'} measured and {'are' if len(cleared) != 1 else 'is'} "
                f"not a fork (fork score below {fork_threshold:.2f})."
            )
        for d in decisions:
            alts.append(f"At {_q(d.text)} (step {d.step + 1}), as written: {dist_words(d.outcome)}.")
            for b in d.branches:
                alts.append(f"With {_q(b.token_text)} (p={b.prob:.2f}) instead: {dist_words(b.outcome)}.")
        if outcomes.start is not None:
            s = outcomes.start
            if value is not None:
                k = s.count(value)
                from sage.inverse.outcomes import wilson

                lo, hi = wilson(k, s.n)
                confs.append(
                    f"From the problem alone, the model reached {value} in {k} of {s.n} samples "
                    f"({k / s.n:.0%}; 90 % interval {lo:.0%}–{hi:.0%})"
                    + ("." if calibrated else ": that share is the answer's confidence.")
                )
                if calibrated:
                    p, cal = calibrated
                    held = (f"; on {cal['answers']:.0f} held-out answers its estimates were off by "
                            f"{cal['ece']:.2f} on average (ECE)" if cal.get("ece") is not None and cal.get("answers")
                            else "")
                    reads = ("recalibrating that share (from how often answers with such shares were right "
                             "in its training)" if cal.get("share") == 1.0 else
                             "reading those samples" + (" and the chain's own uncertainty" if cal.get("chain") != 0
                                                        else ""))
                    confs.append(f"The trained meta-cognitive head, {reads}, puts the chance the answer is right "
                                 f"at {p:.0%}{held}: that is the answer's confidence.")
            confs.append(f"All answers from the problem alone: {dist_words(s)}.")
            if s.leader is not None and s.leader != value and s.answers[0].n > 1:
                confs.append(f"The most frequent answer of the samples is {s.leader} "
                             f"({s.answers[0].n} of {s.n}), not the chain's answer.")
        confs.append(f"{outcomes.spent} of {outcomes.budget} budgeted tokens were sampled.")
    if trace.answer and trace.answer.value is not None and trace.answer.confidence is not None:
        confs.append(f"The answer {trace.answer.value} was written with token probability {trace.answer.confidence:.2f}.")
    elif open_question:
        confs.append("The answer is an explanation in words: sage shows where the model was unsure of its words "
                     "but does not judge whether the explanation is right.")
    elif not (trace.answer and trace.answer.value is not None):
        confs.append("No final answer was found in the output"
                     + (" (the chain was cut off before it stated one)." if trace.finish_reason != "stop" else "."))
    for d in decisions:
        if d.dependencies and (d.confirmed or outcomes is None):
            top = ", ".join(f"{_q(x.text)} ({x.source}, {x.weight:.2f})" for x in d.dependencies[:3])
            deps.append(f"Decision {d.rank} drew most on {top}.")
    return Explanation(justification=just, alternatives=alts, confidence=confs, dependencies=deps)

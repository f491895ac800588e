"""Outcome distributions: the arithmetic of the sampled analysis (no model here).

A branch's outcome distribution is the distribution of final answers (normalized values,
plus "no answer") over continuations sampled from the model after the branch's prefix.
This module counts them, puts a 90 % Wilson interval on a share, states the sequential
stopping rule, and measures how far two distributions are apart (total variation) and how
much a token is a fork (the probability-weighted distance of its alternatives' outcomes
from the chosen token's; formula in DESIGN.md and `fork_score`).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

from sage.trace import AnswerCount, Outcome

Z90 = 1.6449  # two-sided 90 %
STOP_RULE = (
    "sampled in rounds; a distribution stops once the 90 % Wilson lower bound of its leading "
    "answer's share exceeds 1/2 (the majority answer is settled), or at the most samples, or "
    "when the token budget is spent"
)


def wilson(k: int, n: int, z: float = Z90) -> tuple[float, float]:
    """Wilson score interval of a share k/n (0..1 for n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    d = 1.0 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def settled(values: list[str | None]) -> bool:
    """The stopping rule: the leading outcome (an answer, or "no answer") is the majority
    with 90 % confidence (Wilson lower bound > 1/2). 4 of 4 and 7 of 8 settle; 5 of 6 not."""
    if not values:
        return False
    k = Counter(values).most_common(1)[0][1]
    return wilson(k, len(values))[0] > 0.5


def make_outcome(prefix: int, forced: int | None, values: list[str | None], tokens: int, stop: str,
                 example: str) -> Outcome:
    """An Outcome from the samples' answers (None: no answer), in sampling order."""
    counts = Counter(v for v in values if v is not None)
    answers = [AnswerCount(v, n) for v, n in sorted(counts.items(), key=lambda x: (-x[1], x[0]))]
    none = sum(v is None for v in values)
    n = len(values)
    leader, k = (answers[0].value, answers[0].n) if answers else (None, 0)
    if none > k:  # "no answer" leads
        leader, k = None, none
    lo, hi = wilson(k, n)
    return Outcome(prefix=prefix, forced=forced, answers=answers, none=none, n=n, tokens=tokens, stop=stop,
                   leader=leader, share=k / n if n else 0.0, interval=[lo, hi], example=example)


def _dist(o: Outcome) -> dict[str | None, float]:
    if not o.n:
        return {}
    d: dict[str | None, float] = {a.value: a.n / o.n for a in o.answers}
    if o.none:
        d[None] = o.none / o.n
    return d


def tv(a: Outcome, b: Outcome) -> float:
    """Total-variation distance of two outcome distributions ("no answer" is an outcome):
    half the summed absolute difference of the shares, in [0, 1]. Summed with math.fsum
    (correctly rounded): the answers form a set, whose order changes with the process's hash
    seed, and a plain sum would give labels that differ in the last bit between workers."""
    da, db = _dist(a), _dist(b)
    return 0.5 * math.fsum(abs(da.get(v, 0.0) - db.get(v, 0.0)) for v in set(da) | set(db))


def fork_score(chosen: Outcome, alternatives: list[tuple[float, Outcome]]) -> float | None:
    """How much the answer hinges on this token:

        fork = sum_a p_a * TV(D_a, D_chosen) / sum_a p_a

    over the sampled alternatives a (p_a: the model's probability of a at this position,
    D: outcome distributions). 0: every alternative leads where the chosen token does;
    1: every alternative leads elsewhere. None without sampled alternatives."""
    alts = [(p, o) for p, o in alternatives if o.n > 0]
    mass = sum(p for p, _ in alts)
    if not alts or mass <= 0 or chosen.n == 0:
        return None
    return math.fsum(p * tv(o, chosen) for p, o in alts) / mass


_CUE_DONE = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=|would be|will be)?\s*[:=]?\s*"
    r"(?:\$?\s?-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|\(?[A-E]\)?)(?=\s|[^\d.,/A-Za-z]|\.(?!\d))",
    re.I,
)


def answer_stated(text: str) -> bool:
    """Whether a continuation has stated its final answer ("The answer is 18." with what
    ends it): a sample stops there, as the chain would have, to save tokens."""
    return _CUE_DONE.search(text) is not None


def _labels(o: Outcome) -> list:
    out: list = []
    for a in o.answers:
        out += [a.value] * a.n
    return out + [None] * o.none


def tv_pvalue(a: Outcome, b: Outcome | list[Outcome], n_perm: int = 400) -> float:
    """How often a distance at least as large as TV(a, b) comes from chance alone: a
    permutation test that pools the samples of a and b (b: one outcome, or several pooled)
    and splits them at random into groups of the same sizes, n_perm times (fixed seed).
    Small samples of a spread-out distribution are far apart by chance; this says so."""
    bs = b if isinstance(b, list) else [b]
    la = _labels(a)
    lb = [x for o in bs for x in _labels(o)]
    if not la or not lb:
        return 1.0
    keys = {v: i for i, v in enumerate(dict.fromkeys(la + lb))}
    pool = np.array([keys[v] for v in la + lb])
    na, m = len(la), len(keys)

    def dist(xa, xb):
        ca = np.bincount(xa, minlength=m) / len(xa)
        cb = np.bincount(xb, minlength=m) / len(xb)
        return 0.5 * np.abs(ca - cb).sum()

    obs = dist(pool[:na], pool[na:])
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(n_perm):
        perm = rng.permutation(pool)
        if dist(perm[:na], perm[na:]) >= obs - 1e-12:
            hits += 1
    return (hits + 1) / (n_perm + 1)

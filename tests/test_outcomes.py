"""The arithmetic of outcome distributions (no model): intervals, the stopping rule,
distances, the fork score, the permutation test, the sampler's token draw."""

import numpy as np
import pytest

from sage.inverse.forks import spread_order, vote_of
from sage.inverse.outcomes import answer_stated, fork_score, make_outcome, settled, tv, tv_pvalue, wilson
from sage.inverse.sampler import SamplingSettings, sample_token


def out(*values, prefix=0):
    return make_outcome(prefix, None, list(values), tokens=10 * len(values), stop="max", example="")


def test_wilson_interval():
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(4, 4)
    assert 0.59 < lo < 0.61 and hi == 1.0
    for k, n in ((1, 4), (5, 6), (7, 8), (30, 100)):
        lo, hi = wilson(k, n)
        assert lo < k / n < hi
    # more samples, narrower
    assert np.diff(wilson(8, 16)) < np.diff(wilson(4, 8))


def test_stopping_rule():
    assert settled(["18"] * 4)
    assert settled(["18"] * 7 + ["20"])
    assert not settled(["18"] * 5 + ["20"])
    assert not settled(["18", "18", "18", "20"])
    assert not settled([])
    assert settled([None] * 4)  # "no answer" can be the settled outcome too


def test_outcome_counts_and_leader():
    o = out("18", "20", "18", None)
    assert (o.n, o.none, o.leader, o.share) == (4, 1, "18", 0.5)
    assert [(a.value, a.n) for a in o.answers] == [("18", 2), ("20", 1)]
    assert o.count("18") == 2 and o.count(None) == 1 and o.share_of("7") == 0.0
    assert o.interval[0] < 0.5 < o.interval[1]
    assert out(None, None, "3").leader is None  # no answer leads


def test_total_variation():
    assert tv(out("1", "2"), out("2", "1")) == 0.0
    assert tv(out("1", "1"), out("2", "2")) == 1.0
    assert tv(out("1", None), out("1", "1")) == 0.5  # "no answer" is an outcome
    assert tv(out("1", "1", "2", "2"), out("1", "1", "1", "2")) == pytest.approx(0.25)


def test_fork_score_weights_alternatives_by_probability():
    chosen = out("18", "18", "18", "18")
    same, other = out("18", "18"), out("20", "20")
    assert fork_score(chosen, [(0.3, same), (0.1, same)]) == 0.0
    assert fork_score(chosen, [(0.3, other)]) == 1.0
    # a likely alternative that agrees outweighs an unlikely one that does not
    assert fork_score(chosen, [(0.3, same), (0.1, other)]) == pytest.approx(0.25)
    assert fork_score(chosen, []) is None


def test_permutation_test_knows_small_samples():
    # four different answers on both sides: as far apart as can be, and nothing to it
    assert tv(out("1", "2", "3", "4"), out("5", "6", "7", "8")) == 1.0
    assert tv_pvalue(out("1", "2", "3", "4"), out("5", "6", "7", "8")) > 0.5
    # eight against eight, all different: not chance
    assert tv_pvalue(out(*["18"] * 8), out(*["20"] * 8)) < 0.01
    # the same distribution: chance
    assert tv_pvalue(out("1", "1", "2", "2"), out("2", "1", "2", "1")) > 0.5
    # pooled alternatives
    assert tv_pvalue(out(*["18"] * 6), [out(*["20"] * 3), out(*["21"] * 3)]) < 0.05


def test_answer_stated():
    assert answer_stated("So 4 * 6 = 24. The answer is 24.")
    assert answer_stated("The answer is $1,200 dollars")
    assert answer_stated("Final answer: B)")
    assert not answer_stated("The answer is 24")  # the number may go on
    assert not answer_stated("The answer is 18.5")  # still going
    assert not answer_stated("First, 24 / 4 = 6 boxes.")


def test_sample_token():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, np.log(3.0), -50.0, -50.0], np.float32)
    assert sample_token(logits, SamplingSettings(temperature=0.0), rng) == 1
    assert sample_token(logits, SamplingSettings(temperature=1.0, top_k=1), rng) == 1
    assert sample_token(logits, SamplingSettings(temperature=1.0, top_p=0.5), rng) == 1
    draws = [sample_token(logits, SamplingSettings(temperature=1.0), rng) for _ in range(4000)]
    assert abs(np.mean(np.array(draws) == 1) - 0.75) < 0.03
    # temperature 0.5 sharpens p(1) to 9/10
    draws = [sample_token(logits, SamplingSettings(temperature=0.5), rng) for _ in range(4000)]
    assert abs(np.mean(np.array(draws) == 1) - 0.9) < 0.02
    # top_k=2 over a long vocabulary: only the two best ever
    big = np.full(1000, -5.0, np.float32)
    big[[7, 9]] = 1.0
    assert set(sample_token(big, SamplingSettings(1.0, top_k=2), rng) for _ in range(200)) == {7, 9}
    assert set(sample_token(big, SamplingSettings(1.0, top_p=0.3), rng) for _ in range(200)) <= {7, 9}


def test_spread_order_and_vote():
    for n in (0, 1, 2, 5, 9, 16):
        o = spread_order(n)
        assert sorted(o) == list(range(n))
    o = spread_order(9)
    assert o[0] == 4 and max(o[:3]) - min(o[:3]) >= 4  # the first few span the chain
    assert vote_of(out("18", "20", "18")) == "18"
    assert vote_of(out("1", "2", "3")) is None  # all different: no vote
    assert vote_of(out("1", "1", "2", "2")) is None  # a tie

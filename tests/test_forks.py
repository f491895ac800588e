"""Sampled outcome distributions on the real SmolLM2: the branch sampler (many sequences
in one decode, sharing the chain's KV cells), the coarse-to-fine analysis, the budget,
the trace, the views."""

import json

import numpy as np
import pytest

from sage.engine import Engine
from sage.inverse import AnalysisConfig
from sage.inverse.sampler import BranchSampler, SamplingSettings, sample_token
from sage.reason import ReasonRun, reason
from sage.trace import load_trace, save_trace

PROBLEM = "Tom has 3 boxes with 12 eggs in each box. He uses 7 eggs. How many eggs are left?"
SAMPLING = SamplingSettings(temperature=0.7, top_p=0.95, seed=3)


def cfg(budget, **kw):
    return AnalysisConfig(budget=budget, sampling=SAMPLING, parallel=8, **kw)


@pytest.fixture(scope="module")
def tracked(smollm2_path):
    eng = Engine(smollm2_path, n_ctx=4096, track=True, n_seq_max=9)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def sampled(tracked):
    return reason(tracked, PROBLEM, max_tokens=100, analysis=cfg(1500))


def test_outcomes_in_the_trace(sampled):
    a = sampled.analysis
    oc = a.outcomes
    assert oc is not None and 0 < oc.spent <= oc.budget == 1500
    assert oc.start is not None and oc.start.n >= 1
    assert len(oc.steps) == len(sampled.steps) == len(oc.movement) == len(oc.movement_p)
    for o in [oc.start, *[s for s in oc.steps if s is not None]]:
        assert o.n == sum(x.n for x in o.answers) + o.none
        assert o.stop in ("settled", "max", "budget") and o.interval[0] <= o.share <= o.interval[1]
        assert o.n <= 16
    if sampled.answer.value is not None:
        assert a.answer_confidence == pytest.approx(oc.start.share_of(sampled.answer.value))
    for d in a.decisions:  # decision points are measured candidates
        assert d.outcome is not None and d.fork is not None and all(b.outcome is not None for b in d.branches)
        assert d.confirmed == (d.fork >= 0.3 and d.fork_p < 0.1)
        assert 0 <= d.step < len(sampled.steps)
    assert any("samples" in line for line in a.explanation.confidence)


def test_same_seed_same_outcomes(tracked, sampled):
    again = reason(tracked, PROBLEM, max_tokens=100, analysis=cfg(1500))
    x, y = sampled.to_dict()["analysis"]["outcomes"], again.to_dict()["analysis"]["outcomes"]
    assert x == y


@pytest.mark.parametrize("budget", [40, 300, 900])
def test_budget_is_respected(tracked, budget):
    run = ReasonRun(tracked, PROBLEM, max_tokens=60, analysis=cfg(budget))
    for _ in run:
        pass
    oc = run.analyze().analysis.outcomes
    assert oc.spent <= budget
    if budget >= 300:
        assert oc.spent > budget // 3  # the budget is used, not left idle


def test_samples_never_run_past_the_chains_cap(tracked):
    run = ReasonRun(tracked, PROBLEM, max_tokens=40, analysis=cfg(0))
    for _ in run:
        pass
    trace = run.trace
    s = BranchSampler(tracked, trace, run.prompt_tokens, SAMPLING, run.stops, parallel=8, budget=4000)
    reqs = [s.request(0, None, 8), s.request(10, trace.tokens[10].top[1].id, 8)]
    s.run(reqs)
    for r in reqs:
        # each sample adds at most max_tokens - prefix tokens (the forced one included), plus
        # the prefix's last token decoded again for its logits
        assert r.tokens <= len(r.values) * (40 - r.prefix + 1)


def _fresh_samples(path, prompt, chain, prefix, forced, n, seed, index, max_tokens):
    """What the sampler should draw, decoded afresh in a context of its own with the same
    cells: the prompt, then the whole chain token by token as the generation did, then
    the branch alone on a sequence sharing the prefix, by a plain loop."""
    out = []
    with Engine(path, n_ctx=4096, n_seq_max=9) as eng:
        eng.decode(prompt, 0)
        for j, t in enumerate(chain):
            eng.decode([t], len(prompt) + j)
        for i in range(n):
            eng.seq_remove(1)
            eng.seq_copy(0, 1, 0, len(prompt) + prefix)
            rng = np.random.default_rng([seed, index, i])
            tok, pos, ids = forced, len(prompt) + prefix, []
            for _ in range(max_tokens - prefix - 1):
                eng.decode_batch([(tok, pos, 1)])
                tok = sample_token(eng.logits(0), SAMPLING, rng)
                if eng.is_eog(tok):
                    break
                ids.append(tok)
                pos += 1
            out.append(ids)
    return out


def test_one_sequence_at_a_time_is_token_identical_to_a_plain_loop(tracked, smollm2_path):
    """With one sample per decode and the same cells, the sampler computes what a plain
    decode loop on a fresh context computes (same kernels, same batch shape, same KV
    layout), so its draws are token-identical. Not by construction elsewhere: with other
    cells in the cache (a shorter context) or several rows per decode, llama.cpp's CPU
    kernels round differently (here a fresh context without the chain's later cells
    diverged after 29 tokens); the statistical test below covers that case."""
    run = ReasonRun(tracked, PROBLEM, max_tokens=48, analysis=cfg(0))
    for _ in run:
        pass
    trace = run.trace
    k = 12
    forced = trace.tokens[k].top[1].id
    s = BranchSampler(tracked, trace, run.prompt_tokens, SAMPLING, run.stops, parallel=1, budget=10_000)
    got = []
    orig = s._finish

    def keep(sample):
        got.append((sample.i, list(sample.ids)))
        orig(sample)

    s._finish = keep
    req = s.request(k, forced, 3)
    req.first_round = 3
    s.run([req])
    fresh = _fresh_samples(smollm2_path, run.prompt_tokens, [t.id for t in trace.tokens], k, forced, 3,
                           SAMPLING.seed, req.index, 48)
    got = [ids for _, ids in sorted(got)]
    assert len(got) == 3 and any(got)
    for g, f in zip(got, fresh):
        # the sampler also stops where a sample states its answer; up to there, identical
        assert g == f[: len(g)]


def test_batched_draws_follow_the_models_distribution(tracked, smollm2_path):
    """64 samples of the first token after a forced alternative, 8 sequences per decode,
    against the probabilities a fresh decode of the same prefix gives (top-p applied):
    close in total variation. A sampler that mixed up the rows of a batched decode, or
    sampled from the wrong position, lands far away (checked: the chosen token's own
    distribution, one position earlier, is far)."""
    run = ReasonRun(tracked, PROBLEM, max_tokens=48, analysis=cfg(0))
    for _ in run:
        pass
    trace = run.trace
    k = next(i for i in range(8, 40) if trace.tokens[i].top[1].prob > 0.05)
    forced = trace.tokens[k].top[1].id
    s = BranchSampler(tracked, trace, run.prompt_tokens, SAMPLING, run.stops, parallel=8, budget=10_000)
    s.max_tokens = k + 2  # the forced token and one drawn token per sample
    firsts = []
    orig = s._finish
    s._finish = lambda sample: (firsts.append(sample.ids[0]) if sample.ids else None, orig(sample))
    req = s.request(k, forced, 64)
    req.first_round = 64
    s.run([req])
    assert len(firsts) >= 60  # a drawn end-of-generation token leaves no id
    with Engine(smollm2_path, n_ctx=1024) as eng:
        prompt = run.prompt_tokens
        eng.decode(prompt + [t.id for t in trace.tokens[:k]] + [forced], 0)
        p = _probs(eng.logits(-1))
        eng.reset()
        eng.decode(prompt + [t.id for t in trace.tokens[:k]], 0)
        wrong = _probs(eng.logits(-1))
    emp = np.bincount(firsts, minlength=len(p)) / len(firsts)
    assert 0.5 * np.abs(emp - p).sum() < 0.2
    assert 0.5 * np.abs(emp - wrong).sum() > 0.5


def _probs(logits):
    """The sampler's distribution under SAMPLING (temperature, then top-p)."""
    z = logits.astype(np.float64) / SAMPLING.temperature
    q = np.exp(z - z.max())
    q /= q.sum()
    order = np.argsort(-q)
    keep = order[: int(np.searchsorted(np.cumsum(q[order]), SAMPLING.top_p)) + 1]
    out = np.zeros_like(q)
    out[keep] = q[keep] / q[keep].sum()
    return out


def test_old_traces_load_and_render(sampled, tmp_path, run_sage):
    d = sampled.to_dict()
    d["version"] = 2
    a = d["analysis"]
    a.pop("outcomes")
    for dd in a["decisions"]:
        for key in ("outcome", "fork", "fork_p"):
            dd.pop(key)
        for b in dd["branches"]:
            b.pop("outcome")
    p = tmp_path / "old.json"
    p.write_text(json.dumps(d))
    old = load_trace(p)
    assert old.analysis.outcomes is None
    r = run_sage("explain", "--tree", str(p))
    assert r.returncode == 0, r.stderr
    # a chain cut off at 100 tokens may have stated no answer: the tree says so, in words
    assert ("Answer" in r.stdout or "no answer: the chain was cut off" in r.stdout)
    assert "continued from here" not in r.stdout and "None" not in r.stdout


def test_tree_shows_the_distributions(sampled, tmp_path, run_sage):
    p = save_trace(sampled, tmp_path)
    r = run_sage("explain", "--tree", str(p))
    assert r.returncode == 0, r.stderr
    assert "from the problem alone" in r.stdout and "continued from here" in r.stdout
    assert "samples" in r.stdout
    assert load_trace(p).to_dict() == sampled.to_dict()

"""Attention tracking, KV-branch rollouts and the inverse analysis on the real SmolLM2."""

import json

import numpy as np
import pytest

from sage.kernels.reference import eq7_significance, normalize_max, value_norm_proxy
from sage.engine import Engine
from sage.inverse import AnalysisConfig
from sage.reason import reason
from sage.trace import TRACE_SCHEMA, load_trace, save_trace, validate

PROBLEM = "Tom has 3 boxes with 12 eggs in each box. He uses 7 eggs. How many eggs are left?"
CFG = AnalysisConfig(max_decisions=2, alternatives=2, rollout_tokens=48, method="greedy")


@pytest.fixture(scope="module")
def tracked(smollm2_path):
    eng = Engine(smollm2_path, n_ctx=1024, track=True, n_seq_max=1 + CFG.max_decisions * CFG.alternatives)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def analyzed(tracked):
    return reason(tracked, PROBLEM, max_tokens=120, analysis=CFG)


def _generate_tracked(path, native):
    eng = Engine(path, n_ctx=512, track=True, native_tracker=native)
    prompt, _ = eng.build_prompt(PROBLEM)
    toks = eng.tokenize(prompt)
    recs = list(eng.generate(toks, 24))
    tr = eng.tracker
    out = (len(toks), [r.id for r in recs], tr.attn.copy(), tr.vattn.copy(), tr.vnorm.copy(), tr.native, tr.error)
    eng.close()
    return out


def test_native_and_python_trackers_agree(smollm2_path):
    n_prompt, ids_c, attn_c, vattn_c, vnorm_c, native_c, err_c = _generate_tracked(smollm2_path, True)
    _, ids_p, attn_p, vattn_p, vnorm_p, native_p, err_p = _generate_tracked(smollm2_path, False)
    assert native_c and not native_p, "the native tracker was built and loaded"
    assert err_c == err_p == 0
    assert ids_c == ids_p
    assert np.array_equal(attn_c, attn_p)
    assert np.array_equal(vattn_c, vattn_p)
    assert np.array_equal(vnorm_c, vnorm_p)
    # each captured row is a distribution over exactly the valid cells
    n_rows = len(ids_c)
    for k in range(n_rows):
        valid = n_prompt + k
        assert attn_c[k, :valid].sum() == pytest.approx(1.0, abs=1e-5)
        assert attn_c[k, valid:].sum() == 0.0
        assert (vattn_c[k, :valid] >= 0).all()


def test_tracking_does_not_change_generation(smollm2_path, engine):
    prompt, _ = engine.build_prompt(PROBLEM)
    toks = engine.tokenize(prompt)
    plain = [r.id for r in engine.generate(toks, 24)]
    n_prompt, ids, *_ = _generate_tracked(smollm2_path, True)
    assert ids == plain


def test_analysis_has_decisions_rollouts_explanation(analyzed):
    a = analyzed.analysis
    assert a is not None and a.tracker == "native"
    # robust to the greedy text: significance is normalized per step to a maximum of 1, and
    # over a 120-token chain of several steps some chain tokens reach 0.3 of a later step's
    # maximum; rounding that moves a near tie cannot take them all below
    assert a.decisions, "a fixed problem yields decision points"
    assert len(a.decisions) <= CFG.max_decisions
    assert [d.rank for d in a.decisions] == list(range(1, len(a.decisions) + 1))
    for d in a.decisions:
        assert d.significance >= CFG.threshold
        assert analyzed.tokens[d.token_index].text == d.text
        assert 1 <= len(d.alternatives) <= 5 and all(x.id != analyzed.tokens[d.token_index].id for x in d.alternatives)
        assert d.branches and len(d.branches) <= CFG.alternatives
        for b in d.branches:
            assert b.token_ids[0] == b.token_id and b.text.startswith(b.token_text)
            assert b.n_tokens == len(b.token_ids) <= CFG.rollout_tokens + 1
            assert b.changed == (b.answer != analyzed.answer.value)
        assert d.confirmed == any(b.changed for b in d.branches)
        assert d.dependencies and all(0 < x.weight <= 1 for x in d.dependencies)
    e = a.explanation
    assert e.justification and e.alternatives and e.confidence and e.dependencies
    assert a.consistency is not None and 0 <= a.consistency <= 1
    assert a.refined == (a.consistency < 0.8)
    validate(json.loads(json.dumps(analyzed.to_dict())), TRACE_SCHEMA)


def _fresh_rollout(path, trace, d, b):
    """Decode the branch's prefix afresh the way the chain was decoded (the prompt as one
    batch, then one token at a time), force the alternative, continue greedily."""
    with Engine(path, n_ctx=1024) as fresh:
        prompt_tokens = fresh.tokenize(trace.prompt)
        fresh.reset()
        fresh.decode(prompt_tokens, 0)
        pos = len(prompt_tokens)
        for t in [t.id for t in trace.tokens[: d.token_index]] + [b.token_id]:
            fresh.decode([t], pos)
            pos += 1
        assert pos - 1 == d.position
        ids = [b.token_id]
        while len(ids) < len(b.token_ids):
            tok = int(np.argmax(fresh.logits()))
            ids.append(tok)
            fresh.decode([tok], pos)
            pos += 1
    return ids


def test_rollouts_are_token_identical_to_fresh_decodes(analyzed, smollm2_path):
    """Every branch shares the chain's KV prefix (llama_memory_seq_cp) and still decodes
    exactly what a fresh context fed the same prefix plus the forced token decodes."""
    checked = 0
    for d in analyzed.analysis.decisions:
        for b in d.branches:
            assert _fresh_rollout(smollm2_path, analyzed, d, b) == b.token_ids
            checked += 1
    assert checked >= 2


def test_batched_rollouts(tracked):
    """All branches of a decision in one llama_decode per token: same structure, and the
    first (forced) token of every branch is the alternative."""
    cfg = AnalysisConfig(max_decisions=2, alternatives=2, rollout_tokens=48, batch_rollouts=True, method="greedy")
    tr = reason(tracked, PROBLEM, max_tokens=120, analysis=cfg)
    for d in tr.analysis.decisions:
        assert [b.token_id for b in d.branches] == [a.id for a in d.alternatives[: len(d.branches)]]
        assert all(1 <= b.n_tokens <= 49 for b in d.branches)
    assert tr.analysis.timings["rollout_tokens"] > 0


def test_same_seed_same_trace(tracked, analyzed):
    again = reason(tracked, PROBLEM, max_tokens=120, analysis=CFG)
    x, y = analyzed.to_dict(), again.to_dict()
    for d in (x, y):
        d.pop("created"), d.pop("timings"), d["analysis"].pop("timings")
    assert x == y


def test_no_decisions_below_impossible_threshold(tracked):
    tr = reason(tracked, "What is 2 + 2?", max_tokens=40, analysis=AnalysisConfig(threshold=1.01, method="greedy"))
    assert tr.analysis.decisions == [] and tr.analysis.consistency is None
    assert "no decision points" in tr.analysis.explanation.justification[0]


def test_saved_trace_round_trips(analyzed, tmp_path):
    back = load_trace(save_trace(analyzed, tmp_path))
    assert back.to_dict() == analyzed.to_dict()


def test_eq7_reference():
    w = np.array([0.5, 0.25, 0.25, 0.0])
    wv = np.array([1.0, 1.0, 0.25, 0.0])
    g = value_norm_proxy(w, wv)
    assert np.allclose(g, [2.0, 4.0, 1.0, 0.0])
    sig = eq7_significance(w, g, 2.0)
    assert np.allclose(sig, 2.0 * wv)
    mask = np.array([True, True, False, True])
    n = normalize_max(sig, mask)
    assert np.allclose(n, [1.0, 1.0, 0.0, 0.0])
    assert not normalize_max(np.zeros(3), np.ones(3, bool)).any()

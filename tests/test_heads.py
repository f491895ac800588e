"""SAGE heads sidecar: analytic identity, file round trip, binding to the base model."""

import numpy as np
import pytest

from sage.engine import Engine
from sage.errors import SageError
from sage.heads import FEATURES, META_FEATURES, SageHeads, logit, fingerprint, sidecar_path
from sage.inverse import AnalysisConfig
from sage.reason import reason

PROBLEM = "Tom has 3 boxes with 12 eggs in each box. He uses 7 eggs. How many eggs are left?"


def test_analytic_heads_reproduce_eq7_and_confidence():
    h = SageHeads.analytic("fp", "m", [1, 2], 4)
    x = np.random.default_rng(0).random((30, len(FEATURES))).astype(np.float32)
    assert np.array_equal(h.inverse(x), x[:, FEATURES.index("significance")])
    m = np.zeros(len(META_FEATURES), np.float32)
    m[0] = logit(0.37)
    assert h.meta(m) == pytest.approx(0.37, abs=1e-6)


def test_sidecar_round_trip_and_force(tmp_path):
    h = SageHeads.analytic("fp", "m", [3, 5], 4)
    h.inverse.blocks[0]["wq"][:] = 0.5
    path = tmp_path / "m.sage.gguf"
    h.save(path)
    g = SageHeads.load(path)
    assert g.tracked_layers == [3, 5] and g.fingerprint == "fp" and not g.trained
    assert np.array_equal(g.head_weights, h.head_weights)
    assert np.array_equal(g.inverse.blocks[0]["wq"], h.inverse.blocks[0]["wq"])
    with pytest.raises(SageError, match="--force"):
        h.save(path)
    assert sidecar_path(tmp_path / "x-Q4_K_M.gguf").name == "x-Q4_K_M.sage.gguf"


def test_not_a_sidecar(tmp_path, smollm2_path):
    with pytest.raises(SageError, match="not a SAGE heads file"):
        SageHeads.load(smollm2_path)


def test_heads_bound_to_their_model(smollm2_path, engine):
    other = SageHeads.analytic("0" * 32, "another model", [15], engine.n_head)
    with pytest.raises(SageError, match="do not belong"):
        Engine(smollm2_path, n_ctx=256, track=True, heads=other)


def test_engine_with_analytic_heads_matches_builtin(smollm2_path, engine):
    full = engine.full_attention_layers()
    layers = [15, 20, 24, 29]
    assert all(il in full for il in layers)
    heads = SageHeads.analytic(fingerprint(engine), "smollm2", layers, engine.n_head)
    cfg = AnalysisConfig(max_decisions=2, alternatives=1, rollout_tokens=24, method="greedy")
    with Engine(smollm2_path, n_ctx=1024, track=True, n_seq_max=3, heads=heads) as a, \
            Engine(smollm2_path, n_ctx=1024, track=True, n_seq_max=3) as b:
        ta = reason(a, PROBLEM, max_tokens=80, analysis=cfg)
        tb = reason(b, PROBLEM, max_tokens=80, analysis=cfg)
    da = [(d.token_index, d.significance, [x.token_ids for x in d.branches]) for d in ta.analysis.decisions]
    db = [(d.token_index, d.significance, [x.token_ids for x in d.branches]) for d in tb.analysis.decisions]
    assert da == db
    assert "analytic sidecar" in ta.analysis.heads


def test_input_bias_round_trip(tmp_path):
    h = SageHeads.analytic("fp", "m", [3], 4)
    h.inverse.b_in = np.full(h.inverse.w_in.shape[1], 0.25, np.float32)
    h.inverse.sigmoid, h.trained = True, True
    path = tmp_path / "m.sage.gguf"
    h.save(path)
    g = SageHeads.load(path)
    x = np.random.default_rng(1).random((9, len(FEATURES))).astype(np.float32)
    assert np.array_equal(g.inverse.b_in, h.inverse.b_in) and np.allclose(g.inverse(x), h.inverse(x))
    assert np.allclose(h.inverse(x), 1 / (1 + np.exp(-(x[:, FEATURES.index("significance")] + 0.25))))


def test_find_heads_order(tmp_path, monkeypatch):
    from sage import heads as H

    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir(), user.mkdir()
    monkeypatch.setattr(H, "SHIPPED", shipped)
    model = tmp_path / "models" / "Foo-1B-Q4_K_M.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF")
    assert H.find_heads(model, "foo", user) is None
    (shipped / "foo.sage.gguf").write_bytes(b"x")
    assert H.find_heads(model, "foo", user) == shipped / "foo.sage.gguf"
    assert H.find_heads(model, None, user) is None  # shipped heads are per preset
    (user / "foo.sage.gguf").write_bytes(b"x")
    assert H.find_heads(model, "foo", user) == user / "foo.sage.gguf"
    (user / "Foo-1B.sage.gguf").write_bytes(b"x")
    assert H.find_heads(model, None, user) == user / "Foo-1B.sage.gguf"  # named without the quant type
    (model.parent / "Foo-1B.sage.gguf").write_bytes(b"x")  # as sage convert writes it
    assert H.find_heads(model, "foo", user) == model.parent / "Foo-1B.sage.gguf"
    (model.parent / "Foo-1B-Q4_K_M.sage.gguf").write_bytes(b"x")
    assert H.find_heads(model, "foo", user) == model.parent / "Foo-1B-Q4_K_M.sage.gguf"


def test_embedded_model_ships_trained_heads(smollm2_path, engine):
    """The sidecar `sage heads train` made for the default model ships in the package, is
    bound to it, and records how it was made and what it measured."""
    import json

    from sage.heads import SHIPPED, find_heads

    path = find_heads(smollm2_path, "smollm2-135m")
    assert path == SHIPPED / "smollm2-135m.sage.gguf"
    heads = SageHeads.load(path)
    assert heads.trained and heads.fingerprint == fingerprint(engine)
    assert heads.info["command"].startswith("sage heads train")
    m = json.loads(heads.info["metrics"])
    assert m["test_random_tokens"] > 0 and m["test_answers"] > 0
    for k in ("auroc_trained", "auroc_analytic", "auroc_entropy", "ece_trained", "ece_share"):
        assert 0 <= m[k] <= 1, k
    assert set(heads.tracked_layers) <= set(engine.full_attention_layers())
    assert heads.info.get("meta") in ("trained", "samples")


def _feature_trace():
    """Six tokens, one step, the answer '12' stated by tokens 3-4; tokens 3 and 5 chose
    among digits."""
    from sage.trace import Alternative, Answer, ModelInfo, Settings, Step, TokenRecord, Trace

    texts = [" So", " it", " is", " 1", "2", "."]
    alts = [[Alternative(0, " So", 0.9), Alternative(50, " Then", 0.1)],
            [Alternative(1, " it", 0.8), Alternative(51, " it ", 0.15), Alternative(52, " this", 0.05)],
            [Alternative(2, " is", 0.99), Alternative(53, " was", 0.01)],
            [Alternative(3, " 1", 0.6), Alternative(54, " 2", 0.4)],
            [Alternative(4, "2", 0.7), Alternative(55, "3", 0.3)],
            [Alternative(5, ".", 0.97), Alternative(56, "!", 0.03)]]
    entropies = [0.3, 0.5, 0.05, 0.7, 0.6, 0.1]
    tokens = [TokenRecord(i, t, float(np.log(a[0].prob)), h, 0.1, a) for i, (t, a, h) in enumerate(zip(texts, alts, entropies))]
    text = "".join(texts)
    start = text.index("12")
    return Trace(problem="p", prompt="p", prompt_tokens=2, model=ModelInfo("m", "/m.gguf", "llama", "m", 1, 1, 1, True),
                 settings=Settings(0.0, 0, 64, 256, 1), tokens=tokens, text=text,
                 steps=[Step(0, text, 0, len(text), 0, 6, "sentence", 0.5)],
                 answer=Answer("12", "12", "number", start, start + 2, 0.6), finish_reason="stop")


def test_token_features_of_format_2():
    from sage.inverse.decisions import token_features
    from sage.inverse.observe import Observation, PromptMap

    tr = _feature_trace()
    n_prompt, n_gen = 2, 6
    attn = np.zeros((n_gen, n_prompt + n_gen))
    attn[5, n_prompt + 1] = 0.9  # the last query looks hard at token 1
    attn[3:, n_prompt + 1] += 0.1
    obs = Observation(tr, n_prompt, PromptMap(["a", "b"], np.array([True, True])), attn, attn)
    f = token_features(obs)
    col = FEATURES.index
    assert f.shape == (6, len(FEATURES))
    assert list(f[:, col("digit")]) == [0, 0, 0, 1, 1, 0]
    assert list(f[:, col("alt_digit")]) == [0, 0, 0, 1, 1, 0]
    # " it " reads as " it": the strongest alternative that reads differently is " this"
    assert f[1, col("alt_prob")] == pytest.approx(0.05) and f[3, col("alt_prob")] == pytest.approx(0.4)
    assert list(f[:, col("before_answer")]) == [1, 1, 1, 1, 1, 0]  # "." comes after "12"
    assert list(f[:, col("chain_position")]) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert f[0, col("entropy_delta")] == 0.0 and f[2, col("entropy_delta")] == pytest.approx(0.05 - 0.4)
    assert f[0, col("entropy_after")] == pytest.approx(np.mean([0.5, 0.05, 0.7, 0.6, 0.1]))
    assert f[5, col("entropy_after")] == 0.0
    # receiver concentration: the most any later row paid; the mean spreads it
    assert f[1, col("attention_peak")] == pytest.approx(1.0)
    assert f[1, col("attention_received")] == pytest.approx((0.1 + 0.1 + 1.0) / 4)
    # no answer: every token counts as before it
    tr.answer = None
    assert token_features(obs)[:, col("before_answer")].all()


def test_answer_features_from_the_start_distribution():
    from sage.inverse.explain import answer_features
    from sage.inverse.outcomes import make_outcome

    tr = _feature_trace()
    start = make_outcome(0, None, ["12", "12", "13", None, "12", "12", "14", "12"], 100, "max", "")
    x = answer_features(tr, start)
    col = META_FEATURES.index
    assert x[col("logit_share")] == pytest.approx(logit(5.5 / 9))
    assert x[col("leader_agrees")] == 1.0 and x[col("none_share")] == pytest.approx(1 / 8)
    assert x[col("distinct")] == pytest.approx(4 / 8) and x[col("log_samples")] == pytest.approx(np.log(8))
    assert x[col("logit_token_prob")] == pytest.approx(logit(0.6)) and x[col("cut")] == 0.0
    # the analytic meta head gives the (smoothed) share itself
    assert SageHeads.analytic("fp", "m", [1], 2).meta(x) == pytest.approx(5.5 / 9, abs=1e-6)
    assert answer_features(tr, make_outcome(0, None, [], 0, "budget", "")) is None
    tr.answer = None
    assert answer_features(tr, start) is None


def test_calibration_is_used_only_where_training_kept_the_meta_head():
    import json

    h = SageHeads.analytic("fp", "m", [1], 2)
    assert not h.calibrated  # analytic: the samples' share
    h.trained = True
    h.info = {"meta": "samples", "metrics": json.dumps({"ece_trained": 0.04, "test_answers": 200, "test_correct": 120})}
    assert not h.calibrated
    h.info["meta"] = "trained"
    # the analytic meta head reads the share alone
    assert h.calibrated and h.calibration() == {"ece": 0.04, "answers": 200.0, "right": 120.0, "chain": 0.0,
                                                "share": 1.0}
    h.meta.w[META_FEATURES.index("distinct")] = -0.5  # a head that reads the samples beyond their share
    assert h.calibration()["share"] == 0.0 and h.calibration()["chain"] == 0.0
    h.meta.w[META_FEATURES.index("mean_entropy")] = 0.5  # a head that reads the chain's entropy
    assert h.calibration()["chain"] == 1.0
    h.info["metrics"] = json.dumps({"ece_trained": float("nan"), "test_answers": True})  # untrusted: only numbers
    assert h.calibration() == {"ece": None, "answers": None, "right": None, "chain": 1.0, "share": 0.0}
    # answers only (sage heads train --fork-problems 0): analytic fork heads, the meta head kept
    a = SageHeads.analytic("fp", "m", [1], 2)
    a.info = {"meta": "trained", "inverse": "analytic"}
    assert a.calibrated and not a.trained and "analytic fork heads, trained answer head" in a.describe()

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
    assert m["test_labels"] > 0 and 0 <= m["auroc_trained"] <= 1 and 0 <= m["ece_trained"] <= 1
    assert set(heads.tracked_layers) <= set(engine.full_attention_layers())

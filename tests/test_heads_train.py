"""`sage heads train`: metrics, head selection, the torch twin of the inverse layer, the
meta head, labels files, and the whole command on the embedded model."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from sage.errors import SageError
from sage.heads import FEATURES, META_FEATURES, SageHeads
from sage.reference.train import (
    TorchInverse,
    auroc,
    ece,
    fit_meta,
    select_heads,
    train_inverse,
    train_meta,
    training_problems,
)


def test_auroc_matches_pair_counting():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 40).astype(float)  # many ties
    y = rng.random(40) < 0.4
    pairs = [(a, b) for a, b in itertools.product(s[y], s[~y])]
    brute = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert auroc(s, y) == pytest.approx(brute)
    assert auroc([1, 2, 3], [0, 1, 1]) == 1.0
    assert auroc([3, 2, 1], [0, 1, 1]) == 0.0
    assert np.isnan(auroc([1, 2], [1, 1]))


def test_ece():
    assert ece([0.9, 0.9, 0.1, 0.1], [1, 1, 0, 0]) == pytest.approx(0.1)
    assert ece([0.5, 0.5], [1, 0]) == pytest.approx(0.0)
    assert ece([1.0], [0]) == pytest.approx(1.0)


def test_chance_ece_is_what_a_calibrated_confidence_shows_by_chance():
    from sage.reference.train import chance_ece

    rng = np.random.default_rng(7)
    p = rng.uniform(0.05, 0.95, 2000)
    # certain confidences leave nothing to chance; more answers, less chance error
    assert chance_ece(np.r_[np.zeros(50), np.ones(50)]) == 0.0
    few, many = chance_ece(p[:50], draws=300), chance_ece(p, draws=300)
    assert many < few / 3 and 0.0 < many < 0.03
    # a confidence that is off by 0.15 shows far more than chance on the same answers
    y = rng.random(2000) < np.clip(p - 0.15, 0, 1)
    assert ece(p, y) > 3 * many


def test_select_heads_keeps_the_best_within_the_layer_budget():
    scores = np.full((5, 4), 0.5)
    scores[0, 1], scores[1, 2], scores[2, 0], scores[3, 3], scores[1, 0] = 0.9, 0.8, 0.7, 0.65, 0.6
    layers, w = select_heads(scores, [10, 11, 12, 13, 14], k=4, max_layers=2)
    assert layers == [10, 11]  # layer 12's head would be a third layer
    assert w.shape == (2, 4) and w.sum() == pytest.approx(1.0)
    assert (w > 0).sum() == 3  # 0.9, 0.8, 0.6: nothing else fits
    assert w[0, 1] > w[1, 2] > w[1, 0] > 0
    with pytest.raises(SageError, match="better than chance"):
        select_heads(np.full((2, 2), 0.4), [0, 1], k=2, max_layers=2)


def test_torch_inverse_exports_to_the_numpy_layer():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, len(FEATURES))).astype(np.float32) * 3 + 1
    mu, sd = x.reshape(-1, len(FEATURES)).mean(0), x.reshape(-1, len(FEATURES)).std(0) + 1e-6
    import torch

    net = TorchInverse(depth=2, d=8, mu=mu, sd=sd, seed=3)
    with torch.no_grad():
        for p in net.parameters():  # far from the initialization, so every weight matters
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
        logits = net(torch.tensor(x), mask).numpy()
    layer = net.export()
    assert np.allclose(1 / (1 + np.exp(-logits[0])), layer(x[0]), atol=1e-5)
    assert np.allclose(1 / (1 + np.exp(-logits[1, :5])), layer(x[1, :5]), atol=1e-5)  # padding is masked


def test_torch_inverse_starts_as_the_analytic_scorer():
    """Its initialization is the eq. 7 significance itself (the blocks add nothing yet)."""
    rng = np.random.default_rng(2)
    x = rng.random((1, 30, len(FEATURES))).astype(np.float32)
    import torch

    net = TorchInverse(depth=6, d=16, mu=x[0].mean(0), sd=x[0].std(0) + 1e-6, seed=0)
    with torch.no_grad():
        out = net(torch.tensor(x), torch.ones(1, 30, dtype=torch.bool))[0].numpy()
    sig = x[0, :, FEATURES.index("significance")]
    assert np.allclose(out, sig, atol=1e-5)


def test_train_inverse_learns_a_planted_rule():
    """Labels that follow the margin feature, not the significance: training finds them."""
    rng = np.random.default_rng(3)
    feats, labels = [], []
    for _ in range(30):
        f = rng.random((20, len(FEATURES))).astype(np.float32)
        toks = rng.choice(20, 8, replace=False)
        labels.append([{"token": int(k), "label": int(f[k, FEATURES.index("margin")] < 0.4)} for k in toks])
        feats.append(f)
    layer, fit = train_inverse(feats, labels, depth=1, width=8, epochs=150, seed=0, lr=1e-2, folds=3)
    assert fit["cv_auroc"] > 0.9 > fit["cv_auroc_start"] and fit["epoch"] > 0
    assert 0.05 <= fit["threshold"] <= 0.95
    assert layer.sigmoid and layer.depth == 1
    # held-out chains of the same rule: the layer ranks them too
    x = rng.random((200, len(FEATURES))).astype(np.float32)
    assert auroc(layer(x), x[:, FEATURES.index("margin")] < 0.4) > 0.9
    # without the feature the rule rests on (the ablation), it cannot
    keep = np.array([n != "margin" for n in FEATURES])
    blind, fit2 = train_inverse(feats, labels, depth=1, width=8, epochs=150, seed=0, lr=1e-2, folds=3, keep=keep)
    assert fit2["cv_auroc"] < 0.7 and not blind.w_in[FEATURES.index("margin")].any()
    # training is seeded: the same layer again, to the bit
    again, fit3 = train_inverse(feats, labels, depth=1, width=8, epochs=150, seed=0, lr=1e-2, folds=3)
    assert fit3 == fit and np.array_equal(again.w_in, layer.w_in) and np.array_equal(again.readout, layer.readout)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(again.blocks, layer.blocks) for k in a)


def test_train_meta_is_a_calibrated_logistic_fit():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, len(META_FEATURES)))
    p = 1 / (1 + np.exp(-(2.0 * x[:, 0] - 1.0)))
    y = (rng.random(400) < p).astype(float)
    head = train_meta(x, y, l2=0.1)
    assert head.w[0] == pytest.approx(2.0, abs=0.5) and head.b == pytest.approx(-1.0, abs=0.4)
    pred = np.array([head(r) for r in x])
    assert ece(pred, y) < 0.08


def test_meta_head_is_used_only_where_it_beats_the_samples_share():
    rng = np.random.default_rng(5)
    y = (rng.random(120) < 0.6).astype(float)
    noise = rng.normal(size=(120, len(META_FEATURES)))
    # a share that tells right from wrong but is miscalibrated (0.8 / 0.3), and features
    # that carry nothing: the head learns the base rate, whose ECE is small by chance
    # alone; the Brier score says the share is better
    share = np.where(y > 0, 0.8, 0.3)
    _, used, info = fit_meta(noise, y, share, seed=0)
    assert not used and info["meta_cv_brier"] > info["meta_cv_brier_share"]
    # features that carry the answer's rightness, a share that carries nothing: used
    x = noise.copy()
    x[:, 0] = 3 * (y - 0.5) + 0.5 * rng.normal(size=120)
    _, used, info = fit_meta(x, y, np.full(120, 0.5), seed=0)
    assert used and info["meta_cv_ece"] < info["meta_cv_ece_share"]
    # too few answers to judge: unused
    assert fit_meta(x[:20], y[:20], np.full(20, 0.5), seed=0)[1] is False


def test_meta_head_that_ranks_worse_than_the_share_is_not_used():
    # a share that orders every right answer above every wrong one but is miscalibrated
    # (0.55 / 0.45), and a feature that carries rightness only noisily: the head is better
    # calibrated (ECE, Brier) yet ranks worse, and would call sure answers unsure
    rng = np.random.default_rng(8)
    y = (rng.random(200) < 0.6).astype(float)
    x = rng.normal(size=(200, len(META_FEATURES)))
    x[:, 0] = 2 * (y - 0.5) + rng.normal(size=200)
    share = np.where(y > 0, 0.55, 0.45)
    _, used, info = fit_meta(x, y, share, seed=0)
    assert info["meta_cv_ece"] < info["meta_cv_ece_share"] and info["meta_cv_brier"] < info["meta_cv_brier_share"]
    assert info["meta_cv_auroc"] < info["meta_cv_auroc_share"] == 1.0 and not used


def test_meta_ridge_is_chosen_out_of_fold():
    from sage.reference.train import META_L2

    rng = np.random.default_rng(6)
    # features that carry nothing: the strongest ridge predicts best out of fold
    y = (rng.random(60) < 0.6).astype(float)
    _, _, info = fit_meta(rng.normal(size=(60, len(META_FEATURES))), y, np.full(60, 0.6), seed=0)
    assert info["meta_l2"] == max(META_L2)
    # one feature that carries it, many answers: a weak ridge
    x = rng.normal(size=(600, len(META_FEATURES)))
    y = (rng.random(600) < 1 / (1 + np.exp(-4 * x[:, 0]))).astype(float)
    head, used, info = fit_meta(x, y, np.full(600, 0.8), seed=0)  # a share that is off
    assert info["meta_l2"] <= 1.0 and used and head.w[0] == pytest.approx(4.0, abs=1.0)


def test_training_problems_are_seeded_and_disjoint():
    tr, te = training_problems(12, seed=5, holdout=0.25)
    tr2, te2 = training_problems(12, seed=5, holdout=0.25)
    assert [p.text for _, p in tr] == [p.text for _, p in tr2] and len(te) + len(tr) == 12 and te and tr
    assert not {p.text for _, p in tr} & {p.text for _, p in te}
    assert {s for s, _ in tr + te} == {"gsm8k", "arithmetic"}
    with pytest.raises(SageError):
        training_problems(3, 0, 0.25)
    with pytest.raises(SageError):
        training_problems(8, 0, 1.0)


@pytest.mark.slow
def test_heads_train_end_to_end(tmp_path, smollm2_path, run_sage):
    """The whole command on the embedded model, small: labels, heads, sidecar, and
    `sage ask` running on the trained heads."""
    out = tmp_path / "mine.sage.gguf"
    labels = tmp_path / "labels.jsonl"
    # 4 samples a distribution: the fewest with which a fork can clear p < 0.1 (3 against 3
    # split 20 ways at most)
    # (the labels take most of its time; with fewer problems, e.g. 8 with 6 fork problems, the
    # training labels held 2 forks in 29 here: too close to none, which training refuses)
    args = ["heads", "train", "--n-problems", "12", "--holdout", "0.25", "--max-tokens", "64", "--sample", "5",
            "--candidates", "1", "--samples", "4", "--alternatives", "1", "--fork-problems", "10", "--depth", "2",
            "--width", "8", "--epochs", "20", "--labels", str(labels), "--out", str(out), "--json"]
    r = run_sage(*args)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    m = res["metrics"]
    assert m["train_problems"] + m["test_problems"] == 12 and m["test_problems"] >= 1 and m["train_labels"] > 0
    assert m["train_fork_problems"] + m["test_fork_problems"] <= 10
    for k in ("auroc_trained", "auroc_analytic", "auroc_entropy", "recall_trained", "ece_trained", "ece_share",
              "ece_entropy", "ece_chance_share", "test_answers", "meta_used"):
        assert k in m
    assert set(m["ablation"]) == {"base", "base + attention concentration", "base + entropy along the chain",
                                  "base + position and answer", "base + token and alternative"}
    heads = SageHeads.load(out)
    assert heads.trained and heads.inverse.depth == 2 and abs(float(heads.head_weights.sum()) - 1) < 1e-5
    assert "sage heads train" in heads.info["command"]
    # resumed from the labels file, answers only (--fork-problems 0): no new rollouts, the
    # same meta head (seeded), the analytic fork heads, the same answer metrics
    lines = labels.read_text().splitlines()
    assert len(lines) == 13
    assert sum(json.loads(ln)["tokens"] is not None for ln in lines[1:]) == 10
    i = args.index("--fork-problems")
    answers_only = args[:i] + ["--fork-problems", "0"] + args[i + 2:-3] + ["--out", str(tmp_path / "ans.sage.gguf"), "--json"]
    r2 = run_sage(*answers_only)
    assert r2.returncode == 0, r2.stderr
    assert labels.read_text().splitlines() == lines
    again = SageHeads.load(tmp_path / "ans.sage.gguf")
    assert not again.trained and again.info["inverse"] == "analytic" and again.info["meta"] == heads.info["meta"]
    assert np.array_equal(again.meta.w, heads.meta.w) and again.meta.b == heads.meta.b
    m2 = json.loads(r2.stdout)["metrics"]
    assert m2["auroc_trained"] is None and m2["train_labels"] == 0 and m2["test_fork_problems"] == 0
    for k in ("test_answers", "test_correct", "ece_trained", "ece_share", "train_answers", "meta_used"):
        assert m2[k] == m[k], k
    shown = run_sage("heads", "show", str(tmp_path / "ans.sage.gguf"))
    assert shown.returncode == 0 and "analytic" in shown.stdout, shown.stderr
    # existing output refused before any work
    r3 = run_sage(*args)
    assert r3.returncode == 2 and "exists" in r3.stderr and len(r3.stderr.strip().splitlines()) == 1
    shown = run_sage("heads", "show", str(out), "--json")
    assert json.loads(shown.stdout)["trained"] is True
    ask = run_sage("ask", "What is 2 + 3?", "--max-tokens", "24", "--budget", "300", "--heads", str(out), "--json")
    assert ask.returncode == 0, ask.stderr
    assert json.loads(ask.stdout)["analysis"]["heads"].startswith("trained")


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--n-problems", "2"], "--n-problems must be at least 4"),
        (["--holdout", "1.5"], "--holdout must be between 0 and 1"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--ray", "x y"], "--ray takes 'local', 'auto' or HOST:PORT"),
        (["--threads", "0"], "--threads must be between 1 and 512"),
        (["--out", "x.gguf"], "NAME.sage.gguf"),
        (["--out", "/nonexistent-dir/x.sage.gguf"], "does not exist"),
        (["--model", "/nonexistent.gguf"], "model file not found"),
    ],
)
def test_heads_train_bad_input(run_sage, args, msg):
    r = run_sage("heads", "train", *args)
    assert r.returncode == 2 and msg in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_heads_train_refuses_existing_output_before_work(run_sage, tmp_path):
    out = tmp_path / "m.sage.gguf"
    out.write_bytes(b"keep")
    r = run_sage("heads", "train", "--out", str(out))
    assert r.returncode == 2 and "--force" in r.stderr and out.read_bytes() == b"keep"


def test_heads_show_without_sidecar_for_a_model(run_sage, tmp_path, smollm2_path):
    import shutil

    model = tmp_path / "copy.gguf"
    shutil.copy(smollm2_path, model)
    r = run_sage("heads", "show", "--model", str(model))
    assert r.returncode == 2 and "no heads sidecar" in r.stderr


def test_youden_threshold():
    from sage.reference.train import youden_threshold

    y = np.array([0, 0, 1, 1, 1, 1], bool)
    # most labels positive: F1 would take the lowest score; balanced accuracy separates
    assert youden_threshold(np.array([0.1, 0.2, 0.6, 0.7, 0.8, 0.9]), y) == pytest.approx(0.6)
    # overlapping classes: TPR - FPR is 2/4 - 0 at 0.7 and 4/4 - 1/2 at 0.2; a tie goes higher
    assert youden_threshold(np.array([0.1, 0.5, 0.3, 0.2, 0.7, 0.9]), y) == pytest.approx(0.7)
    assert youden_threshold(np.array([0.3, 0.4]), np.array([1, 1], bool)) == 0.5
    assert youden_threshold(np.array([0.01, 0.02, 0.03]), np.array([0, 1, 1], bool)) == pytest.approx(0.05)


@pytest.mark.parametrize("used", [False, True])
def test_heads_show_marks_an_unused_meta_head_and_gives_the_chance_of_what_ask_shows(used):
    """`sage heads show`: the fitted meta head's held-out numbers are marked "(not used)"
    where training kept the samples' share, and the chance-ECE sentence is that of the
    confidence sage ask shows (the share's, unless the meta head is used)."""
    from rich.console import Console

    from sage.cli.ui.heads import metrics_view

    m = {"test_answers": 202, "test_correct": 133, "ece_trained": 0.081, "ece_share": 0.086, "ece_entropy": 0.017,
         "auroc_conf_trained": 0.946, "auroc_conf_share": 0.972, "ece_chance_trained": 0.049,
         "ece_chance_share": 0.042, "meta_used": used, "meta_features": "samples"}
    con = Console(width=200, record=True, color_system=None)
    for r in metrics_view(m, "measured"):
        con.print(r)
    text = con.export_text()
    assert ("0.081 (not used)" in text and "0.946 (not used)" in text) is (not used)
    assert ("about 0.04 by chance" in text) is (not used) and ("about 0.05 by chance" in text) is used
    assert ("the samples' share's spread" in text) is (not used)
    assert ("on the samples' features alone" in text) is used  # which head sage ask shows, in words
    if used:
        con = Console(width=200, record=True, color_system=None)
        for r in metrics_view({**m, "meta_features": "share"}, "measured"):
            con.print(r)
        assert "the samples' share recalibrated" in con.export_text()
    if not used:  # an unused head without held-out answers: a dash, not marked
        con = Console(width=200, record=True, color_system=None)
        for r in metrics_view({**m, "test_answers": 0, "ece_trained": None, "auroc_conf_trained": None}, "measured"):
            con.print(r)
        text = con.export_text()
        row = next(ln for ln in text.splitlines() if ln.lstrip().startswith("answer ECE"))
        assert "(not used)" not in text and [c.strip() for c in row.split("│")][1] == "—"


def test_a_recalibrated_share_is_judged_fairly_and_the_fewer_features_chosen():
    """The share of 8 samples, underconfident (the truth is sharper: P(right) =
    sigmoid(2.5 logit share)), the other sample features constant and the chain's noise: a
    head on the share alone (the fewest features) recalibrates it, orders the answers as the
    share does (AUROC within the folds equal), beats it out of fold, and is used. Pooled
    over the folds, its out-of-fold predictions (five fits) rank worse than the share: the
    rule of `fit_meta` compares within the folds, or it could never keep a recalibration."""
    from sage.reference.train import META_SETS, _oof_meta, only

    rng = np.random.default_rng(11)
    n = 300
    k = rng.integers(0, 9, size=n)
    share = k / 8
    z = np.log((k + 0.5) / (8.5 - k))  # logit((k + 1/2) / 9), the feature as sage computes it
    y = (rng.random(n) < 1 / (1 + np.exp(-2.5 * z))).astype(float)
    x = rng.normal(size=(n, len(META_FEATURES)))
    for f in META_SETS["samples"]:  # every sample reaches some answer; the others constant too
        x[:, META_FEATURES.index(f)] = 0.0
    x[:, META_FEATURES.index("logit_share")] = z
    head, used, info = fit_meta(x, y, share, seed=0)
    assert used and info["meta_features"] == "share"  # the fewest features that do it
    assert info["meta_cv_auroc"] == pytest.approx(info["meta_cv_auroc_share"], abs=1e-9)
    assert info["meta_cv_ece"] < info["meta_cv_ece_share"] and info["meta_cv_brier"] < info["meta_cv_brier_share"]
    assert head.w[META_FEATURES.index("logit_share")] == pytest.approx(2.5, abs=0.8)
    assert all(head.w[META_FEATURES.index(f)] == 0 for f in META_FEATURES if f != "logit_share")
    pooled = _oof_meta(only(x, META_SETS["share"]), y, 0, 5, info["meta_l2"])
    assert auroc(pooled, y) < auroc(share, y)


def test_meta_head_buys_features_only_beyond_their_noise():
    """The one-standard-error rule: 200 answers whose rightness follows the share and,
    weakly or strongly, one chain feature. Weakly: the head on all features has the lower
    Brier score out of fold, by less than its standard error, and the share recalibrated
    is used. Strongly: the head on all features is used."""
    def answers(strength: float):
        rng = np.random.default_rng(21)
        k = rng.integers(0, 9, size=200)
        z = np.log((k + 0.5) / (8.5 - k))
        c = rng.normal(size=200)
        y = (rng.random(200) < 1 / (1 + np.exp(-(1.5 * z + strength * c)))).astype(float)
        x = np.zeros((200, len(META_FEATURES)))
        x[:, META_FEATURES.index("logit_share")] = z
        x[:, META_FEATURES.index("logit_token_prob")] = c
        return x, y, k / 8

    head, used, info = fit_meta(*answers(0.3), seed=0)
    assert used and info["meta_features"] == "share" and info["meta_cv_brier_lowest"] < info["meta_cv_brier"]
    assert head.w[META_FEATURES.index("logit_token_prob")] == 0
    head, used, info = fit_meta(*answers(3.0), seed=0)
    assert used and info["meta_features"] == "all" and head.w[META_FEATURES.index("logit_token_prob")] > 1


def test_meta_head_never_reads_the_number_of_samples():
    """The number of samples follows the stopping rule in the labels but the user's
    --budget in `sage ask`: even where it carries rightness, the head gives it no weight."""
    rng = np.random.default_rng(12)
    y = (rng.random(200) < 0.6).astype(float)
    x = rng.normal(size=(200, len(META_FEATURES)))
    x[:, META_FEATURES.index("log_samples")] = np.log(np.where(y > 0, 8, 16)) + 0.1 * rng.normal(size=200)
    head, _, _ = fit_meta(x, y, np.full(200, 0.6), seed=0)
    assert head.w[META_FEATURES.index("log_samples")] == 0

"""sage.labels (the labels of `sage heads train`, format 3): fork scores from sampled
distributions, which tokens get labels, the plan of a run, the resumable file, and the
collection of one problem on the embedded model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sage.errors import SageError
from sage.labels import (
    LABEL_SEED,
    LabelSettings,
    collect,
    collect_one,
    is_fork,
    pick_tokens,
    plan,
    problem_sequence,
    read_labels,
    sampling_of,
    token_label,
)
from sage.trace import Alternative, Answer, ModelInfo, Settings, Step, TokenRecord, Trace


def dist(*values):
    return {"values": list(values), "tokens": 10 * len(values), "stop": "max"}


def test_fork_score_and_its_p_value_come_from_the_distributions():
    # every alternative leads elsewhere, every time: a fork beyond chance
    lab = token_label(3, "random", dist(*["18"] * 8), [
        {"id": 1, "text": " 4", "prob": 0.3, "dist": dist(*["20"] * 8)},
        {"id": 2, "text": " 5", "prob": 0.1, "dist": dist(*["25"] * 8)},
    ])
    assert lab["fork"] == pytest.approx(1.0) and lab["p"] < 0.01 and is_fork(lab)
    # the alternatives lead where the chosen token does: no fork
    same = token_label(3, "random", dist(*["18"] * 8), [{"id": 1, "text": "a", "prob": 0.3, "dist": dist(*["18"] * 8)}])
    assert same["fork"] == 0.0 and not is_fork(same)
    # far apart, but on spread-out small samples: chance gives that distance often
    noisy = token_label(3, "random", dist("1", "2", None, "3"), [{"id": 1, "text": "a", "prob": 0.5,
                                                                  "dist": dist("4", "2", None, "5")}])
    assert noisy["fork"] >= 0.3 and noisy["p"] >= 0.1 and not is_fork(noisy)
    # probability-weighted: the likelier alternative counts more
    half = token_label(0, "candidate", dist(*["1"] * 8), [
        {"id": 1, "text": "a", "prob": 0.3, "dist": dist(*["2"] * 8)},
        {"id": 2, "text": "b", "prob": 0.1, "dist": dist(*["1"] * 8)},
    ])
    assert half["fork"] == pytest.approx(0.75)
    # nothing sampled after the alternatives (they ended the output): no score
    none = token_label(0, "random", dist("1", "1"), [{"id": 1, "text": "a", "prob": 0.3, "dist": dist()}])
    assert none["fork"] is None and none["p"] == 1.0 and not is_fork(none)


def _trace(entropies: list[float], texts: list[str] | None = None) -> Trace:
    texts = texts or [f" w{i}" for i in range(len(entropies))]
    tokens = []
    for i, (h, t) in enumerate(zip(entropies, texts)):
        alt = 0.3 if h > 0.5 else 0.001  # a plausible alternative only where uncertain
        tokens.append(TokenRecord(i, t, math.log(0.6), h, 0.1, [Alternative(i, t, 0.6), Alternative(900 + i, " x", alt)]))
    text = "".join(texts)
    return Trace(problem="p", prompt="p", prompt_tokens=1,
                 model=ModelInfo("m", "/m.gguf", "llama", "m", 1, 1, 1, True), settings=Settings(0.0, 0, 64, 256, 1),
                 tokens=tokens, text=text, steps=[Step(0, text, 0, len(text), 0, len(tokens), "sentence", 0.5)],
                 answer=Answer("7", "7", "number", 0, 1, 0.9), finish_reason="stop")


def test_pick_tokens_a_seeded_random_sample_then_candidates_by_proposal():
    tr = _trace([1.0, 0.1, 1.0, 1.0, 0.1, 1.0, 1.0, 1.0])  # 1 and 4: nothing else was plausible
    proposal = np.array([0.1, 0.9, 0.2, 0.8, 0.9, 0.3, 0.05, 0.4])
    s = LabelSettings(n_random=3, n_candidates=2, seed=4)
    picks = pick_tokens(tr, proposal, s, "problem", 0.01)
    cands = [k for k, kind in picks if kind == "candidate"]
    rnd = [k for k, kind in picks if kind == "random"]
    assert len(rnd) == 3 and not set(rnd) & {1, 4}  # 1 and 4 are not choices
    # the best proposals among the choices the random sample left
    assert cands == sorted(sorted(set([0, 2, 3, 5, 6, 7]) - set(rnd), key=lambda k: -proposal[k])[:2])
    # the random sample is drawn from every choice, the analytic favourite included
    hits = {k for sd in range(40) for k, kind in pick_tokens(tr, proposal, LabelSettings(n_random=3, seed=sd),
                                                                 "problem", 0.01) if kind == "random"}
    assert hits == {0, 2, 3, 5, 6, 7}
    assert pick_tokens(tr, proposal, s, "problem", 0.01) == picks  # seeded
    others = {tuple(pick_tokens(tr, proposal, LabelSettings(n_random=3, n_candidates=2, seed=sd), "problem", 0.01))
              for sd in range(8)}
    assert len(others) > 1  # the seed draws the sample
    # fewer choices than asked: all of them, once
    small = pick_tokens(_trace([1.0, 1.0]), np.zeros(2), LabelSettings(n_random=5, n_candidates=1), "q", 0.01)
    assert sorted(k for k, _ in small) == [0, 1]


def test_plan_a_longer_run_extends_a_shorter_one():
    items, n_train, order = plan(20, seed=3, holdout=0.25, fork_problems=8)
    assert len(items) == 20 and sorted(order) == list(range(20))
    # the fork problems are the first 8 of the sequence, on both sides, and come first
    seq = [p.text for _, p in problem_sequence(20, 3)]
    forks = {p.text for _, p, w in items if w}
    assert forks == set(seq[:8])
    assert [items[i][1].text for i in order[:8]] == seq[:8]
    assert [items[i][1].text for i in order[8:]] == seq[8:]
    assert [s for s, _ in problem_sequence(6, 3)] == ["gsm8k", "arithmetic"] * 3
    # more problems: the same first 20, on the same sides
    more, n_more, _ = plan(40, seed=3, holdout=0.25, fork_problems=8)
    side = {p.text: i >= n_train for i, (_, p, _) in enumerate(items)}
    side_more = {p.text: i >= n_more for i, (_, p, _) in enumerate(more)}
    assert all(side_more[t] == side[t] for t in side)
    assert [p.text for _, p in problem_sequence(40, 3)][:20] == seq
    # seeded, and about the held-out share
    assert plan(20, seed=3, holdout=0.25, fork_problems=8) == (items, n_train, order)
    _, n_tr, _ = plan(400, seed=0, holdout=0.75)
    assert 70 <= n_tr <= 130
    # both sides always hold a problem
    for sd in range(20):
        _, n_tr, _ = plan(4, seed=sd, holdout=0.05)
        assert 1 <= n_tr <= 3
    with pytest.raises(SageError, match="at least 4"):
        plan(3, 0, 0.25)
    with pytest.raises(SageError, match="held-out share"):
        plan(8, 0, 1.0)


def test_sampling_as_sage_ask_samples_for_the_preset():
    assert sampling_of("qwen2.5-coder-0.5b") == {"temperature": 0.7, "top_k": 20, "top_p": 0.8}
    assert sampling_of(None) == {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    s = LabelSettings.for_model("smollm2-135m", seed=5)
    assert s.sampling["temperature"] == 0.2 and s.sampling_settings(LABEL_SEED + 5).seed == LABEL_SEED + 5
    assert s.analysis().sampling.seed == 0  # the start distribution: sage ask's own seed


def _example(text: str, tokens, settings: LabelSettings | None = None) -> dict:
    return {"source": "arithmetic", "problem": {"text": text, "gold": "1", "kind": "number"}, "prompt_tokens": [1],
            "in_problem": [True], "trace": {}, "start": dist(), "tokens": tokens, "answer": None, "correct": False,
            "token_settings": settings.token_settings() if settings is not None and tokens is not None else None}


def test_labels_file_resumes_and_refuses_other_settings(tmp_path, smollm2_path):
    s = LabelSettings(max_tokens=16)
    other = LabelSettings(max_tokens=16, samples=4)  # other token labels, the same chains and answers
    path = tmp_path / "labels.jsonl"
    head = s.header("/some/model.gguf")
    lines = [json.dumps(head), json.dumps(_example("a", [], s)), json.dumps(_example("b", None)),
             json.dumps(_example("b", [], s)), json.dumps(_example("d", [], other)),
             json.dumps(_example("c", None))[:-20]]  # c was cut by an interrupt
    path.write_text("\n".join(lines) + "\n")
    assert other.header("/x") == s.header("/x")
    done = read_labels(path, s.header("/elsewhere/model.gguf"), s.token_settings())  # the model's path may move
    assert set(done) == {"a", "b", "d"} and done["b"].tokens == []  # the record with tokens serves both
    assert done["a"].token_settings == s.token_settings() and done["d"].token_settings == other.token_settings()
    # a record with tokens drawn otherwise is kept over an answer-only one, and replaced by one of these settings
    path.write_text("\n".join(lines[:2] + [json.dumps(_example("a", [{"x": 1}], other))]) + "\n")
    assert read_labels(path, head, s.token_settings())["a"].tokens == []
    assert read_labels(path, head, other.token_settings())["a"].tokens == [{"x": 1}]
    with pytest.raises(SageError, match="other settings"):
        read_labels(path, LabelSettings(max_tokens=17).header("/some/model.gguf"))
    with pytest.raises(SageError, match="other settings"):
        collect(smollm2_path, [], path, LabelSettings(max_tokens=17))


@pytest.fixture(scope="module")
def label_engine(smollm2_path):
    from sage.labels import _open_engine

    eng = _open_engine(str(smollm2_path), 2)
    yield eng
    eng.close()


def test_collect_one_labels_a_problem_as_sage_ask_would_see_it(label_engine):
    from sage.inverse.forks import Coarse
    from sage.inverse.sampler import BranchSampler
    from sage.problems import Problem
    from sage.reason import ReasonRun

    s = LabelSettings.for_model("smollm2-135m", max_tokens=48, n_random=2, n_candidates=1, samples=4, alternatives=2)
    p = Problem("What is 12 * 7?", "84", "number")  # a short chain that states an answer
    ex = collect_one(label_engine, "arithmetic", p, s, with_tokens=True)
    tr = ex.get_trace()
    assert ex.answer == (tr.answer.value if tr.answer else None) and ex.correct == (ex.answer == "84")
    assert len(ex.prompt_tokens) == len(ex.in_problem) and any(ex.in_problem)
    kinds = sorted(lab["kind"] for lab in ex.tokens)
    assert kinds == ["candidate", "random", "random"][: len(kinds)] and kinds
    for lab in ex.tokens:
        t = tr.tokens[lab["token"]]
        assert len(lab["chosen"]["values"]) == 4  # one round of `samples`, no early stop
        assert 1 <= len(lab["alternatives"]) <= 2 and all(a["id"] != t.id for a in lab["alternatives"])
        again = token_label(lab["token"], lab["kind"], lab["chosen"], lab["alternatives"])
        assert again["fork"] == lab["fork"] and again["p"] == lab["p"]  # recomputable from the file
    if ex.answer is not None:
        # the start distribution as sage ask draws it: its first round (8 samples of
        # sage's seed, decoded together) is sage ask's, sample for sample
        cfg = s.analysis()
        run = ReasonRun(label_engine, p.text, max_tokens=48, analysis=cfg)
        for _ in run:
            pass
        sampler = BranchSampler(label_engine, run.trace, run.prompt_tokens, cfg.sampling, run.stops,
                                parallel=cfg.parallel, round_size=cfg.round_size, budget=cfg.budget_tokens())
        co = Coarse(sampler, run.trace, cfg)
        co.sample(int(cfg.budget_tokens() * cfg.coarse_share))
        assert 8 <= len(ex.start["values"]) <= 16
        assert ex.start["values"][:8] == co.start.values[:8]
    else:
        assert ex.start["values"] == []  # no answer: no confidence to learn, nothing sampled
    # an answer-only problem: the same chain and start, no tokens
    only = collect_one(label_engine, "arithmetic", p, s, with_tokens=False)
    assert only.tokens is None and only.start == ex.start and only.trace["tokens"] == ex.trace["tokens"]

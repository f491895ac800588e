"""`sage bench`: problem sets and scoring on fixtures; a short real bench on SmolLM2."""

import json
import math
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import one_line_error
from sage.bench import CONFIGS, branch_vote
from sage.problems import Problem, arithmetic_problems, load_problems, problem_set, score
from sage.errors import SageError
from sage.trace import Analysis, Answer, Branch, Decision, Explanation
from sage.cli.main import app

runner = CliRunner()

GSM = {"question": "Natalia sold 48 clips in April and half as many in May. Total?", "answer": "48/2 = 24\n#### 72"}
AQUA = {
    "question": "A train covers 60 km in 1.5 h. Speed?",
    "options": ["A)30", "B)40", "C)50", "D)60", "E)90"],
    "rationale": "60/1.5 = 40",
    "correct": "B",
}


def test_load_gsm8k_and_aqua(tmp_path):
    f = tmp_path / "mix.jsonl"
    f.write_text(json.dumps(GSM) + "\n\n" + json.dumps(AQUA) + "\n")
    g, a = load_problems(f)
    assert (g.gold, g.kind) == ("72", "number")
    assert (a.gold, a.kind) == ("B", "option") and "B)40" in a.text


@pytest.mark.parametrize("line", ["not json", json.dumps({"question": "q"}), json.dumps({"answer": "no marker"})])
def test_bad_problem_files(tmp_path, line):
    f = tmp_path / "bad.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(SageError, match="bad.jsonl:1"):
        load_problems(f)


def test_scoring():
    num = Problem("q", "72", "number")
    assert score("72", num) and score("72.0", num) and not score("71", num) and not score(None, num)
    assert score("3/4", Problem("q", "0.75", "number"))
    opt = Problem("q", "B", "option")
    assert score("B", opt) and score("b", opt) and not score("C", opt)


def test_arithmetic_problems_are_seeded_and_right():
    a, b = arithmetic_problems(20, seed=3), arithmetic_problems(20, seed=3)
    assert a == b and a != arithmetic_problems(20, seed=4)
    for p in a:
        nums = [int(x) for x in re.findall(r"\d+", p.text)]
        assert int(p.gold) in (nums[0] + nums[1], nums[0] - nums[1], nums[0] * nums[1])


def test_default_samples_come_from_shared_data():
    label, probs = problem_set("gsm8k", 4, seed=0)
    assert len(probs) == 4 and "gsm8k" in label and all(p.kind == "number" for p in probs)
    _, again = problem_set("gsm8k", 4, seed=0)
    assert probs == again
    _, aqua = problem_set("aqua", 3)
    assert all(p.kind == "option" for p in aqua)


def _decision(prob, branches):
    return Decision(1, 0, 10, 0, " x", prob, 1.0, 0.9, 0.5, [1], 0, [], branches, [], None)


def _branch(answer, prob):
    return Branch(1, " y", prob, " y", [1], answer, answer != "7", 3, "stop", -0.5)


def test_branch_vote():
    class T:
        answer = Answer("7", "7", "number", 0, 1, 0.9)
        analysis = Analysis("analytic", [1], "native", "", 0.3, 3, 2, 1, [], None, False, [], None, Explanation([], [], [], []), {})

    t = T()
    assert branch_vote(t) == "7"  # no rollouts: the chain's answer
    t.analysis.decisions = [_decision(0.3, [_branch("9", 0.25), _branch("9", 0.2)])]
    assert branch_vote(t) == "9"  # 0.45 for 9 against 0.3 for 7
    t.analysis.decisions.append(_decision(0.5, [_branch("7", 0.1)]))
    assert branch_vote(t) == "7"


def _bench(*args):
    r = runner.invoke(app, ["bench", "--problems", "arithmetic", "--n-problems", "1", "--reps", "1", "--max-tokens", "24", "--budget", "300", "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _positive_finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_short_bench_every_configuration():
    res = _bench("--sequences", "4,1")  # (the default 1,4,8,16,32 takes about a minute more)
    assert list(res["configs"]) == list(CONFIGS)
    for c, row in res["configs"].items():
        assert _positive_finite(row["tokens_per_s"]["median"]), c
        assert _positive_finite(row["time_per_problem_s"]["median"]), c
        assert math.isfinite(row["time_overhead_vs_forward"]) and math.isfinite(row["time_overhead_vs_llama"])
    saved = list((Path(os.environ["SAGE_HOME"]) / "bench").glob("*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["configs"].keys() == res["configs"].keys()
    seqs = res["sequences_tokens_per_s"]  # this machine's decode throughput with several sequences
    assert list(seqs) == ["1", "4"] and all(_positive_finite(v) for v in seqs.values())
    # the tracking overhead beside the configurations, and what it was measured on
    tr, rows = res["tracking"], res["configs"]
    assert tr["tracker"] == "native"  # the install builds it; where it does not, the bench says so
    assert tr["decode_ratio"] == pytest.approx(rows["track"]["tokens_per_s"]["median"] / rows["forward"]["tokens_per_s"]["median"])
    m = res["machine"]
    assert m["cpu"] and m["cores"] >= 1 and m["threads"] >= 1
    assert m["kernels"] and all(k == k.upper() for k in m["kernels"])


def test_bench_view_names_the_tracker_and_the_machine():
    from rich.console import Console

    from sage.cli.ui import BenchView

    row = {"tokens_per_s": {"median": 100.0, "min": 99.0, "max": 101.0},
           "time_per_problem_s": {"median": 1.0, "min": 1.0, "max": 1.0}, "accuracy": 0.5}
    r = {"model": "m", "problems": "gsm8k", "reps": 2, "max_tokens": 16, "mem": False,
         "configs": {"forward": row, "track": dict(row, tokens_per_s={"median": 80.0, "min": 80.0, "max": 80.0})},
         "sequences_tokens_per_s": {"1": 50.0, "8": 100.0}, "paper": {"time_overhead": 0.14, "memory_overhead": 0.1},
         "tracking": {"tracker": "python", "decode_ratio": 0.8},
         "machine": {"cpu": "Some CPU [bold]x[/bold]", "cores": 2, "threads": 2, "kernels": ["AVX2", "FMA"]}}
    out = Console(record=True, width=200, force_terminal=False)
    BenchView(out).results(r, None)
    text = out.export_text()
    assert "(2) decodes at 0.800 × (1)'s tokens/s (+25.0 % time per token" in text
    assert "not built here" in text
    assert "8: 100 tok/s (×2.00)" in text
    assert "Some CPU [bold]x[/bold] · 2 cores, 2 threads" in text and "AVX2, FMA" in text  # shown as text


def test_multi_sequence_throughput(smollm2_path):
    from sage.bench import multi_sequence_throughput

    got = multi_sequence_throughput(smollm2_path, n_threads=1, sequences=(1, 3), prefix_tokens=20, steps=3, reps=1)
    assert list(got) == ["1", "3"] and all(_positive_finite(v) for v in got.values())


@pytest.mark.slow
def test_short_bench_memory():
    res = _bench("--mem", "--sequences", "none")
    assert res["sequences_tokens_per_s"] is None
    for c, row in res["configs"].items():
        m = row["memory"]
        assert _positive_finite(m["peak_rss"]) and _positive_finite(m["weights_file"]), c
        assert math.isfinite(row["memory_overhead_vs_forward"])
    assert res["configs"]["track"]["memory"]["tracking_buffers"] > 0
    assert res["heads"].endswith("smollm2-135m.sage.gguf")  # the shipped heads, as sage ask uses them
    assert res["configs"]["track"]["memory"]["heads"] > 0


def test_accuracy_over_two_workers_gives_the_answers_of_one(monkeypatch, smollm2_path):
    # one thread per process either way: the same kernels on the same batches, so the same
    # answers, samples and votes per problem, whichever worker ran which problem
    from sage.bench import BenchSettings, run_over_workers

    monkeypatch.setenv("SAGE_THREADS", "1")
    s = BenchSettings(model_path=str(smollm2_path), max_tokens=24, budget=300)
    probs = arithmetic_problems(3, seed=5)
    one = run_over_workers(s, probs, ("forward", "rollouts"), workers=1)
    steps = []
    two = run_over_workers(s, probs, ("forward", "rollouts"), workers=2, on_step=steps.append)
    for c in ("forward", "rollouts"):
        a, b = one[c][0], two[c][0]
        assert (a.answers, a.votes, a.spent, a.tokens, a.rollout_tokens) == (b.answers, b.votes, b.spent, b.tokens, b.rollout_tokens)
    assert len(one["rollouts"][0].answers) == 3 and sum(one["rollouts"][0].spent) > 3 * 24
    assert sum(st.done for st in steps) == 2 * 3  # every problem's configurations reported


def test_workers_only_with_accuracy():
    r = runner.invoke(app, ["bench", "--workers", "2", "--n-problems", "1"])
    one_line_error(r, "--workers applies to --accuracy")


def test_accuracy_mode():
    res = _bench("--accuracy", "--heads", "none", "--workers", "2")
    assert res["heads"] == "analytic (built in)" and res["workers"] == 2 and res["reps"] == 1
    assert list(res["configs"]) == ["forward", "rollouts"] and res["sequences_tokens_per_s"] is None
    row = res["configs"]["rollouts"]
    assert 0 <= row["accuracy"] <= 1 and 0 <= row["vote_accuracy"] <= 1
    assert row["vote_tokens_per_problem"] >= row["tokens_per_problem"]


@pytest.mark.parametrize("args,needle", [(["--problems", "nope.jsonl"], "no problems file"), (["--n-problems", "0"], "--n-problems"),
                                         (["--reps", "0"], "--reps"), (["--workers", "0"], "--workers"), (["--ray", "local"], "--ray applies to --accuracy"), (["--heads", "nope.sage.gguf"], "no heads"),
                                         (["--sequences", "0"], "--sequences"), (["--sequences", "1,x"], "--sequences")])
def test_bench_bad_input(args, needle):
    r = runner.invoke(app, ["bench", *args])
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0]


def test_progress_labels_and_steps():
    from sage.bench import Step, total_steps
    from sage.cli.ui import BenchView

    v = BenchView()
    assert v.describe(Step("rollouts", 2, 2, 3, 5, "problem")) == "(4) + sampled forks · rep 2/2 · problem 3/5"
    assert v.describe(Step("track", 1, 2, 0, 5, "warmup")) == "(2) + tracking · rep 1/2 · warm-up"
    assert v.describe(Step("llama", 0, 2, 0, 5, "warmup")) == "(0) llama-cpp-python · warm-up"
    assert v.describe(Step("forward", 1, 3, 0, 5, "load")) == "(1) sage forward · rep 1/3 · loading the model"
    assert v.describe(Step("", 0, 2, 0, 5, "load")) == "loading the models"
    assert total_steps(5, 2, mem=True) == 5 * 2 * 6 and total_steps(5, 2, mem=False) == 5 + 5 * 2 * 5


def _record(mem, configs, n, reps, smollm2_path):
    import time

    from sage.bench import BenchSettings, run_bench

    steps = []
    s = BenchSettings(model_path=str(smollm2_path), max_tokens=8, threads=1)
    runs = run_bench(s, arithmetic_problems(n), reps=reps, mem=mem, configs=configs,
                     on_step=lambda st: steps.append((time.perf_counter(), st)))
    return runs, steps


@pytest.mark.slow
def test_mem_progress_per_problem(smollm2_path):
    """--mem: every worker process reports each problem as it starts and finishes, with
    its configuration and repetition, while it runs (not all at its end)."""
    from sage.bench import total_steps

    configs, n, reps = ("forward", "rollouts"), 2, 2
    big = bytearray(512 * 2**20)  # this process's peak, which a worker must not inherit
    big[::4096] = b"\1" * len(big[::4096])
    del big
    runs, steps = _record(True, configs, n, reps, smollm2_path)
    done = [st for _, st in steps if st.done]
    order = [(c, rep, k) for rep in range(1, reps + 1) for c in configs for k in range(n + 1)]  # k 0: warm-up
    assert [(st.config, st.rep, st.problem) for st in done] == order
    assert len(done) == total_steps(n, reps, True, configs)
    assert all(st.reps == reps and st.n == n for st in done)
    assert all(st.phase == ("warmup" if st.problem == 0 else "problem") for st in done)
    started = [(st.config, st.rep, st.problem) for _, st in steps if not st.done and st.phase != "load"]
    assert started == order  # each announced before it finishes
    assert [(st.config, st.rep) for _, st in steps if st.phase == "load"] == [(c, r) for r in (1, 2) for c in configs]
    # live: a worker's problems finish at different times, not in one burst when it exits
    t = {(st.config, st.rep, st.problem): at for at, st in steps if st.done}
    assert all(t[(c, r, 2)] - t[(c, r, 1)] > 0.005 for c in configs for r in (1, 2))
    for c in configs:
        assert len(runs[c]) == reps and all(len(r.answers) == n for r in runs[c])
        assert all(0 < r.mem["peak_rss"] < 480 * 2**20 for r in runs[c]), c  # its own peak, not this process's


def test_progress_per_problem_in_process(smollm2_path):
    from sage.bench import total_steps

    configs = ("forward", "track")
    _, steps = _record(False, configs, 2, 1, smollm2_path)
    assert steps[0][1].phase == "load" and steps[0][1].config == ""
    done = [(st.config, st.rep, st.problem) for _, st in steps if st.done]
    assert done == [(c, 0, 0) for c in configs] + [(c, 1, k) for k in (1, 2) for c in configs]
    assert len(done) == total_steps(2, 1, False, configs)


def test_parse_sequences():
    from sage.bench import SEQUENCES, parse_sequences

    assert parse_sequences(None) == SEQUENCES == (1, 4, 8, 16, 32)  # the default counts
    assert parse_sequences(" none ") == () and parse_sequences("16,1,16") == (1, 16)
    for bad in ("", "0", "65", "1,,2", "x"):
        with pytest.raises(SageError, match="--sequences"):
            parse_sequences(bad)

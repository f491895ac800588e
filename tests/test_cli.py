"""The `sage` commands through typer's CliRunner, and Ctrl-C through a real process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sage.cli.main import app
from helpers import one_line_error

runner = CliRunner()
PROBLEM = "A pen costs 3 dollars. How much do 4 pens cost?"


def run(*args):
    return runner.invoke(app, list(args))




def test_version():
    r = run("--version")
    assert r.exit_code == 0 and r.stdout.startswith("sage ")


@pytest.mark.parametrize(
    "cmd", [[], ["ask"], ["explain"], ["bench"], ["convert"], ["models"], ["heads"], ["heads", "train"], ["heads", "show"], ["traces"]]
)
def test_help_has_example(cmd):
    r = run(*cmd, "--help")
    assert r.exit_code == 0
    assert "Example: sage" in r.stdout


def test_ask_renders_and_saves(tmp_path):
    r = run("ask", PROBLEM, "--max-tokens", "80", "--no-track")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "Problem" in out and "Steps" not in out  # compact by default; -v has the steps table
    assert "Answer" in out or "No answer" in out
    assert "trace saved to" in r.stderr and "trace saved to" not in out  # messages on stderr
    home = Path(os.environ["SAGE_HOME"])
    last = json.loads((home / "last.json").read_text())
    assert last["schema"] == "sage.trace" and last["problem"] == PROBLEM
    assert len(list((home / "traces").glob("*.json"))) == 1
    # the streamed text is the generated text
    assert last["text"].split("\n")[0][:30] in out


def test_ask_json_is_only_json():
    r = run("ask", PROBLEM, "--max-tokens", "40", "--json", "--no-track")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["schema"] == "sage.trace"
    assert len(d["tokens"]) == 40 and d["finish_reason"] == "length"
    assert d["analysis"] is None
    assert "\x1b[" not in r.stdout


def test_ask_analysis_then_explain_tree(tmp_path):
    """The user's path: ask (tracking on by default), then explain --tree from last.json."""
    problem = "Tom has 3 boxes with 12 eggs in each box. He uses 7 eggs. How many eggs are left?"
    r = run("ask", problem, "--max-tokens", "120", "--alternatives", "1", "--budget", "1500", "--vote", "-v")
    assert r.exit_code == 0, r.output
    assert "answers from the problem alone" in r.stdout and "Explanation" in r.stdout and "Steps" in r.stdout
    assert "vote (most frequent answer)" in r.stdout
    last = json.loads((Path(os.environ["SAGE_HOME"]) / "last.json").read_text())
    # a chain cut off at 120 tokens may have stated no answer: then there is none to trust
    if last["answer"]["value"] is not None:
        assert "trust" in r.stdout
    else:
        assert "No answer: the chain was cut off at 120 tokens" in " ".join(r.stdout.split())
    assert "None" not in r.stdout
    a = last["analysis"]
    assert a["outcomes"]["spent"] <= 1500 and a["outcomes"]["start"]["n"] >= 1
    assert all(len(d["branches"]) == 1 for d in a["decisions"])
    r = run("explain", "--tree")
    assert r.exit_code == 0, r.output
    assert "continued from here" in r.stdout and problem[:30] in r.stdout
    out = tmp_path / "tree.svg"
    r = run("explain", "--tree", "--svg", str(out))
    assert r.exit_code == 0, r.output
    assert out.read_text().lstrip().startswith("<svg")


def test_models_lists_presets():
    r = run("models", "--json")
    assert r.exit_code == 0, r.output
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    assert rows["smollm2-135m"]["default"] and rows["smollm2-135m"]["path"].endswith(".gguf")
    assert rows["qwen3-1.7b"]["path"] is None  # nothing downloaded in the test cache
    r = run("models")
    assert r.exit_code == 0 and "smollm2-135m" in r.stdout


@pytest.mark.parametrize("problem", ["", "   \n "])
def test_empty_problem(problem):
    one_line_error(run("ask", problem), "problem is empty")


def test_missing_model(tmp_path):
    one_line_error(run("ask", PROBLEM, "--model", str(tmp_path / "nope.gguf")), "not found")


def test_non_gguf_model(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_text("this is not a model\n")
    one_line_error(run("ask", PROBLEM, "--model", str(f)), "not a GGUF")


def test_corrupt_gguf(tmp_path, smollm2_path):
    f = tmp_path / "truncated.gguf"
    f.write_bytes(Path(smollm2_path).read_bytes()[: 4 << 20])
    one_line_error(run("ask", PROBLEM, "--model", str(f)), "cannot load")


def test_garbage_after_header(tmp_path):
    f = tmp_path / "garbage.gguf"
    f.write_bytes(b"GGUF" + os.urandom(4096))
    one_line_error(run("ask", PROBLEM, "--model", str(f)), "cannot load")


def test_prompt_beyond_context():
    one_line_error(run("ask", "apples and pears " * 100, "--ctx", "256"), "context holds 256", "--ctx")


def test_unknown_preset():
    one_line_error(run("ask", PROBLEM, "--model", "gpt-17"), "unknown model", "smollm2-135m")


def test_hub_preset_offline_not_cached():
    line = one_line_error(run("ask", PROBLEM, "--model", "qwen3-1.7b"), "qwen3-1.7b")
    assert "hf download ggml-org/Qwen3-1.7B-GGUF Qwen3-1.7B-Q4_K_M.gguf" in line


def test_bad_hub_spec():
    one_line_error(run("ask", PROBLEM, "--model", "hf:only-org"), "hf:ORG/REPO/FILE.gguf")


def test_hub_model_from_cache(tmp_path, smollm2_path, monkeypatch):
    """A hub file already in the HF cache resolves offline, through huggingface_hub."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    repo = cache / "models--someorg--tiny-GGUF"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / "tiny.gguf").symlink_to(smollm2_path)
    r = run("ask", PROBLEM, "--model", "hf:someorg/tiny-GGUF/tiny.gguf", "--max-tokens", "8", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"]["name"] == "hf:someorg/tiny-GGUF/tiny.gguf"


@pytest.mark.parametrize(
    "args",
    [
        ["--max-tokens", "0"],
        ["--temperature", "-1"],
        ["--ctx", "8"],
        ["--threads", "0"],
        ["--alternatives", "6"],
        ["--threshold", "1.5"],
        ["--max-decisions", "-1"],
    ],
)
def test_bad_numbers(args):
    one_line_error(run("ask", PROBLEM, *args))


def test_ctrl_c_saves_partial_trace(tmp_path):
    """SIGINT while generating: exit 130, partial trace saved."""
    env = dict(os.environ, SAGE_HOME=str(tmp_path / "home"))
    sage = Path(sys.executable).with_name("sage")
    proc = subprocess.Popen(
        [str(sage), "ask", "Count from 1 to 300, one number per line.", "--max-tokens", "2000", "--ctx", "4096"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        # as at a terminal: a runner that starts jobs in the background hands them
        # SIGINT ignored, and Python then keeps ignoring it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # wait until tokens stream (4 header lines, then numbers one per line), then interrupt
    buf = b""
    deadline = time.time() + 60
    while buf.count(b"\n") < 8:
        chunk = proc.stdout.read1(256)
        if not chunk or time.time() > deadline:
            break
        buf += chunk
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (buf + out, err)
    assert b"Traceback" not in err
    last = json.loads((tmp_path / "home" / "last.json").read_text())
    assert last["finish_reason"] == "interrupted"
    assert 0 < len(last["tokens"]) < 2000


def test_foreign_heads_sidecar_refused(tmp_path):
    from sage.heads import SageHeads

    f = tmp_path / "other.sage.gguf"
    SageHeads.analytic("0" * 32, "another model", [15], 9).save(f)
    one_line_error(run("ask", PROBLEM, "--heads", str(f), "--max-tokens", "8"), "do not belong")


def test_missing_heads_file(tmp_path):
    one_line_error(run("ask", PROBLEM, "--heads", str(tmp_path / "x.sage.gguf")), "no heads sidecar")


def test_exact_needs_tracking():
    one_line_error(run("ask", PROBLEM, "--exact", "--no-track"), "--exact", "--no-track")


def test_default_ask_imports_no_torch(tmp_path):
    """Only --exact imports torch: the default `sage ask` path (tracking, analysis,
    analysis) does not (fresh process)."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from sage.cli.main import app\n"
        f"r = CliRunner().invoke(app, ['ask', {PROBLEM!r}, '--max-tokens', '8', '--alternatives', '0'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = dict(os.environ, SAGE_HOME=str(tmp_path / "home"))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1], env=env)


@pytest.mark.slow
def test_ask_exact_then_explain_exact():
    """ask --exact: decision points from exact eq. 7, the proxy's agreement and the time in
    the trace; explain --exact recomputes it from the saved trace and the model file."""
    import io
    import math

    from rich.console import Console

    from sage.trace import load_trace
    from sage.cli.ui import THEME, AskView

    r = run("ask", PROBLEM, "--max-tokens", "24", "--exact", "--alternatives", "1", "--json")
    assert r.exit_code == 0, r.output
    a = json.loads(r.stdout)["analysis"]
    assert "exact" in a["proxy"]
    x = a["exact"]
    assert math.isfinite(x["spearman_vs_proxy"]) and -1 <= x["spearman_vs_proxy"] <= 1
    assert x["exact_s"] > 0 and x["load_s"] >= 0
    # the Rich view says how the significance was computed, the agreement and the time
    trace = load_trace(Path(os.environ["SAGE_HOME"]) / "last.json")
    buf = io.StringIO()
    AskView(Console(file=buf, theme=THEME, width=200)).summary(trace, None)
    line = next(ln for ln in buf.getvalue().splitlines() if ln.startswith("significance: exact"))
    assert f"Spearman vs the llama.cpp proxy {x['spearman_vs_proxy']:+.2f}" in line and f"{x['exact_s']:.1f} s" in line

    r = run("explain", "--exact")
    assert r.exit_code == 0, r.output
    out = " ".join(r.stdout.split())
    assert "Exact eq. 7" in out and "Spearman of the proxy formula vs exact" in out
    assert "What each step depends on most" in out
    # the attention rows as ask aggregated them: the trace's own (shipped, trained) heads
    assert "attention: trained sidecar for smollm2-135m" in out
    for d in a["decisions"]:  # significance recorded by ask --exact = explain's exact value
        assert f"{d['significance']:.2f} " in out
    if a["decisions"]:
        assert "Decision points: exact vs proxy" in out


def test_threshold_applies_to_the_heads_in_use():
    """--threshold is on the trained heads' decision score with trained heads (the
    shipped ones), on normalized significance with analytic heads; the trace records it."""
    from sage.heads import SageHeads, find_heads
    from sage.presets import resolve_model

    shipped = SageHeads.load(find_heads(resolve_model(None).path, "smollm2-135m", None))
    assert shipped.trained
    # --budget 0: no sampling, the decision points are the heads' proposals above the threshold
    common = ["ask", PROBLEM, "--max-tokens", "60", "--budget", "0", "--max-decisions", "20", "--json"]
    own = json.loads(run(*common).stdout)["analysis"]
    assert own["threshold"] == pytest.approx(shipped.threshold)
    higher = round((1 + shipped.threshold) / 2, 3)
    strict = json.loads(run(*common, "--threshold", str(higher)).stdout)["analysis"]
    assert strict["threshold"] == pytest.approx(higher)
    assert all(d["score"] >= higher for d in strict["decisions"])
    assert strict["candidates"] <= own["candidates"]
    analytic = json.loads(run(*common, "--heads", "none", "--threshold", "0.5").stdout)["analysis"]
    assert analytic["threshold"] == pytest.approx(0.5)
    assert analytic["decisions"] and all(d["significance"] >= 0.5 for d in analytic["decisions"])
    # the explanation says which heads scored a decision
    assert own["decisions"] and "the trained heads give it a decision score of" in own["explanation"]["justification"][0]
    assert not any("decision score" in j for j in analytic["explanation"]["justification"])


def test_flags_match_llama_cpp_and_each_other():
    """-t threads, --temp, -c context, -s seed, -n tokens (llama.cpp's names), the same in
    every command; no <bool> metavar; shell completion offered."""
    r = run("ask", PROBLEM, "-n", "12", "-t", "1", "-c", "512", "-s", "3", "--temp", "0.7", "--no-track", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert len(d["tokens"]) == 12 and d["settings"]["temperature"] == 0.7 and d["settings"]["seed"] == 3
    assert d["settings"]["n_ctx"] == 512 and d["settings"]["n_threads"] == 1
    for cmd in (["ask"], ["bench"], ["heads", "train"]):
        h = run(*cmd, "--help").stdout
        assert "<bool>" not in h, cmd
        assert "-n" in h and "--n-predict" in h, cmd
        assert "-s" in h and "--seed" in h, cmd
    assert "--n-problems" in run("bench", "--help").stdout and "--n-problems" in run("heads", "train", "--help").stdout
    assert "--install-completion" in run("--help").stdout


def test_ask_reads_stdin_and_quiet_prints_only_the_answer():
    r = runner.invoke(app, ["ask", "-", "-n", "40", "--budget", "0", "--json"], input="What is 2 + 3?\n")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["problem"] == "What is 2 + 3?"
    # no argument with a pipe reads stdin too; --quiet: the answer alone on stdout
    r = runner.invoke(app, ["ask", "-n", "40", "--budget", "0", "-q"], input="What is 2 + 3?")
    assert r.exit_code == 0, r.output
    a = json.loads((Path(os.environ["SAGE_HOME"]) / "last.json").read_text())["answer"]
    assert r.stdout == (a["value"] + "\n" if a["value"] is not None else "")
    one_line_error(runner.invoke(app, ["ask", "-"], input="  \n"), "empty")
    one_line_error(runner.invoke(app, ["ask", "-"], input=b"\xff\xfe"), "UTF-8")
    one_line_error(run("ask", "hi", "-q", "--json"), "pick one")


def test_explain_json_and_traces(tmp_path):
    for q in ("What is 2 + 3?", "What is 4 + 4?"):
        assert run("ask", q, "-n", "16", "--budget", "0").exit_code == 0
    home = Path(os.environ["SAGE_HOME"])
    r = run("explain", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["problem"] == "What is 4 + 4?"
    r = run("traces", "list", "--json")
    rows = json.loads(r.stdout)
    assert [x["problem"] for x in rows] == ["What is 4 + 4?", "What is 2 + 3?"] and rows[0]["number"] == 1
    r = run("traces")  # the list is the default
    assert r.exit_code == 0 and "What is 2 + 3?" in r.stdout and "What is 4 + 4?" in r.stdout
    r = run("traces", "show", "2", "--json")
    assert json.loads(r.stdout)["problem"] == "What is 2 + 3?"
    assert run("traces", "show", rows[1]["id"][:12]).exit_code == 2  # a prefix that names both
    r = run("traces", "path", "1")
    assert r.stdout.strip() == rows[0]["path"]
    one_line_error(run("traces", "show", "9"), "2 saved traces")
    one_line_error(run("traces", "show", "nope"), "no saved trace")
    one_line_error(run("traces", "rm"), "--all")
    # removing the newest removes last.json (its copy) too; the other stays
    r = run("traces", "rm", "1")
    assert r.exit_code == 0 and "removed 1 trace" in r.stderr
    assert not (home / "last.json").exists()
    assert [x["problem"] for x in json.loads(run("traces", "list", "--json").stdout)] == ["What is 2 + 3?"]
    assert run("traces", "rm", "--all").exit_code == 1  # asks; no answer on stdin: nothing removed
    assert len(list((home / "traces").glob("*.json"))) == 1
    assert run("traces", "rm", "--all", "--yes").exit_code == 0
    assert not list((home / "traces").glob("*.json"))


def test_how_to_read_is_in_the_readme_and_in_explain_help():
    from sage.cli.explain import HOW_TO_READ

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").split())
    assert "### How to read sage's output" in readme
    bullets = [" ".join(b.split()) for b in HOW_TO_READ.split("\n\n")[1:] if b.strip()]
    assert len(bullets) >= 5
    for b in bullets:  # the README says what the help says, word for word
        assert b in readme, b[:60]
    r = run("explain", "--help")
    assert r.exit_code == 0 and "How to read sage's output" in r.stdout and "trust" in r.stdout

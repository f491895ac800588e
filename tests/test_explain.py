"""`sage explain`: a saved trace rendered as a tree, exported, and bad files refused.

Traces are built from the dataclasses (no model); the command runs through CliRunner on a
local app, so these tests do not depend on how sage.cli.main registers it.
"""

import html
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from sage.trace import (
    Alternative,
    Analysis,
    Answer,
    Branch,
    Decision,
    Dependency,
    Explanation,
    ModelInfo,
    Settings,
    Step,
    TokenRecord,
    Trace,
    save_trace,
)
from sage.cli.explain import explain
from helpers import one_line_error

PROBLEM = "A pen costs 3 dollars. How much do 4 pens cost?"
STEPS = [
    "1. Each pen costs 3 dollars.",
    "2. Four pens cost 4 times 3 dollars, which is 12 dollars.",
    "3. The answer is 12.",
]
SHOWN = [s.split(". ", 1)[1] for s in STEPS]  # the tree numbers steps itself

app = typer.Typer()
app.command("explain")(explain)


@app.command("other")
def _other() -> None:
    """Keeps typer in subcommand mode, as in the real app."""


runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["explain", *args])


def home() -> Path:
    return Path(os.environ["SAGE_HOME"])




def make_trace(analysis: bool = True, problem: str = PROBLEM) -> Trace:
    text = "\n".join(STEPS)
    steps, pos = [], 0
    for i, s in enumerate(STEPS):
        steps.append(Step(i, s, pos, pos + len(s), 4 * i, 4 * i + 4, "numbered", (0.97, 0.58, 0.91)[i]))
        pos += len(s) + 1
    tokens = [
        TokenRecord(i, f"t{i}", -0.1, 0.3, 0.1, [Alternative(i, f"t{i}", 0.9), Alternative(99, "x", 0.05)])
        for i in range(12)
    ]
    a = text.rindex("12")
    answer = Answer("12", "12", "number", a, a + 2, 0.93)
    trace = Trace(
        problem=problem,
        prompt=f"<|im_start|>user\n{problem}<|im_end|>\n",
        prompt_tokens=20,
        model=ModelInfo("smollm2-135m", "/models/smollm2.gguf", "llama", "SmolLM2 135M Q4_1", 90_000_000, 134_515_008, 8192, True),
        settings=Settings(0.0, 0, 512, 2048, 2),
        tokens=tokens,
        text=text,
        steps=steps,
        answer=answer,
        finish_reason="stop",
        created="2025-05-04T10:11:12+0000",
        sage_version="0.1.0",
    )
    if not analysis:
        return trace
    decision = Decision(
        rank=1,
        token_index=5,
        position=25,
        step=1,
        text=" times",
        prob=0.62,
        entropy=1.1,
        significance=0.87,
        score=0.33,
        dependents=[1, 2],
        merged=1,
        alternatives=[
            Alternative(301, " plus", 0.21),
            Alternative(302, " x", 0.09),
            Alternative(303, " and", 0.05),
            Alternative(304, " by", 0.02),
        ],
        branches=[
            Branch(301, " plus", 0.21, " plus 3 dollars, which is 7 dollars.\n3. The answer is 7.", [301, 5, 6], "7", True, 14, "stop", -0.4),
            Branch(302, " x", 0.09, " x 3 dollars = 12 dollars.\n3. The answer is 12.", [302, 7, 8], "12", False, 13, "stop", -0.3),
        ],
        dependencies=[Dependency(8, " 4", "prompt", 1.0), Dependency(5, " 3", "prompt", 0.8)],
        confirmed=True,
    )
    trace.analysis = Analysis(
        heads="analytic (built in)",
        tracked_layers=[20, 24],
        tracker="native",
        proxy="value-norm",
        threshold=0.3,
        max_decisions=3,
        alternatives=2,
        candidates=3,
        decisions=[decision],
        consistency=0.5,
        refined=True,
        notes=["one rollout reached a different answer"],
        answer_confidence=0.81,
        explanation=Explanation(
            justification=["Step 2 multiplies the count by the price."],
            alternatives=["With ' plus' the answer becomes 7."],
            confidence=["The answer tokens had p=0.93."],
            dependencies=["Step 2 depended most on ' 4' in the problem."],
        ),
        timings={"analysis_s": 0.4},
    )
    return trace


def flat(s: str) -> str:
    return " ".join(s.split())


def test_tree_from_last_json():
    save_trace(make_trace(), home())
    r = run("--tree")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert PROBLEM in out and "smollm2-135m" in out
    for s in SHOWN:
        assert s in out, s
    assert "decision ' times' p=0.62, significance 0.87" in out
    assert "' plus' p=0.21" in out and "different answer: 7" in out
    assert "' x' p=0.09" in out and "same answer" in out
    assert "not rolled out: ' and' 0.05 · ' by' 0.02" in out
    assert "Answer 12" in out and "consistency 0.50 (refined)" in out
    # the decision hangs under its own step, between step 2 and step 3
    assert out.index(SHOWN[1]) < out.index("decision") < out.index(SHOWN[2])
    assert run().stdout == out  # --tree is the default view


def test_explicit_path_and_long_text_shortened(tmp_path):
    long_problem = "Count the apples. " * 3
    trace = make_trace(problem=long_problem)
    trace.steps[0].text = "First, " + "we look at every single pen in the shop window " * 8
    save_trace(make_trace(), home())  # last.json holds another trace
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(trace.to_dict()))
    r = run(str(path))
    assert r.exit_code == 0, r.output
    assert "Count the apples." in r.stdout and PROBLEM not in r.stdout
    assert "First, we look at every single pen" in flat(r.stdout) and "…" in r.stdout
    assert len(r.stdout) < 3000


def test_no_track_trace_renders():
    save_trace(make_trace(analysis=False), home())
    r = run("--tree")
    assert r.exit_code == 0, r.output
    assert all(s in r.stdout for s in SHOWN) and "Answer 12" in r.stdout
    assert "decision" not in r.stdout
    assert "no inverse analysis" in r.stdout and "--no-track" in r.stdout


def test_svg_export(tmp_path):
    save_trace(make_trace(), home())
    out = tmp_path / "out.svg"
    r = run("--tree", "--svg", str(out))
    assert r.exit_code == 0, r.output
    assert SHOWN[1] in r.stdout  # printed to the terminal as well
    svg = out.read_text()
    assert svg.startswith("<svg")
    assert SHOWN[1] in html.unescape(svg).replace("\xa0", " ")
    assert not list(tmp_path.glob(".*.tmp"))


def test_html_export(tmp_path):
    save_trace(make_trace(), home())
    out = tmp_path / "out.html"
    r = run("--html", str(out))
    assert r.exit_code == 0, r.output
    doc = out.read_text()
    assert doc.lstrip().lower().startswith(("<!doctype", "<html"))
    assert SHOWN[1] in html.unescape(doc)


@pytest.mark.parametrize("flag, name", [("--svg", "out.svg"), ("--html", "out.html")])
def test_existing_export_needs_force(tmp_path, flag, name):
    save_trace(make_trace(), home())
    out = tmp_path / name
    out.write_text("keep me")
    one_line_error(run(flag, str(out)), "exists", "--force")
    assert out.read_text() == "keep me"
    r = run(flag, str(out), "--force")
    assert r.exit_code == 0, r.output
    assert out.read_text() != "keep me"


def test_export_into_missing_dir(tmp_path):
    save_trace(make_trace(), home())
    one_line_error(run("--svg", str(tmp_path / "nope" / "out.svg")), "does not exist")


def test_svg_and_html_same_file(tmp_path):
    save_trace(make_trace(), home())
    out = tmp_path / "out"
    one_line_error(run("--svg", str(out), "--html", str(out)), "same file")
    assert not out.exists()


def test_no_trace_yet():
    one_line_error(run(), "sage ask")


def test_explicit_missing_trace(tmp_path):
    one_line_error(run(str(tmp_path / "gone.json")), "no trace at")


@pytest.mark.parametrize(
    "content, needle",
    [
        ("this is not json {", "not valid JSON"),
        ('{"a": 1}', "not a sage trace"),
        ("[1, 2]", "not a sage trace"),
        ("version1", "version 1"),
        ("broken", "not a valid sage trace"),
    ],
)
def test_bad_trace_files(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    if content == "version1":
        content = json.dumps({**make_trace().to_dict(), "version": 1})
    elif content == "broken":
        d = make_trace().to_dict()
        d["analysis"]["decisions"][0]["branches"][0]["changed"] = "yes"
        content = json.dumps(d)
    path.write_text(content)
    one_line_error(run(str(path)), needle)


def test_bad_last_json():
    home().mkdir(parents=True)
    (home() / "last.json").write_text("\x00\x01garbage")
    one_line_error(run("--tree"), "last.json")


def test_help_has_example():
    r = run("--help")
    assert r.exit_code == 0
    assert "Example: sage explain --tree" in r.stdout


def test_loads_no_model(tmp_path):
    """Importing and running explain pulls in neither llama_cpp nor torch (fresh process)."""
    save_trace(make_trace(), home())
    code = (
        "import sys, typer\n"
        "from typer.testing import CliRunner\n"
        "import sage.cli.explain, sage.cli.ui.tree\n"
        "app = typer.Typer(); app.command('explain')(sage.cli.explain.explain); app.command('x')(lambda: None)\n"
        "r = CliRunner().invoke(app, ['explain', '--tree'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('llama_cpp', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1], env=dict(os.environ))


def test_trace_without_exact_field_loads(tmp_path):
    """Traces saved before `--exact` existed have no analysis.exact: they still load."""
    from sage.trace import load_trace

    d = make_trace().to_dict()
    del d["analysis"]["exact"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    assert load_trace(path).analysis.exact is None
    r = run(str(path))
    assert r.exit_code == 0, r.output


def test_exact_field_is_validated(tmp_path):
    trace = make_trace()
    trace.analysis.exact = {"spearman_vs_proxy": None, "exact_s": 1.5, "load_s": 0.0, "forward_s": 1.0}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace.to_dict()))
    assert run(str(path)).exit_code == 0
    d = trace.to_dict()
    d["analysis"]["exact"]["spearman_vs_proxy"] = "high"
    path.write_text(json.dumps(d))
    one_line_error(run(str(path)), "not a valid sage trace", "$.analysis.exact.spearman_vs_proxy")


def test_exact_without_the_model_file():
    """--exact needs the trace's model: gone, one line naming the path, nothing else printed."""
    save_trace(make_trace(), home())
    r = run("--exact")
    one_line_error(r, "/models/smollm2.gguf")
    assert r.stdout == ""

"""What a person reads in `sage ask` and `sage explain`: an answer they can judge, never
"None", no answer where none was given, the trust in words and colour."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from test_explain import make_trace

from sage.cli.ui import THEME, AskView
from sage.cli.ui.tree import show_tree
from sage.inverse.outcomes import make_outcome
from sage.trace import Answer, Outcomes


def _sampled(trace, values):
    o = make_outcome(0, None, values, 40, "max", " 3 dollars each.")
    trace.analysis.outcomes = Outcomes(
        sampling={"temperature": 1.0}, rule="settled", budget=400, spent=160, start=o,
        steps=[o for _ in trace.steps], movement=[0.0, 0.5, 0.0], movement_p=[1.0, 0.05, 1.0],
        anchors=[1], proposed=1, measured=1, vote=o.leader, parallel=4)
    for d in trace.analysis.decisions:
        d.outcome, d.fork, d.fork_p, d.confirmed = o, 0.7, 0.02, True
        for b in d.branches:
            b.outcome = make_outcome(0, b.token_id, ["7", "7", "7", "12"], 40, "max", b.text)
    return trace


def _views(trace) -> str:
    out = []
    for verbose in (False, True):
        buf = io.StringIO()
        AskView(Console(file=buf, theme=THEME, width=250), Console(file=io.StringIO()), verbose=verbose).summary(
            trace, None, vote=True)
        out.append(buf.getvalue())
    buf = io.StringIO()
    show_tree(trace, Console(file=buf, theme=THEME, width=250))
    return "\n".join(out) + buf.getvalue()


def test_a_cut_off_chain_shows_no_answer_and_never_none():
    t = _sampled(make_trace(), ["12", "12", "7", None])
    t.answer = Answer("", None, "none", len(t.text), len(t.text), None)
    t.finish_reason = "length"
    out = _views(t)
    assert "None" not in out
    assert "No answer" in out and "cut off" in out
    assert "what the model answers most when continued from" in out  # the curve by the samples' leader


def test_an_open_question_says_what_it_cannot_compare():
    t = make_trace(problem="Why is the sky blue?")
    t.answer = Answer("", None, "none", len(t.text), len(t.text), None, expected="open")
    t.analysis.notes = []
    for d in t.analysis.decisions:
        d.branches = []
    out = _views(t)
    assert "None" not in out
    assert "No short answer to check" in out and "explanation" in out
    assert "open question has no short answer to compare" in out


def test_an_option_letter_against_its_value_is_flagged_in_the_view():
    t = _sampled(make_trace(), ["D", "D", "C", "D"])
    t.answer = Answer("D", "D", "option", 0, 1, 0.8, expected="option",
                      note="the chain wrote option D with the value 45, but option D is '50' and 45 is option C: "
                           "the letter and the value disagree")
    out = _views(t)
    assert out.count("the letter and the value disagree") >= 3  # compact, verbose, tree


@pytest.mark.parametrize("values,word,style", [
    (["12"] * 9 + ["7"], "high trust", "green"),
    (["12"] * 6 + ["7"] * 4, "medium trust", "yellow"),
    (["12"] * 1 + ["7"] * 19, "very low trust", "bold red"),
])
def test_the_answer_is_coloured_by_its_trust(values, word, style):
    t = _sampled(make_trace(), values)
    panel = AskView.answer_panel(t)
    assert panel.border_style == style
    body = panel.renderable
    assert word in body.plain
    value_at = body.plain.index("12")
    assert any(sp.start <= value_at < sp.end and sp.style == style for sp in body.spans)


def test_a_calibrated_estimate_carries_the_trust_and_says_how_far_it_held():
    """Trained heads whose meta head was kept: the trust word and colour rest on its
    estimate, which is shown with the held-out calibration; the samples' share stays."""
    from sage.cli.ui.report import render_html

    t = _sampled(make_trace(), ["12"] * 9 + ["7"])  # 90 % of the samples: high on the samples alone
    t.analysis.answer_confidence = 0.31
    t.analysis.calibration = {"share": 0.9, "ece": 0.043, "answers": 212, "right": 130}
    panel = AskView.answer_panel(t)
    assert panel.border_style == "dark_orange"  # low: 31 %
    body = panel.renderable.plain
    assert "low trust" in body and "high trust" not in body
    assert "put the chance it is right at 31%" in body
    assert "on 212 held-out answers (130 right) such estimates were off by 4 points on average (ECE 0.04)" in body
    assert "9 of 10 samples from the problem alone reach it" in body
    assert "nearly every time" not in body  # the samples' own meaning would contradict the word
    out = _views(t)
    assert out.count("put the chance it is right at 31%") >= 3  # compact, verbose, tree
    assert "the trained heads' estimate of the chance the answer is right" in out  # the scale says what it rests on
    page = render_html(t)
    assert "put the chance it is right at 31%" in page and "c-unsure" in page
    # few held-out answers: said to be rough; no calibration measured: said so
    t.analysis.calibration = {"share": 0.9, "ece": 0.1, "answers": 30, "right": 3}
    assert "a rough check: few answers" in AskView.answer_panel(t).renderable.plain
    t.analysis.calibration = {"share": 0.9}
    assert "was not measured" in AskView.answer_panel(t).renderable.plain
    # without calibration the samples carry it, as before
    t.analysis.calibration = None
    t.analysis.answer_confidence = 0.9
    assert "high trust" in AskView.answer_panel(t).renderable.plain


def test_the_streamed_chain_wraps_between_words_in_a_terminal():
    buf = io.StringIO()
    con = Console(file=buf, theme=THEME, width=24, force_terminal=True, color_system=None)
    view = AskView(con, Console(file=io.StringIO()))
    words = ["Finally", ",", " find", " the", " number", " of", " eggs", " that", " are", " left", " with", " 7",
             " eggs", ".\n", "The", " answer", " is", " 1", ",", "2", "00", "."]
    for w in words:
        view.token(w, 0.9)
    view.end_chain()
    lines = buf.getvalue().split("\n")
    assert all(len(line) <= 24 for line in lines), lines
    # every word is whole on one line (the terminal would have cut "eggs" at the edge)
    for w in ("Finally,", "number", "eggs", "answer", "1,200."):
        assert any(w in line for line in lines), (w, lines)
    assert lines[0] == "Finally, find the number"


@pytest.mark.parametrize("share, chain, words", [
    (1.0, 0.0, "recalibrating that share"),
    (0.0, 0.0, "reading those samples, puts"),
    (0.0, 1.0, "reading those samples and the chain's own uncertainty, puts"),
])
def test_the_calibrated_confidence_says_what_the_meta_head_read(share, chain, words):
    """The sentence that gives the meta-cognitive head's confidence names what that head
    reads (the sidecar's weights): the share alone, the samples, or also the chain."""
    from sage.inverse.explain import explain_sampled

    t = make_trace()
    value = t.answer.value
    t = _sampled(t, [value, value, value, "7"])
    cal = {"ece": 0.06, "answers": 250.0, "right": 170.0, "chain": chain, "share": share}
    ex = explain_sampled(t, t.analysis.decisions, t.analysis.outcomes, 0.3, trained=True, calibrated=(0.83, cal))
    text = " ".join(ex.confidence)
    assert words in text and "83%" in text and "250 held-out answers" in text
    others = {"recalibrating that share", "reading those samples, puts",
              "reading those samples and the chain's own uncertainty, puts"} - {words}
    assert not any(o in text for o in others)

"""`sage explain --html`: the report page (sage.cli.ui.report).

Traces are built from the dataclasses (no model): test_explain's make_trace, its text cut
into tokens that add up to it, and sampled outcomes added. The page is parsed with
html.parser; where chromium is installed it is also opened headless, after its script
ran, and screenshotted in both themes (SAGE_BROWSER_TESTS=1: a missing browser fails).
"""

from __future__ import annotations

import copy
import html
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sage.cli.ui.ask import shown_decisions
from sage.cli.ui.report import PALETTE, TINT_CLASS, chain_words, render_html
from sage.inverse.outcomes import make_outcome
from sage.trace import Alternative, Outcomes, TokenRecord, save_trace
from test_explain import make_trace, run

WORD_PROBS = {" times": 0.62, " cost": 0.35, " answer": 0.12}  # the rest: 0.95


def tokens_for(text: str) -> list[str]:
    """GPT-like pieces: a word or number with its leading space, punctuation, newlines."""
    pieces = re.findall(r" ?[A-Za-z]+| ?\d+|\n|[^\sA-Za-z\d]| ", text)
    assert "".join(pieces) == text
    return pieces


def report_trace(outcomes: bool = True):
    """make_trace() with tokens that add up to its text, and (optionally) sampled outcomes:
    the answer 12 moves over step 2, where ' times' is a fork and ' cost' is not."""
    t = make_trace()
    pieces = tokens_for(t.text)
    t.tokens, starts, pos = [], [], 0
    for i, p in enumerate(pieces):
        prob = WORD_PROBS.get(p, 0.95)
        alts = [Alternative(i, p, prob), Alternative(1000 + i, p.upper() if p.strip() else "\t", (1 - prob) * 0.7),
                Alternative(2000 + i, " so", (1 - prob) * 0.2)]
        t.tokens.append(TokenRecord(i, p, math.log(prob), 0.5, 0.1, alts))
        starts.append(pos)
        pos += len(p)
    starts.append(pos)
    for s in t.steps:
        s.token_start = next(i for i, x in enumerate(starts) if x >= s.char_start)
        s.token_end = next(i for i, x in enumerate(starts) if x >= s.char_end)
    times = pieces.index(" times")
    d = t.analysis.decisions[0]
    d.token_index, d.position = times, 20 + times
    if not outcomes:
        return t
    mo = make_outcome
    start = mo(0, None, ["12"] * 6 + ["7"] * 2, 400, "max", "")
    after = [mo(5, None, ["12"] * 5 + ["7", "9", None], 300, "max", ""),
             mo(12, None, ["12"] * 8, 200, "settled", ""), mo(20, None, ["12"] * 4, 40, "settled", "")]
    t.analysis.outcomes = Outcomes(
        sampling={"temperature": 1.0}, rule="sampled in rounds", budget=1500, spent=1400, start=start,
        steps=after, movement=[0.3, 0.4, 0.0], movement_p=[0.2, 0.01, 1.0], anchors=[1], proposed=3,
        measured=2, vote="12", parallel=8)
    d.outcome = mo(times, None, ["12"] * 7 + ["7"], 200, "max", "")
    d.branches[0].outcome = mo(times, 301, ["7"] * 6 + ["12"] * 2, 200, "max", " plus 3")
    d.branches[1].outcome = mo(times, 302, ["12"] * 8, 200, "settled", " x 3")
    d.fork, d.fork_p, d.confirmed = 0.62, 0.01, True
    cleared = copy.deepcopy(d)
    cleared.rank, cleared.token_index, cleared.text = 2, pieces.index(" cost"), " cost"
    cleared.fork, cleared.fork_p, cleared.confirmed = 0.05, 0.9, False
    t.analysis.decisions.append(cleared)
    return t


class Page(HTMLParser):
    """The parsed page: tags with their attributes, the text outside script and style."""

    def __init__(self, doc: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self._skip = 0
        self.feed(doc)
        self.close()

    BLOCKS = {"title", "div", "p", "h1", "h2", "h3", "li", "tr", "td", "th", "section", "header", "footer",
              "dt", "dd", "summary", "small", "button", "text"}

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._skip += tag in ("script", "style")
        if tag in self.BLOCKS:
            self.text.append(" ")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style")
        if tag in self.BLOCKS:
            self.text.append(" ")

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)

    def find(self, tag: str, cls: str | None = None) -> list[dict]:
        return [a for t, a in self.tags if t == tag and (cls is None or cls in (a.get("class") or "").split())]

    @property
    def plain(self) -> str:
        return " ".join("".join(self.text).split())


def test_page_parts():
    trace = report_trace()
    doc = render_html(trace)
    page = Page(doc)
    assert doc.startswith("<!DOCTYPE html>")
    title = re.search(r"<title>(.*?)</title>", doc).group(1)
    assert html.unescape(title).startswith("sage · A pen costs 3 dollars.")
    metas = page.find("meta")
    csp = next(m["content"] for m in metas if m.get("http-equiv") == "Content-Security-Policy")
    assert csp.startswith("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:")
    assert {"name": "referrer", "content": "no-referrer"} in metas
    # header, legend, both themes and the toggle
    assert "smollm2-135m" in page.plain and "2025-05-04 10:11" in page.plain
    assert page.find("ul", "legend") and "p ≥ 0.8" in page.plain and "< 0.2" in page.plain
    assert "prefers-color-scheme: dark" in doc and ":root[data-theme=dark]" in doc
    assert page.find("button") and page.find("button")[0]["id"] == "theme"
    # the answer with its trust: 6 of 8 samples from the problem reach 12
    assert "Answer 12 medium trust" in page.plain
    assert "6 of 8 samples from the problem alone reach it (75%" in page.plain
    assert "12 ×6 · 7 ×2 of 8 samples" in page.plain
    assert "How to read this page" in page.plain
    assert len(page.find("script")) == 1 and not any("src" in a for a in page.find("script"))


def test_one_span_per_word_with_its_alternatives():
    trace = report_trace()
    page = Page(render_html(trace))
    spans = [a for a in page.find("span", "w") if "data-tip" in a]
    words = chain_words(trace)
    # as the terminal streams them: a number keeps its '.', a word's '.' is a word of its own
    expected = re.findall(r"\d+(?:[.,]\d+)*[.,]?|[A-Za-z]+|\S", trace.text)
    assert [trace.text[c0:c1] for c0, c1, _ in words] == expected
    assert len(spans) == len(words) == 26
    by_text = {trace.text[c0:c1]: (a, toks) for (c0, c1, toks), a in zip(words, spans)}
    a, toks = by_text["times"]
    assert TINT_CLASS["tok.mild"] in a["class"].split() and "dec" in a["class"].split()  # p 0.62, the fork
    tip = json.loads(a["data-tip"])
    assert tip[0][0] == "' times'" and tip[0][1] == "0.62"
    assert ["' TIMES'", "0.27", 0.266, False] in tip[0][2]
    assert "alternatives ' TIMES' 0.27" in a["title"]
    assert "doubt" in by_text["answer"][0]["class"] and "unsure" in by_text["cost"][0]["class"]
    assert by_text["12."][0]["class"].split()[1] == "sure" and len(by_text["12."][1]) == 2  # ' 12', '.' 
    # one step block per step, in order
    assert [a["id"] for a in page.find("div", "step")] == ["step-1", "step-2", "step-3"]


def test_numbers_are_never_split():
    trace = report_trace(outcomes=False)
    text = "It costs 1,200.50 dollars."
    trace.text = text
    trace.tokens = [TokenRecord(i, p, -0.1, 0.1, 0.1, []) for i, p in
                    enumerate(["It", " costs", " 1", ",", "200", ".", "50", " dollars", "."])]
    trace.steps, trace.answer = [], None
    trace.analysis.decisions[0].token_index = 4  # "200", inside the number
    words = [text[c0:c1] for c0, c1, _ in chain_words(trace)]
    assert words == ["It", "costs", "1,200.50", "dollars", "."]
    page = Page(render_html(trace))
    assert "1,200.50①" in page.plain and "No answer" in page.plain


def test_a_fork_section_per_shown_decision_in_chain_order():
    trace = report_trace()
    first = trace.analysis.decisions[0]
    later = copy.deepcopy(first)
    answer = next(i for i, t in enumerate(trace.tokens) if t.text == " answer")
    later.rank, later.token_index, later.step, later.text = 3, answer, 2, " answer"
    trace.analysis.decisions.insert(0, later)  # listed first, comes later in the chain
    shown = shown_decisions(trace.analysis)
    assert [d.rank for d in shown] == [1, 3]
    page = Page(render_html(trace))
    forks = page.find("div", "fork")
    assert [f["id"] for f in forks] == ["fork-1", "fork-2"]
    text = page.plain
    assert text.index("① step 2") < text.index("③ step 3")
    assert "' times' p 0.62 as written → 12 ×7 · 7 ×1 of 8 samples" in text
    assert "' plus' p 0.21 instead → 7 ×6 · 12 ×2 of 8 samples" in text
    assert "fork score 0.62: the alternatives lead to other answers; a difference this large by chance alone: p = 0.01" in text
    assert "checked, not forks" in text and "'cost' in step 2 (fork 0.05)" in text
    assert text.index("times①") < text.index("answer③")  # markers in the chain, linking to the sections
    assert [a["href"] for a in page.find("a", "mark")] == ["#fork-1", "#fork-2"]


def test_unmeasured_proposals():
    trace = report_trace(outcomes=False)
    trace.analysis.decisions[0].branches = []  # proposed, never rolled out
    page = Page(render_html(trace))
    assert "Possible decision points" in page.plain
    assert "' times' p 0.62 · alternatives ' plus' 0.21 · ' x' 0.09 · ' and' 0.05 (not measured)" in page.plain
    assert "not sampled: this trace was made with --budget 0" in page.plain and not Page(render_html(trace)).find("svg")


def test_plot_has_a_point_per_sampled_position():
    trace = report_trace()
    trace.analysis.outcomes.steps[0] = None  # not sampled: the budget ran out
    doc = render_html(trace)
    page = Page(doc)
    assert len(page.find("svg")) == 1
    points = page.find("circle", "pt")
    assert [p["data-pos"] for p in points] == ["0", "2", "3"]  # the problem, steps 2 and 3
    assert "samples reaching 12" in page.plain and "problem" in page.plain
    ys = [float(p["cy"]) for p in points]
    assert ys[0] > ys[1] == ys[2]  # 75 % below 100 %
    assert len(page.find("line", "err")) == 3 * 3  # an error bar with two caps per point
    assert page.find("rect", "band") and "moved" in page.plain  # the answer moved over step 2
    assert page.find("rect", "forkbar")  # the fork's score at its step
    assert "from the problem: 6 of 8 samples reach 12 (75%; 90 % interval 46%–91%)" in page.plain
    # the line is dashed where it crosses the unsampled step 1, solid between steps 2 and 3
    curves = [c["class"] for c in page.find("polyline")]
    assert curves == ["curve gap", "curve"]


@pytest.mark.parametrize("case", ["no analysis", "no outcomes", "no steps", "no answer", "interrupted", "empty"])
def test_partial_traces(case):
    trace = report_trace()
    if case == "no analysis":
        trace.analysis = None
    elif case == "no outcomes":
        trace.analysis.outcomes = None
    elif case == "no steps":
        trace.steps = []
        trace.analysis.outcomes.steps = []
    elif case == "no answer":
        trace.answer.value = None
    elif case == "interrupted":
        trace.finish_reason = "interrupted"
        trace.answer = None
        trace.analysis = None
    else:
        trace.tokens, trace.text, trace.steps, trace.answer, trace.analysis = [], "", [], None, None
    doc = render_html(trace)
    page = Page(doc)
    assert not re.search(r"\bNone\b", doc) and "nan" not in page.plain.split()
    assert not re.search(r"(https?:)?//", doc)
    if case == "no analysis":
        assert "no inverse analysis" in page.plain and "--no-track" in page.plain and not page.find("svg")
    if case in ("no answer", "interrupted", "empty"):
        assert "No answer" in page.plain
    if case == "no answer":
        assert "the chain has no answer" in page.plain and not page.find("svg")
    if case == "interrupted":
        assert "interrupted" in page.plain
    if case == "no steps":
        assert len(page.find("circle", "pt")) == 1 and "no steps were segmented" in page.plain


def test_no_urls_and_no_none_anywhere():
    for trace in (report_trace(), report_trace(outcomes=False), make_trace(), make_trace(analysis=False)):
        doc = render_html(trace)
        assert not re.search(r"(https?:)?//", doc), re.search(r".{40}(https?:)?//.{40}", doc)
        assert not re.search(r"\bNone\b", doc)
        assert "url(" not in doc and "@import" not in doc and "src=" not in doc


HOSTILE = ['<script>alert(1)</script>', '"><img src=x onerror=alert(1)>', "</style>", "\x1b[31mred", "&amp;"]


def test_hostile_text_renders_as_text():
    trace = report_trace()
    trace.problem = " ".join(HOSTILE)
    trace.model.name = HOSTILE[1]
    trace.model.description = "</title><script>x()</script>"
    trace.tokens[3].text = HOSTILE[0]
    trace.text = "".join(t.text for t in trace.tokens)
    trace.tokens[5].top[1].text = HOSTILE[1]
    trace.analysis.decisions[0].alternatives[0].text = HOSTILE[2]
    trace.analysis.outcomes.start.answers[1].value = HOSTILE[1]
    trace.analysis.notes = [HOSTILE[3] + " \u202e" + HOSTILE[0]]
    trace.answer.value = HOSTILE[2]
    doc = render_html(trace)
    page = Page(doc)
    assert {t for t, _ in page.tags} <= {"html", "head", "meta", "title", "style", "body", "main", "header", "div",
                                         "h1", "h2", "h3", "p", "span", "button", "section", "small", "ul", "li",
                                         "b", "a", "i", "svg", "title", "line", "text", "rect", "circle", "polyline",
                                         "table", "tr", "td", "th", "details", "summary", "dl", "dt", "dd", "footer",
                                         "script"}
    assert len(page.find("script")) == 1 and not page.find("img")
    assert doc.count("</style>") == 1 and doc.count("</script>") == 1
    assert not any(k.startswith("on") for _, a in page.tags for k in a)
    assert "\x1b" not in doc and "\u202e" not in doc
    for s in (HOSTILE[0], HOSTILE[1], "␛[31mred", "\\u202e"):
        assert s in page.plain, s
    assert "sage · <script>alert(1)</script>" in html.unescape(re.search(r"<title>(.*?)</title>", doc).group(1))


def test_hostile_trace_in_a_data_attribute():
    trace = report_trace()
    trace.tokens[5].top[0].text = '"}]]\'><script>x()</script>'
    page = Page(render_html(trace))
    tip = next(a["data-tip"] for a in page.find("span", "w") if "x()" in a.get("data-tip", ""))
    assert "<script>x()</script>" in tip and len(page.find("script")) == 1


def _luminance(hex_colour: str) -> float:
    rgb = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a: str, b: str) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_colours_are_readable(theme):
    """Every text colour on the page background, the cards and (tints) its own highlight:
    WCAG AA, 4.5:1."""
    c = PALETTE[theme]
    for fg in ("fg", "muted", "accent", "good", "mild", "unsure", "doubt", "mark"):
        for bg in ("bg", "surface") + ((f"{fg}-bg",) if f"{fg}-bg" in c else ()):
            assert contrast(c[fg], c[bg]) >= 4.5, (theme, fg, bg, round(contrast(c[fg], c[bg]), 2))
    assert contrast(c["fg"], c["mark-bg"]) >= 4.5


def test_cli_writes_the_page(tmp_path):
    save_trace(report_trace(), Path(os.environ["SAGE_HOME"]))
    out = tmp_path / "report.html"
    r = run("--html", str(out))
    assert r.exit_code == 0, r.output
    assert "HTML written to" in r.stderr and str(out) in r.stderr.replace("\n", "")
    page = Page(out.read_text(encoding="utf-8"))
    assert page.find("span", "w") and page.find("svg") and "How to read this page" in page.plain
    assert not list(tmp_path.glob(".*.tmp"))


# --- in a browser -----------------------------------------------------------------------


def _browser() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("SAGE_BROWSER_TESTS") == "1":
            pytest.fail("SAGE_BROWSER_TESTS=1 but neither chromium nor chromium-browser is on PATH")
        pytest.skip("no chromium on PATH (apt-get install chromium; SAGE_BROWSER_TESTS=1 makes this fail)")
    return exe


def _chromium(exe: str, scheme: str, *args: str) -> subprocess.CompletedProcess:
    # blink's preferredColorScheme: 0 dark, 1 light
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             f"--blink-settings=preferredColorScheme={0 if scheme == 'dark' else 1}", *args]
    return subprocess.run(flags, capture_output=True, text=True, timeout=120)


@pytest.mark.browser
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_page_in_a_browser(tmp_path, scheme):
    exe = _browser()
    trace = report_trace()
    page = tmp_path / "report.html"
    page.write_text(render_html(trace), encoding="utf-8")
    r = _chromium(exe, scheme, "--dump-dom", page.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    root = re.search(r"<html[^>]*>", dom).group(0)
    assert 'data-ready="1"' in root, root  # the script ran to its end
    assert f'data-scheme="{scheme}"' in root, root  # and saw the theme the browser asked for
    assert f'data-words="{len(chain_words(trace))}"' in root
    assert '<div id="tip" role="tooltip" hidden=""' in dom  # the tooltip it built
    assert re.search(r'<button id="theme" type="button" aria-label="Switch to the \w+ theme">', dom)
    assert not re.search(r'<span class="w [^>]*title=', dom)  # the script's tooltip replaced the title

    shot = tmp_path / f"report-{scheme}.png"
    r = _chromium(exe, scheme, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("SAGE_SCREENSHOT_DIR"):
        dest = Path(os.environ["SAGE_SCREENSHOT_DIR"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / shot.name)

"""`sage explain --html`: a saved trace as a self-contained report page.

One HTML file a user can share: the problem, the answer with its trust, the chain tinted
per word (each word's tokens and their alternatives on hover or focus), the sampled
outcome curve as an inline SVG, each fork with where its alternatives lead, and how to
read it all. Inline CSS (report.css) and a small script (report.js) only; no URL of any
kind, and a Content-Security-Policy that lets nothing load even if a trace is hostile.

The content mirrors the terminal view of `sage ask` (ui/ask.py): the same words, tints,
markers, selection of forks and trust words. Every string from the trace goes through
`esc` (control characters made visible, then HTML-escaped); the script puts trace text
into the page with textContent only. Formatting only; the trace is read, never changed.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

from sage.cli.ui import TINTS, live_proposal, tint
from sage.cli.ui.ask import (
    CONTEXT_AFTER,
    CONTEXT_BEFORE,
    AskView,
    joins,
    marker,
    phase_line,
    shown_decisions,
    token_starts,
    word_span,
)
from sage.cli.ui.outcome import (OPEN_QUESTION, SCALE_CALIBRATED, SCALE_SAMPLES, TRUST, answer_value, calibrated_words,
                                 confidence_words, estimate, is_open, no_answer_reason, trust)
from sage.cli.ui.safe import token_label, untrusted
from sage.cli.ui.tree import shorten

CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:; "
       "base-uri 'none'; form-action 'none'")
TITLE_CHARS = 70  # of the problem in the page's <title>

# Colours per theme, as custom properties. Each tint and trust colour is text on the page
# background and on its own -bg; tests/test_report.py holds them to WCAG AA (4.5:1).
PALETTE = {
    "light": {
        "bg": "#f7f7f4", "surface": "#ffffff", "fg": "#1f2328", "muted": "#57606a", "border": "#dcdfe3",
        "track": "#e7e9ec", "shadow": "rgba(0,0,0,.14)",
        "accent": "#0a58b0", "accent-bg": "#e6effa",
        "good": "#1a7335", "good-bg": "#e1f3e6",
        "mild": "#7d5700", "mild-bg": "#fbefc4",
        "unsure": "#a63c00", "unsure-bg": "#fde4d3",
        "doubt": "#b0101c", "doubt-bg": "#fbe0e0",
        "mark": "#8a2bc2", "mark-bg": "#f1e4fa",
        "other": "#9aa2ab", "other2": "#c3c8ce", "none": "#e0b0b0",
    },
    "dark": {
        "bg": "#121417", "surface": "#1a1d21", "fg": "#e6e8eb", "muted": "#a2abb5", "border": "#30353c",
        "track": "#2a2f36", "shadow": "rgba(0,0,0,.5)",
        "accent": "#6fb1ff", "accent-bg": "#1b2d44",
        "good": "#5fd07f", "good-bg": "#18301f",
        "mild": "#f0c94e", "mild-bg": "#332b12",
        "unsure": "#ffa060", "unsure-bg": "#3a2415",
        "doubt": "#ff8080", "doubt-bg": "#3f1c1f",
        "mark": "#cf9fff", "mark-bg": "#2e2140",
        "other": "#6b737c", "other2": "#8d959e", "none": "#7a4f52",
    },
}
TINT_CLASS = {"tok.sure": "sure", "tok.mild": "mild", "tok.unsure": "unsure", "tok.doubt": "doubt"}
TRUST_CLASS = {"green": "good", "yellow": "mild", "dark_orange": "unsure", "bold red": "doubt"}

HOW_TO_READ = (
    ("Tint", "Each word is coloured by how sure the model was of it: the probability of its least certain "
             "token (plain ≥ 0.8, yellow ≥ 0.5, orange ≥ 0.2, red below). Hover over a word, or focus it "
             "with Tab, to see its tokens and the model's other likely choices. Sure words can still be "
             "wrong: the tint is the model's certainty, not correctness."),
    ("Dotted underline", "A possible fork as the chain was written: another token was nearly as likely. "
                         "The analysis then checks it."),
    ("Answer and trust", "sage asks the model the same problem again several times (samples) and counts how "
                         "often it reaches the answer. That share is the answer's trust: high ≥ 80 %, medium "
                         "≥ 50 %, low ≥ 20 %, very low below (probably wrong). The 90 % interval says how "
                         "rough the share is with that few samples."),
    ("The plot", "The same share, from the problem alone and from the chain cut after step 1, 2, …; the bars "
                 "are 90 % intervals. Where the share jumps, that step decided the answer (\u201canswer moved "
                 "here\u201d)."),
    ("Forks (①, ②)", "Words inside such a step where sage forced each alternative and let the model continue "
                      "many times. \u201cas written → 18 ×7 of 8 samples\u201d is where the chosen word leads, "
                      "\u201cinstead → …\u201d where an alternative leads. The fork score is 0 when they lead "
                      "to the same answers, 1 when to entirely different ones; p is how often a difference "
                      "this large comes from chance alone (small p: not chance)."),
    ("Possible decision points", "With --budget 0 (no sampling): proposed from attention and uncertainty, not "
                                 "measured; a guess, not evidence."),
)


def esc(s: object, multiline: bool = True) -> str:
    """Text from the trace, safe in HTML text and attribute values: control characters
    made visible (ui/safe.py), then escaped, quotes included."""
    return html.escape(untrusted(s, multiline), quote=True)


def _unit(x) -> float:
    """x clamped to [0, 1] (NaN: 0), for widths and positions."""
    return min(max(float(x), 0.0), 1.0) if x == x else 0.0


def _tok_prob(t) -> float:
    # a trace file may hold any number: exp of a positive logprob would overflow
    return math.exp(min(t.logprob, 0.0)) if t.logprob == t.logprob else float("nan")


def _meter(share: float, cls: str = "") -> str:
    return f'<span class="meter {cls}"><i style="width:{_unit(share) * 100:.1f}%"></i></span>'


def _wilson(k: int, n: int) -> tuple[float, float]:
    from sage.inverse.outcomes import wilson  # numpy: only where a share is shown

    return wilson(min(max(k, 0), n), n)


# --- the chain, word by word -------------------------------------------------------------


def chain_words(trace) -> list[tuple[int, int, list[int]]]:
    """The chain's words as the terminal streams them (AskView.token): (start, end, token
    indices), [start, end) the word in trace.text without the whitespace around it.
    Words of whitespace only are left out."""
    starts = token_starts(trace)
    out: list[tuple[int, int, list[int]]] = []
    cur: list[int] = []

    def flush() -> None:
        if not cur:
            return
        s = starts[cur[0]]
        word = "".join(trace.tokens[i].text for i in cur)
        core = word.strip()
        if core:
            c0 = s + len(word) - len(word.lstrip())
            out.append((c0, c0 + len(core), list(cur)))
        cur.clear()

    for i, t in enumerate(trace.tokens):
        if cur and not joins("".join(trace.tokens[j].text for j in cur), t.text):
            flush()
        cur.append(i)
        if not t.text[-1:].isalnum() and t.text not in (",", "."):
            flush()
    flush()
    return out


def _tip(trace, toks: list[int]) -> tuple[str, str]:
    """A word's tooltip: (JSON for the script, plain text for the title attribute)."""
    data, lines = [], []
    for i in toks:
        t = trace.tokens[i]
        p = _tok_prob(t)
        alts = [[token_label(a.text), f"{a.prob:.2f}", round(_unit(a.prob), 3), a.id == t.id] for a in t.top]
        data.append([token_label(t.text), f"{p:.2f}", alts])
        others = ", ".join(f"{a[0]} {a[1]}" for a in alts if not a[3])
        lines.append(f"{token_label(t.text)} p {p:.2f}" + (f"; alternatives {others}" if others else ""))
    return json.dumps(data, ensure_ascii=False), "\n".join(lines)


def _blocks(trace, words) -> list[list]:
    """The text cut into [start, end, step or None] blocks, in order, covering all of it:
    the steps and the text between them; a word is never cut by a block's end."""
    n = len(trace.text)
    blocks, pos = [], 0
    for s in sorted(trace.steps, key=lambda s: (s.char_start, s.char_end)):
        s0, s1 = max(s.char_start, pos), min(s.char_end, n)
        if s1 <= s0:
            continue
        if s0 > pos:
            blocks.append([pos, s0, None])
        blocks.append([s0, s1, s])
        pos = s1
    if pos < n:
        blocks.append([pos, n, None])
    b = 0
    for c0, c1, _ in words:
        while b < len(blocks) - 1 and c0 >= blocks[b][1]:
            b += 1
        if c1 > blocks[b][1]:  # a step that ends inside a word keeps the whole word
            blocks[b][1] = c1
            for nxt in blocks[b + 1 :]:
                nxt[0] = max(nxt[0], c1)
                nxt[1] = max(nxt[1], nxt[0])
    return [bl for bl in blocks if bl[1] > bl[0]]


def _chain(trace, shown: list) -> tuple[str, int]:
    """The chain as step blocks of tinted word spans, decisions marked; (html, words)."""
    text = trace.text
    if not text.strip():
        return '<p class="muted">the model wrote nothing</p>', 0
    matches = "".join(t.text for t in trace.tokens) == text
    words = chain_words(trace) if matches else []
    by_token = {i: w for w, (_, _, toks) in enumerate(words) for i in toks}
    marks: dict[int, list[str]] = {}  # word -> markers after it
    for pos, d in enumerate(shown):
        w = by_token.get(d.token_index)
        if w is None:  # a whitespace token: the next word carries the mark
            at = token_starts(trace)[d.token_index]
            w = next((j for j, (c0, _, _) in enumerate(words) if c0 >= at), None)
        if w is not None:
            marks.setdefault(w, []).append(
                f'<a class="mark" href="#fork-{pos + 1}" title="fork {esc(marker(d.rank))}: see below">'
                f"{esc(marker(d.rank))}</a>")
    an = trace.analysis
    oc = an.outcomes if an is not None else None
    value = trace.answer.value if trace.answer else None

    out, w = [], 0
    for b0, b1, step in _blocks(trace, words):
        parts, pos = [], b0
        while w < len(words) and words[w][0] < b1:
            c0, c1, toks = words[w]
            parts.append(esc(text[pos:c0]))
            probs = [_tok_prob(trace.tokens[i]) for i in toks]
            cls = ["w", TINT_CLASS[tint(min(probs))]]
            if any(live_proposal(trace.tokens[i]) for i in toks):
                cls.append("maybe")
            if w in marks:
                cls.append("dec")
            data, title = _tip(trace, toks)
            parts.append(f'<span class="{" ".join(cls)}" tabindex="0" data-tip="{esc(data)}" '
                         f'title="{esc(title)}">{esc(text[c0:c1])}</span>' + "".join(marks.get(w, [])))
            pos = c1
            w += 1
        parts.append(esc(text[pos:b1]))
        body = "".join(parts).strip()
        if not body:
            continue
        if step is None:
            out.append(f'<div class="step aside"><div class="num"></div><div class="text">{body}</div></div>')
            continue
        n = step.index + 1
        # "2. Four pens…" beside our own "2": the model's number is enough
        own = step.kind == "numbered" and step.text.lstrip().startswith((f"{n}.", f"{n})"))
        num = "" if own else f"<b>{n}</b>"
        moved = ""
        if (oc is not None and value is not None and 0 <= step.index < len(oc.steps)
                and oc.steps[step.index] is not None and oc.steps[step.index].n > 0):
            o = oc.steps[step.index]
            share = o.share_of(value)
            num += (f'<small class="share c-{TRUST_CLASS[trust(share)[2]]}" title="{o.count(value)} of {o.n} '
                    f'samples continued after step {n} reach {esc(value, False)}">{share:.0%}</small>')
            if step.index in oc.anchors:
                moved = " moved"
                num += '<small class="c-accent">moved</small>'
        out.append(f'<div class="step{moved}" id="step-{step.index + 1}"><div class="num">{num}</div>'
                   f'<div class="text">{body}</div></div>')
    if not trace.steps:
        out.append('<p class="caption">no steps were segmented from the output</p>')
    if not matches:
        out.append('<p class="caption">the trace\'s tokens do not add up to its text: shown without tints</p>')
    return "".join(out), len(words)


# --- outcome distributions and the plot ---------------------------------------------------


def _dist(o, mark: str | None, most: int = 4) -> str:
    """'18 ×7 · 12 ×1 of 8 samples' (mirrors outcome.dist_text), after a stacked bar."""
    if o is None or not o.n > 0:
        return '<span class="muted">not sampled</span>'
    items = [(a.value, a.n) for a in o.answers]
    if o.none:
        items.append((None, o.none))
    items.sort(key=lambda x: -x[1])
    total = max(o.n, sum(max(k, 0) for _, k in items), 1)
    segs, other = [], 0
    for v, k in items:
        if v is None:
            c = "c-none"
        elif v == mark:
            c = "c-answer"
        else:
            c, other = ("c-other", "c-other2")[other % 2], other + 1
        segs.append(f'<i class="{c}" style="width:{_unit(k / total) * 100:.1f}%" '
                    f'title="{esc(answer_value(v))}: {k} of {o.n}"></i>')
    words = []
    for v, k in items[:most]:
        if v is None:
            label = '<span class="muted">no answer</span>'
        elif v == mark:
            label = f'<b class="answer-of-chain">{esc(v, False)}</b>'
        else:
            label = f"<b>{esc(v, False)}</b>"
        words.append(f"{label} ×{k}")
    rest = sum(k for _, k in items[most:])
    if rest:
        words.append(f"others ×{rest}")
    text = " · ".join(words) + f' <span class="muted">of {o.n} sample{"s" if o.n != 1 else ""}</span>'
    return f'<span class="dist"><span class="stack">{"".join(segs)}</span><span>{text}</span></span>'


def _points(trace) -> list[tuple[str, object]]:
    """The sampled positions of the plot in chain order: ('problem' | step number, Outcome or None)."""
    oc = trace.analysis.outcomes
    return [("the problem", oc.start)] + [(f"step {i + 1}", o) for i, o in enumerate(oc.steps)]


def _plot(trace, shown: list) -> str:
    """The share of samples reaching the chain's answer from the problem and after each
    step, with 90 % Wilson intervals, as an inline SVG; the forks' scores at their steps."""
    value = trace.answer.value if trace.answer else None
    pts = _points(trace)
    width, height = 760, 300
    left, right, top, bottom = 62, 18, 30, 56
    pw, ph = width - left - right, height - top - bottom
    n = len(pts)

    def x(i: int) -> float:
        return left + (pw / 2 if n == 1 else i * pw / (n - 1))

    def y(v: float) -> float:
        return top + (1 - _unit(v)) * ph

    svg = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-labelledby="plot-title">',
           f'<title id="plot-title">how often the model reaches {esc(answer_value(value), False)} when '
           "continued from the problem and after each step</title>"]
    oc = trace.analysis.outcomes
    for a in oc.anchors:
        if 0 <= a < len(oc.steps):
            cx, half = x(a + 1), max(10.0, pw / max(n - 1, 1) / 2)
            svg.append(f'<rect class="band" x="{cx - half:.1f}" y="{top}" width="{2 * half:.1f}" height="{ph}">'
                       f"<title>the answer moved over step {a + 1}</title></rect>")
            svg.append(f'<text class="bandlabel" x="{cx:.1f}" y="{top - 8}" text-anchor="middle">moved</text>')
    for v in (0, 0.25, 0.5, 0.75, 1):
        svg.append(f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>')
        svg.append(f'<text x="{left - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0%}</text>')
    svg.append(f'<line class="axis" x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}"/>')
    svg.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}"/>')
    every = max(1, math.ceil(n / 16))  # at most ~16 labels under the axis
    for i, (label, _) in enumerate(pts):
        if i % every == 0 or i == n - 1:
            short = "problem" if i == 0 else str(i)
            svg.append(f'<text x="{x(i):.1f}" y="{top + ph + 18}" text-anchor="middle">{short}</text>')
    svg.append(f'<text x="{left + pw / 2:.1f}" y="{height - 8}" text-anchor="middle">'
               "continued from: the problem alone, then the chain cut after step 1, 2, …</text>")
    svg.append(f'<text x="14" y="{top + ph / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2:.1f})">samples reaching {esc(answer_value(value), False)}</text>')

    # the forks' scores as bars from the axis at their step (the plot's scale: 0 to 1)
    steps_of = {}
    for d in shown:
        if d.fork is not None and 0 <= d.step < len(oc.steps):
            steps_of.setdefault(d.step, []).append(d)
    for s, ds in steps_of.items():
        for j, d in enumerate(ds):
            bx = x(s + 1) + 9 + 9 * j
            svg.append(f'<rect class="forkbar" x="{bx:.1f}" y="{y(d.fork):.1f}" width="6" '
                       f'height="{top + ph - y(d.fork):.1f}"><title>fork {esc(marker(d.rank))} in step {s + 1}: '
                       f"fork score {d.fork:.2f}</title></rect>")
            svg.append(f'<text class="fork" x="{bx + 3:.1f}" y="{y(d.fork) - 4:.1f}" text-anchor="middle">'
                       f"{esc(marker(d.rank))}</text>")

    line, dots = [], []
    for i, (label, o) in enumerate(pts):
        if o is None or not o.n > 0:
            svg.append(f'<text class="missing" x="{x(i):.1f}" y="{top + ph - 6}" text-anchor="middle">–'
                       f"<title>{label}: not sampled (budget)</title></text>")
            continue
        k = min(max(o.count(value), 0), o.n)
        share = k / o.n
        lo, hi = _wilson(k, o.n)
        cx = x(i)
        line.append((i, f"{cx:.1f},{y(share):.1f}"))
        word = TRUST_CLASS[trust(share)[2]]
        tip = (f"from {label}: {k} of {o.n} samples reach {answer_value(value)} "
               f"({share:.0%}; 90 % interval {lo:.0%}–{hi:.0%})")
        dots.append(f'<line class="err" x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(lo):.1f}" y2="{y(hi):.1f}"/>'
                    f'<line class="err" x1="{cx - 4:.1f}" x2="{cx + 4:.1f}" y1="{y(lo):.1f}" y2="{y(lo):.1f}"/>'
                    f'<line class="err" x1="{cx - 4:.1f}" x2="{cx + 4:.1f}" y1="{y(hi):.1f}" y2="{y(hi):.1f}"/>'
                    f'<circle class="pt {word}" data-pos="{i}" cx="{cx:.1f}" cy="{y(share):.1f}" r="5">'
                    f"<title>{esc(tip, False)}</title></circle>")
        if n <= 16:  # beside the point, below it near the top (the band's label is above)
            ly = y(share) + (17 if share > 0.9 else -7)
            dots.append(f'<text class="ptlabel" x="{cx + 7:.1f}" y="{ly:.1f}">{share:.0%}</text>')
    # solid between neighbouring points; dashed across points that were not sampled (the
    # line there is no measurement)
    for (i, a), (j, b) in zip(line, line[1:]):
        svg.append(f'<polyline class="curve{" gap" if j > i + 1 else ""}" points="{a} {b}"/>')
    svg += dots
    svg.append("</svg>")
    return "".join(svg)


def _outcome_section(trace, shown: list) -> str:
    an = trace.analysis
    if an is None:
        return ""
    head = ('<section class="card plot" id="outcome"><h2>Where the chain\'s answer was decided'
            '<small>samples continued from each point</small></h2>')
    oc = an.outcomes
    if oc is None and is_open(trace):
        return (head + '<p class="muted">not sampled: an open question has no short answer (a number or an option '
                "letter) to compare across samples, so there is no outcome curve; the decision points below are "
                "proposals.</p></section>")
    if oc is None:
        return (head + '<p class="muted">not sampled: this trace was made with --budget 0 (or without sampling), '
                "so there is no outcome curve; the decision points below are proposals.</p></section>")
    value = trace.answer.value if trace.answer else None
    if value is None:
        body = ('<p class="muted">the chain has no answer, so there is no share of it to follow; the table lists '
                "what the samples answered.</p>")
    else:
        body = _plot(trace, shown)
        body += (f'<p class="caption">each point: the share of samples that reach {esc(value, False)} when the model '
                 "continues from there (bars: 90 % intervals; – not sampled within the budget)"
                 + ("; purple bars: the forks' scores, 0 to 1 on the same scale" if any(d.fork is not None for d in shown) else "")
                 + ". Hover a point for its counts.</p>")
    rows = []
    for i, (label, o) in enumerate(_points(trace)):
        moved = ""
        if i and (i - 1) in oc.anchors:
            moved = ' <b class="c-accent">answer moved here</b>'
        rows.append(f"<tr><td>{label}{moved}</td><td>{_dist(o, value, most=4)}</td></tr>")
    body += ('<details><summary>answers when continued from each point</summary><table class="dists">'
             '<tr><th>continued from</th><th>answers of the samples</th></tr>' + "".join(rows) + "</table>"
             f'<p class="caption">{oc.spent} of {oc.budget} tokens sampled, {oc.parallel} sequences at a time; '
             f"{esc(oc.rule)}</p></details>")
    return head + body + "</section>"


# --- forks -------------------------------------------------------------------------------


def _context(trace, k: int, mark: str) -> str:
    """The chain around token k, its word highlighted and followed by `mark` (AskView.context)."""
    text = trace.text
    start = min(token_starts(trace)[k], len(text))
    a0, a1 = word_span(text, start, min(start + len(trace.tokens[k].text), len(text)))
    while a0 < a1 and text[a0].isspace():
        a0 += 1
    b0, b1 = max(0, a0 - CONTEXT_BEFORE), min(len(text), a1 + CONTEXT_AFTER)

    def flat(s: str) -> str:
        return " ".join(s.split()) if s.strip() else (" " if s else "")

    before, after = text[b0:a0], text[a1:b1]
    # start and end at a word boundary, not in the middle of one
    cut = re.match(r"\S+(?=\s)", before) if b0 > 0 and not text[b0 - 1].isspace() else None
    before = before[cut.end() :] if cut else before
    cut = re.search(r"(?<=\s)\S+$", after) if b1 < len(text) and not text[b1].isspace() else None
    after = after[: cut.start()] if cut else after
    word = text[a0:a1] or trace.tokens[k].text
    return ("…" if b0 > 0 else "") + esc(flat(before) + (" " if before[-1:].isspace() else ""), False) + \
        f'<span class="here">{esc(word, False)}</span><span class="mark">{esc(mark)}</span>' + \
        esc((" " if after[:1].isspace() else "") + flat(after), False) + ("…" if b1 < len(text) else "")


def _p(p: float) -> str:
    return f'<td class="p c-{TINT_CLASS[tint(p)]}">p {p:.2f}</td>'


def _fork(trace, d, pos: int) -> str:
    """One decision (mirrors AskView.fork_block)."""
    m = esc(marker(d.rank))
    value = trace.answer.value if trace.answer else None
    head = (f'<div class="fork" id="fork-{pos}"><h3><span class="mark">{m}</span> <span>step {d.step + 1}</span>'
            + (f' <span class="muted">fork score {d.fork:.2f}</span>' if d.fork is not None else "")
            + f'</h3><p class="ctx">{_context(trace, d.token_index, marker(d.rank))}</p>')
    sampled = d.outcome is not None
    if not sampled and not any(b.outcome is not None or b.answer is not None for b in d.branches):
        alts = " · ".join(f'<span class="tok">{esc(token_label(a.text))}</span> '
                          f'<span class="c-{TINT_CLASS[tint(a.prob)]}">{a.prob:.2f}</span>' for a in d.alternatives[:3])
        return (head + f'<p><b class="tok">{esc(token_label(d.text))}</b> '
                f'<span class="c-{TINT_CLASS[tint(d.prob)]}">p {d.prob:.2f}</span>'
                + (f' <span class="muted">· alternatives</span> {alts}' if alts else "")
                + ' <span class="muted">(not measured)</span></p></div>')
    rows = [f'<tr class="chosen"><td class="tok">{esc(token_label(d.text))}</td>{_p(d.prob)}'
            f'<td class="how">as written →</td><td>'
            + (_dist(d.outcome, value) if sampled else '<span class="muted">the chain</span>') + "</td></tr>"]
    rolled = {b.token_id: b for b in d.branches}
    for alt in d.alternatives[: max(len(d.branches), 2)]:
        b = rolled.get(alt.id)
        if b is not None and b.outcome is not None:
            lead = _dist(b.outcome, value)
        elif b is not None:
            lead = f'<span class="muted">one greedy continuation answers {esc(answer_value(b.answer))}</span>'
        else:
            lead = '<span class="muted">not measured</span>'
        rows.append(f'<tr><td class="tok">{esc(token_label(alt.text))}</td>{_p(alt.prob)}'
                    f'<td class="how">instead →</td><td>{lead}</td></tr>')
    body = head + '<table class="alts">' + "".join(rows) + "</table>"
    if d.fork is not None:
        words = ("the alternatives lead to other answers" if d.fork >= 0.6 else
                 "the alternatives often lead elsewhere" if d.fork >= 0.3 else
                 "the alternatives mostly lead to the same answers")
        body += (f'<p class="verdict">{_meter(d.fork)} fork score <b>{d.fork:.2f}</b>: {words}'
                 + (f'<span class="muted">; a difference this large by chance alone: p = {d.fork_p:.2f}</span>'
                    if d.fork_p is not None else "") + "</p>")
    return body + "</div>"


def _forks_section(trace, shown: list) -> str:
    an = trace.analysis
    if an is None:
        return ('<section class="card" id="forks"><h2>Forks</h2><p class="muted">this trace has no inverse '
                "analysis (it was made with --no-track)</p></section>")
    sampled = an.outcomes is not None
    if sampled:
        out = ['<section class="card" id="forks"><h2>Forks<small>where the reasoning could have gone another '
               "way: the chosen word and its alternatives, each continued many times by the model</small></h2>"]
        if not shown:
            out.append(f'<p class="muted">none found: {esc(AskView.no_forks_reason(an))}</p>')
    else:
        why = ("an open question has no short answer to compare across samples" if is_open(trace)
               else "--budget 0 or no sampling")
        out = ['<section class="card" id="forks"><h2>Possible decision points<small>proposed from attention and '
               f"uncertainty, not measured ({why}): a guess, not evidence</small></h2>"]
        if not shown:
            out.append('<p class="muted">none proposed</p>')
    out += [_fork(trace, d, i + 1) for i, d in enumerate(shown)]
    cleared = sorted((d for d in an.decisions if sampled and not d.confirmed and d.fork is not None),
                     key=lambda d: d.token_index)
    if cleared:
        out.append('<p class="cleared">checked, not forks (their alternatives lead to the same answers): '
                   + ", ".join(f'<span class="tok">{esc(token_label(d.text.strip() or d.text))}</span> in step '
                               f"{d.step + 1} (fork {d.fork:.2f})" for d in cleared) + "</p>")
    return "".join(out) + "</section>"


# --- the page ----------------------------------------------------------------------------


def _answer(trace) -> str:
    """The answer with its trust in words (mirrors AskView.answer_panel)."""
    a = trace.answer
    an = trace.analysis
    oc = an.outcomes if an is not None else None
    start = oc.start if oc is not None and oc.start is not None and oc.start.n > 0 else None
    note = a.note if a is not None else None
    if is_open(trace):
        main = (f'<div><div class="noanswer">No short answer to check</div>'
                f'<p class="muted">{esc(OPEN_QUESTION, False)}</p></div>')
        about = ""
    elif a is None or a.value is None:
        why = no_answer_reason(trace)
        main = f'<div><div class="noanswer">No answer</div><p class="muted">{esc(why, False)}</p></div>'
        about = ""
    elif start is not None and estimate(trace) is not None:
        p, calibrated = estimate(trace)
        k, n = min(max(start.count(a.value), 0), start.n), start.n
        lo, hi = _wilson(k, n)
        word, meaning, style = trust(p)
        cls = TRUST_CLASS[style]
        main = (f'<div><div class="label">Answer</div><div class="value c-{cls}">{esc(a.value, False)}</div></div>'
                f'<div><div class="trust c-{cls}">{word} trust</div>{_meter(p, "c-" + cls)}</div>')
        about = f'<p class="calibrated">{esc(calibrated_words(an).plain, False)}</p>' if calibrated else ""
        about += f"<p>{esc(confidence_words(k / n, k, n, lo, hi, word=False, meaning=not calibrated).plain, False)}</p>"
    else:
        main = (f'<div><div class="label">Answer</div><div class="value">{esc(a.value, False)}</div></div>'
                '<div class="muted">not checked by sampling</div>')
        about = ""
        if a.confidence is not None:
            about = (f'<p class="muted">the model wrote it with probability {a.confidence:.2f}: how sure it was of '
                     "those words, not whether the answer is right</p>")
    if a is not None and a.value is not None and note:
        about += f'<p class="c-unsure">note: {esc(note, False)}</p>'
    if start is not None:
        about += (f'<p><span class="muted">answers from the problem alone:</span> '
                  f"{_dist(start, a.value if a else None)}</p>")
    if start is not None and a is not None and a.value is not None:
        scale = " · ".join(
            f'<span class="c-{TRUST_CLASS[style]}">{w} ≥ {least:.0%}</span>' if least > 0 else
            f'<span class="c-{TRUST_CLASS[style]}">{w} &lt; {TRUST[i - 1][0]:.0%}</span>'
            for i, (least, w, _, style) in enumerate(TRUST))
        est = estimate(trace)
        what = SCALE_CALIBRATED if est is not None and est[1] else SCALE_SAMPLES
        about += f'<p class="caption">trust scale ({esc(what, False)}): {scale}</p>'
    return (f'<section class="card" id="answer"><div class="answer">{main}'
            f'<div class="about">{about}</div></div></section>')


def _legend(trace) -> str:
    samples = {"sure": "p ≥ 0.8", "mild": "≥ 0.5", "unsure": "≥ 0.2", "doubt": "< 0.2"}
    chips = "".join(f'<li><span class="w {TINT_CLASS[style]}">{samples[TINT_CLASS[style]]}</span></li>'
                    for _, style in TINTS)
    an = trace.analysis
    value = trace.answer.value if trace.answer else None
    share = ""
    if an is not None and an.outcomes is not None and value is not None:
        share = (f'<li><small class="share">62%</small> beside a step: samples continued after it that reach '
                 f"{esc(value, False)}</li>")
    return ('<ul class="legend" aria-label="legend"><li>each word tinted by the model\'s certainty:</li>'
            f'{chips}<li><span class="w maybe">word</span> possible fork</li>'
            '<li><span class="mark">①</span> fork, listed below</li>'
            f"{share}<li>hover or Tab: a word's alternatives</li></ul>")


def _header(trace) -> str:
    facts = [f"model {esc(trace.model.name, False)}"]
    if trace.model.description:
        facts.append(esc(trace.model.description, False))
    facts.append(f"{len(trace.tokens)} tokens")
    if trace.created:  # "2025-05-04T10:11:12+0000" -> "2025-05-04 10:11"
        facts.append(esc(trace.created[:16].replace("T", " "), False))
    banner = ""
    if trace.finish_reason == "interrupted":
        banner = '<p class="banner">This run was interrupted: the chain and its analysis are partial.</p>'
    elif trace.finish_reason in ("length", "context"):
        banner = ('<p class="banner">The chain was cut off ('
                  + ("--max-tokens" if trace.finish_reason == "length" else "the context was full") + ").</p>")
    return ('<header class="top"><div><div class="brand">sage · reasoning report</div>'
            f'<h1>{esc(trace.problem.strip())}</h1><p class="facts">'
            + "".join(f"<span>{f}</span>" for f in facts)
            + '</p></div><button id="theme" type="button" hidden>Theme</button></header>' + banner)


def _explanation(trace) -> str:
    """The analysis' explanation (its four parts) and notes, as `sage ask -v` shows them."""
    an = trace.analysis
    if an is None:
        return ""
    e = an.explanation
    parts = [(title, lines) for title, lines in (
        ("Why these forks", e.justification), ("Alternatives", e.alternatives),
        ("Confidence", e.confidence), ("What the steps drew on", e.dependencies), ("Notes", an.notes)) if lines]
    if not parts:
        return ""
    body = "".join(f'<h3>{title}</h3><ul class="notes">' + "".join(f"<li>{esc(x)}</li>" for x in lines) + "</ul>"
                   for title, lines in parts)
    return f'<section class="card explanation" id="explanation"><h2>Explanation</h2>{body}</section>'


def _howto() -> str:
    items = "".join(f"<dt>{esc(t)}</dt><dd>{esc(d)}</dd>" for t, d in HOW_TO_READ)
    return f'<section class="card howto" id="how-to-read"><h2>How to read this page</h2><dl>{items}</dl></section>'


def _theme_css() -> str:
    def props(theme: str) -> str:
        return "".join(f"--{k}:{v};" for k, v in PALETTE[theme].items()) + f"color-scheme:{theme};"

    tints = "".join(f".c-{c}{{color:var(--{c})}}" for c in ("good", "mild", "unsure", "doubt", "accent"))
    return (f":root{{{props('light')}}}:root[data-theme=dark]{{{props('dark')}}}"
            f"@media (prefers-color-scheme: dark){{:root:not([data-theme=light]){{{props('dark')}}}}}{tints}")


def _asset(name: str) -> str:
    return (Path(__file__).with_name(name)).read_text(encoding="utf-8")


def render_html(trace) -> str:
    """The trace as one self-contained HTML page (no network: styles and script inline)."""
    an = trace.analysis
    shown = shown_decisions(an)
    chain, n_words = _chain(trace, shown)
    title = esc(f"sage · {shorten(trace.problem, TITLE_CHARS)}", False)
    foot = phase_line(trace).plain
    if trace.sage_version:
        foot += f" · sage {trace.sage_version}"
    return "".join((
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="color-scheme" content="light dark">',
        '<meta name="generator" content="sage explain --html">',
        f"<title>{title}</title>",
        f"<style>{_theme_css()}\n{_asset('report.css')}</style></head>",
        "<body><main>",
        _header(trace),
        _answer(trace),
        f'<section class="card" id="chain"><h2>The chain<small>{n_words} words, '
        f'{len(trace.steps)} step{"s" if len(trace.steps) != 1 else ""}</small></h2>',
        _legend(trace),
        f'<div class="chain">{chain}</div></section>',
        _outcome_section(trace, shown),
        _forks_section(trace, shown),
        _explanation(trace),
        _howto(),
        f"<footer>{esc(foot, False)}</footer>",
        f"</main><script>{_asset('report.js')}</script></body></html>\n",
    ))

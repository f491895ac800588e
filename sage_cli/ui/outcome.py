"""How sampled outcome distributions are written in the views (terminal, tree, export).

The trust scale is defined here once: the share of samples, drawn from the model on the
problem alone, that reach the answer.
"""

from __future__ import annotations

from rich.text import Text

from sage.cli.ui.safe import untrusted

# (least share, word, what it means, style), most trusted first
TRUST = (
    (0.8, "high", "the model reaches this answer nearly every time", "green"),
    (0.5, "medium", "the model's most common answer, but not a sure one", "yellow"),
    (0.2, "low", "the model often answers something else", "dark_orange"),
    (0.0, "very low", "probably wrong: the model rarely reaches it", "bold red"),
)
FEW = 8  # fewer samples than this: the words say so


def trust(share: float) -> tuple[str, str, str]:
    """(word, meaning, style) of a share on the trust scale."""
    for least, word, meaning, style in TRUST:
        if share >= least:
            return word, meaning, style
    return TRUST[-1][1:]


SCALE_SAMPLES = "share of samples from the problem alone that reach the answer"
SCALE_CALIBRATED = ("the trained heads' estimate of the chance the answer is right, calibrated on held-out "
                    "answers")


def scale_line(calibrated: bool = False) -> Text:
    t = Text(f"trust scale ({SCALE_CALIBRATED if calibrated else SCALE_SAMPLES}): ", style="dim")
    for i, (least, word, _, style) in enumerate(TRUST):
        if i:
            t.append(" · ", style="dim")
        t.append(f"{word} ≥ {least:.0%}" if least > 0 else f"{word} < {TRUST[i - 1][0]:.0%}", style=style)
    return t


def answer_value(value: str | None) -> str:
    return "no answer" if value is None else untrusted(value, False)


def dist_text(o, mark: str | None = None, most: int = 4) -> Text:
    """'20 ×3 · 24 ×1 of 4 samples'; `mark` (an answer) in bold."""
    t = Text()
    if o is None or not o.n:
        return Text("not sampled", style="dim")
    items = [(a.value, a.n) for a in o.answers]
    if o.none:
        items.append((None, o.none))
    items.sort(key=lambda x: -x[1])
    for i, (v, n) in enumerate(items[:most]):
        if i:
            t.append(" · ", style="dim")
        t.append(answer_value(v), style="bold" if v == mark and v is not None else ("dim" if v is None else ""))
        t.append(f" ×{n}", style="dim")
    rest = sum(n for _, n in items[most:])
    if rest:
        t.append(f" · others ×{rest}", style="dim")
    t.append(f" of {o.n} sample{'s' if o.n != 1 else ''}", style="dim")
    return t


def confidence_words(share: float, k: int, n: int, lo: float, hi: float, word: bool = True,
                     meaning: bool = True) -> Text:
    """'medium trust: 9 of 12 samples (75 %, 90 % interval 52–89 %) reach it'; without
    the trust word where it is shown beside the answer already, without its meaning where
    the trust rests on a calibrated estimate instead."""
    name, what, style = trust(share)
    t = Text.assemble((f"{name} trust: ", style)) if word else Text()
    t.append(f"{k} of {n} samples from the problem alone reach it ({share:.0%}; 90 % interval {lo:.0%}–{hi:.0%})")
    if meaning:
        t.append(f" — {what}", style="dim")
    if n < FEW:
        t.append(f"; only {n} samples, so the share is rough", style="dim")
    return t


OPEN_QUESTION = ("the question asks for an explanation, not a number or an option letter: sage cannot count how "
                 "often the model reaches it, so it cannot say how far to trust it. The tint shows where the model "
                 "was unsure of its words.")


def is_open(trace) -> bool:
    """A question without a short answer (`sage.steps.problem_kind` "open")."""
    return trace.answer is not None and trace.answer.expected == "open"


def no_answer_reason(trace) -> str:
    """Why a chain has no answer, in words (the answer's own note first)."""
    a = trace.answer
    note = a.note if a is not None else None
    if note:
        return note
    an = trace.analysis
    sampled = an is not None and an.outcomes is not None
    return {
        "length": f"the chain was cut off at {len(trace.tokens)} tokens (-n/--max-tokens) before it stated an answer"
                  + ("; the samples stop at the same limit" if sampled else ""),
        "context": "the chain filled the context (--ctx-size) before it stated an answer",
        "interrupted": "the chain was interrupted before it stated an answer",
    }.get(trace.finish_reason, "no final answer found in the output")


def estimate(trace) -> tuple[float, bool] | None:
    """(the chance the answer is right that its trust word rests on, whether it is the
    trained heads' calibrated estimate): the meta-cognitive head's estimate where the
    analysis has one, else the share of samples from the problem alone that reach the
    answer; None without an answer or samples."""
    a, an = trace.answer, trace.analysis
    if a is None or a.value is None or an is None:
        return None
    if getattr(an, "calibration", None) is not None and an.answer_confidence is not None:
        return min(max(float(an.answer_confidence), 0.0), 1.0), True
    oc = an.outcomes
    if oc is not None and oc.start is not None and oc.start.n > 0:
        return min(max(oc.start.count(a.value), 0), oc.start.n) / oc.start.n, False
    return None


def calibrated_words(an) -> Text:
    """'the trained heads put the chance it is right at 64 % (…); on 280 held-out answers
    (170 right) their estimates were off by 4 points on average (ECE 0.04)' — what the
    estimate is, and how far it held up when the heads were trained."""
    p = min(max(float(an.answer_confidence), 0.0), 1.0)
    cal = an.calibration or {}
    t = Text(f"the trained heads put the chance it is right at {p:.0%}", style="bold")
    ece, n, right = cal.get("ece"), cal.get("answers"), cal.get("right")
    # (traces from before "chain" was recorded: their heads read both)
    t.append(" (from the samples below" + ("" if cal.get("chain") == 0 else " and the chain's own uncertainty") + ")",
             style="dim")
    if isinstance(ece, (int, float)) and isinstance(n, (int, float)) and n > 0:
        t.append(f"; on {n:.0f} held-out answers" + (f" ({right:.0f} right)" if isinstance(right, (int, float)) else "")
                 + f" such estimates were off by {100 * ece:.0f} points on average (ECE {ece:.2f})", style="dim")
        if n < 100:
            t.append(", a rough check: few answers", style="dim")
    else:
        t.append("; how well it is calibrated was not measured", style="dim")
    return t

"""Rich view of `sage explain`: a saved trace as a tree.

Root: the problem. Children: the steps along the chosen path; under a step that holds a
decision point, the decision and one node per alternative (rolled-out ones with their
continuation and where it led). Last: the answer. Formatting only; the trace is read,
never changed.
"""

from __future__ import annotations

import io

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from rich.theme import Theme
from rich.tree import Tree

from sage.cli.ui import THEME, bar, console, tint
from sage.cli.ui.outcome import (OPEN_QUESTION, calibrated_words, confidence_words, dist_text, estimate, is_open,
                                 no_answer_reason, trust)
from sage.cli.ui.safe import text as safe_text, token_label, untrusted

# styles this view needs beyond ui.THEME; pushed on top of it while printing
TREE_THEME = Theme(
    {
        "tree.decision": "bold magenta",
        "tree.same": "green",
        "tree.changed": "bold red",
        "tree.guide": "dim",
    }
)

STEP_CHARS = 160  # a step longer than this is shortened in the middle of the tree
BRANCH_CHARS = 90  # continuation text of a rolled-out alternative
EXPORT_WIDTH = 100  # columns of the SVG/HTML export, whatever the terminal is


def shorten(text: str, limit: int) -> str:
    """One line: whitespace collapsed, cut at a word boundary with '…' past `limit`."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    cut = flat[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


# Labels start from an unstyled Text and append styled parts: a style given to the first
# part (Text("x", style=...) + ...) would become the base style of the whole label.


def _prob(label: str, p: float) -> Text:
    return Text.assemble((f"{label}={p:.2f}", tint(p)))


def _meter(value: float, width: int = 8) -> Text:
    return Text.assemble(bar(value, width), (f" {value:.2f}", tint(value)))


def _step_text(step) -> str:
    text = shorten(step.text, STEP_CHARS)
    # "2. Four pens…" under our own "2": drop the model's number when it is the same
    for mark in (f"{step.index + 1}. ", f"{step.index + 1}) "):
        if step.kind == "numbered" and text.startswith(mark):
            return text[len(mark) :]
    return text


def _step_node(step, number_width: int) -> Table:
    # a grid, so a long step wraps under its own text, not under the number
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(ratio=1)
    head = Text.assemble((f"{step.index + 1:>{number_width}} ", "dim"), _meter(step.confidence))
    grid.add_row(head, safe_text(_step_text(step)))
    return grid


def _decision_label(d) -> Text:
    t = Text.assemble(("decision ", "tree.decision"))
    t.append(token_label(d.text), style="bold")
    t.append(" ")
    t.append_text(_prob("p", d.prob))
    if d.fork is not None:
        t.append(f", fork score {d.fork:.2f}")
        if d.fork_p is not None:
            t.append(f" (chance alone p={d.fork_p:.2f})", style="dim")
        t.append("  a fork" if d.confirmed else "  not a fork", style="tree.changed" if d.confirmed else "dim")
        if d.outcome is not None:
            t.append("\nas written: ", style="dim")
            t.append_text(dist_text(d.outcome))
        return t
    t.append(f", significance {d.significance:.2f}")
    facts = [f"rank {d.rank}"]
    if len(d.dependents) == 1:
        facts.append(f"step {d.dependents[0] + 1} depends on it")
    elif d.dependents:
        facts.append(f"steps {', '.join(str(i + 1) for i in d.dependents)} depend on it")
    t.append("  " + " · ".join(facts), style="dim")
    return t


def _branch_label(b) -> Text:
    t = Text.assemble((token_label(b.token_text), "bold"), " ")
    t.append_text(_prob("p", b.prob))
    t.append("  → ")
    if b.outcome is not None:
        t.append_text(dist_text(b.outcome))
        t.append("\ne.g. ", style="dim")
        lead = "…" + (" " if b.text[:1].isspace() else "")
        t.append(lead + untrusted(shorten(b.text, BRANCH_CHARS)), style="dim italic")
        return t
    if b.changed:
        t.append(f"different answer: {untrusted(b.answer) if b.answer is not None else 'none found'}", style="tree.changed")
    else:
        t.append("same answer", style="tree.same")
    if b.finish_reason != "stop":
        t.append(f"  (stopped: {b.finish_reason})", style="dim")
    t.append("\n")
    # the rollout continues the step mid-sentence, from the forced token on
    lead = "…" + (" " if b.text[:1].isspace() else "")
    t.append(lead + untrusted(shorten(b.text, BRANCH_CHARS)), style="dim italic")
    return t


def _unrolled_label(alternatives, sampled: bool = False) -> Text:
    t = Text.assemble(("not sampled: " if sampled else "not rolled out: ", "dim"))
    for i, a in enumerate(alternatives):
        if i:
            t.append(" · ", style="dim")
        t.append(token_label(a.text))
        t.append(f" {a.prob:.2f}", style=tint(a.prob))
    return t


def _add_decision(parent: Tree, d) -> None:
    node = parent.add(_decision_label(d), guide_style="tree.guide")
    rolled = {b.token_id for b in d.branches}
    for b in d.branches:
        node.add(_branch_label(b))
    rest = [a for a in d.alternatives if a.id not in rolled]
    if rest:
        node.add(_unrolled_label(rest, d.outcome is not None))


def _answer_label(trace) -> Text:
    a = trace.answer
    if is_open(trace):
        return Text("no short answer to check: " + OPEN_QUESTION, style="dim")
    if a is None or a.value is None:
        return Text("no answer: " + untrusted(no_answer_reason(trace), False), style="warn")
    t = Text.assemble(("Answer ", "bold"), (untrusted(a.value, False), "answer"))
    if a.note:
        t.append("\nnote: " + untrusted(a.note, False), style="warn")
    an = trace.analysis
    oc = an.outcomes if an is not None else None
    est = estimate(trace)
    if oc is not None and oc.start is not None and est is not None:
        from sage.inverse.outcomes import wilson

        p, calibrated = est
        k, n = oc.start.count(a.value), oc.start.n
        lo, hi = wilson(k, n)
        word, _, style = trust(p)
        t.stylize(style, len("Answer "), len("Answer ") + len(untrusted(a.value, False)))
        t.append("  ")
        t.append_text(bar(p, 8))
        if calibrated:
            t.append(f"  {word} trust\n", style=style)
            t.append_text(calibrated_words(an))
            t.append("\n")
            t.append_text(confidence_words(k / n, k, n, lo, hi, word=False, meaning=False))
        else:
            t.append("\n")
            t.append_text(confidence_words(k / n, k, n, lo, hi))
        t.append("\nanswers from the problem alone: ", style="dim")
        t.append_text(dist_text(oc.start, mark=a.value))
        return t
    conf = an.answer_confidence if an is not None and an.answer_confidence is not None else a.confidence
    if conf is not None:
        t.append("  confidence ")
        t.append_text(_meter(conf))
    if an is not None and an.consistency is not None:
        t.append("  consistency ")
        t.append(f"{an.consistency:.2f}", style=tint(an.consistency))
        if an.refined:
            t.append(" (refined)", style="dim")
    return t


def trace_tree(trace) -> Tree:
    """The whole trace as a `rich.tree.Tree` (styles: ui.THEME + TREE_THEME)."""
    head = Text.assemble(("Problem ", "title"), untrusted(" ".join(trace.problem.split())))
    facts = [f"model {trace.model.name}", f"{len(trace.tokens)} tokens", f"finish: {trace.finish_reason}"]
    if trace.created:  # "2025-05-04T10:11:12+0000" -> "2025-05-04 10:11"
        facts.append(trace.created[:16].replace("T", " "))
    head.append("\n" + untrusted(" · ".join(facts), multiline=False), style="dim")
    root = Tree(head, guide_style="tree.guide")

    an = trace.analysis
    by_step: dict[int, list] = {}
    for d in an.decisions if an is not None else []:
        by_step.setdefault(d.step, []).append(d)
    width = len(str(len(trace.steps)))
    oc = an.outcomes if an is not None else None
    value = trace.answer.value if trace.answer else None
    if oc is not None:
        root.add(Text.assemble(("from the problem alone: ", "dim"), dist_text(oc.start, mark=value)))
    for step in trace.steps:
        node = root.add(_step_node(step, width))
        if oc is not None and step.index < len(oc.steps):
            label = Text.assemble(("continued from here: ", "dim"), dist_text(oc.steps[step.index], mark=value))
            m = oc.movement[step.index]
            if m is not None:
                label.append(f"  moved {m:.2f}", style="warn" if step.index in oc.anchors else "dim")
                if oc.movement_p[step.index] is not None:
                    label.append(f" (chance p={oc.movement_p[step.index]:.2f})", style="dim")
            node.add(label)
        for d in sorted(by_step.pop(step.index, []), key=lambda d: d.token_index):
            _add_decision(node, d)
    if not trace.steps:
        root.add(Text("no steps were segmented from the output", style="dim"))
    # a decision whose step is not in the list (should not happen) is still shown
    for d in sorted((d for ds in by_step.values() for d in ds), key=lambda d: d.rank):
        _add_decision(root, d)

    answer = root.add(_answer_label(trace))
    if an is None:
        answer.add(Text("this trace has no inverse analysis (it was made with --no-track)", style="dim"))
    else:
        for note in an.notes:
            answer.add(safe_text(note, style="dim"))
        if oc is not None:
            answer.add(Text(untrusted(f"{oc.spent} of {oc.budget} tokens sampled; sampling {oc.sampling}; {oc.rule}"),
                            style="dim"))
    return root


def show_tree(trace, out: Console = console) -> None:
    with out.use_theme(TREE_THEME):
        out.print(trace_tree(trace))


def exact_status(out: Console = console):
    """A spinner while exact eq. 7 is computed (context manager)."""
    return out.status("exact eq. 7 on the torch model: one forward pass, a backward pass per step…", spinner="dots")


def _signed(x: float | None) -> Text:
    return Text("n/a", style="dim") if x is None else Text(f"{x:+.2f}", style="bold")


def _sig_rank(value: float, rank: int, n: int) -> Text:
    return Text.assemble(bar(value, 6), f" {value:.2f}", (f"  #{rank} of {n}", "dim"))


def exact_view(report) -> Group:
    """`sage explain --exact`: what each step depends on under exact eq. 7, the trace's
    decision points ranked by exact significance and by the proxy, the agreement, the time."""
    t = report.timings
    head = Text.assemble(("Exact eq. 7", "title"), f"  {report.method}; attention: {report.attention}")
    facts = Text("Spearman of the proxy formula vs exact (mean per step): ")
    facts.append_text(_signed(report.spearman))
    facts.append(f" · {t.get('exact_s', 0.0):.1f} s", style="dim")
    if t.get("load_s", 0.0) >= 0.05:
        facts.append(f" (+ {t['load_s']:.1f} s loading the torch model)", style="dim")
    parts = [head, facts, Text()]

    steps = Table(title="What each step depends on most (exact significance)", title_justify="left",
                  title_style="section", show_edge=False, box=None, pad_edge=False)
    steps.add_column("step", justify="right", style="dim", no_wrap=True)
    steps.add_column("earlier tokens", ratio=1)
    for index, deps in report.steps:
        row = Text()
        for i, dep in enumerate(deps):
            if i:
                row.append(" · ", style="dim")
            row.append(token_label(dep.text))
            row.append(f" {dep.weight:.2f}", style="sig")
            if dep.source == "prompt":
                row.append(" (problem)", style="dim")
        steps.add_row(str(index + 1), row if deps else Text("nothing earlier", style="dim"))
    parts += [steps, Text()]

    if report.decisions:
        dec = Table(title=f"Decision points: exact vs proxy (rank among {report.n_ranked} generated tokens)",
                    title_justify="left", title_style="section", show_edge=False, box=None, pad_edge=False)
        for col, j in (("decision", "right"), ("step", "right"), ("token", "left"), ("in trace", "right"),
                       ("exact", "left"), ("proxy", "left")):
            dec.add_column(col, justify=j, no_wrap=True)
        for c in report.decisions:
            dec.add_row(str(c.rank), str(c.step + 1), Text(token_label(c.text)), f"{c.recorded:.2f}",
                        _sig_rank(c.exact, c.exact_rank, report.n_ranked),
                        _sig_rank(c.proxy, c.proxy_rank, report.n_ranked))
        parts.append(dec)
    else:
        parts.append(Text("the trace has no decision points to compare", style="dim"))
    return Group(*parts)


def show_exact(report, out: Console = console) -> None:
    out.print()
    out.print(exact_view(report))


def exported(fmt: str, path, out: Console | None = None) -> None:
    """Where an export was written: a message, so on stderr."""
    from sage.cli.ui import err_console

    (out or err_console).print(Text(untrusted(f"{fmt.upper()} written to {path}"), style="dim"), soft_wrap=True)


def export_tree(trace, fmt: str, width: int = EXPORT_WIDTH) -> str:
    """The trace as a standalone document: "svg" (the tree as the terminal shows it) or
    "html" (the report page of ui/report.py)."""
    if fmt == "html":
        from sage.cli.ui.report import render_html

        return render_html(trace)
    if fmt == "svg":
        rec = Console(theme=THEME, record=True, width=width, file=io.StringIO(), highlight=False)
        show_tree(trace, rec)
        return rec.export_svg(title=untrusted(f"sage explain · {trace.model.name}", multiline=False))
    raise ValueError(f"unknown export format {fmt!r}")

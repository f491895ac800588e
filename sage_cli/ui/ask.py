"""The view of `sage ask`: the streamed chain, then the forks that matter and the answer.

Compact by default: the chain (tinted per word by the model's certainty), the measured
forks in chain order, the answer with how far to trust it, one footer line. `--verbose`
adds every step's numbers, the candidates that were checked and cleared, and the
explanation. The chain and the summary go to stdout; progress and where the trace was
saved go to stderr, so `sage ask ... > out.txt` holds the answer and nothing else.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from rich.cells import cell_len
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sage.cli.ui import bar, console, err_console, legend, tint
from sage.cli.ui.outcome import (OPEN_QUESTION, answer_value, calibrated_words, confidence_words, dist_text, estimate,
                                 is_open, no_answer_reason, scale_line, trust)
from sage.cli.ui.safe import text as safe_text, token_label, untrusted

CIRCLED = "①②③④⑤⑥⑦⑧⑨⑩"  # decision markers: cannot be read as a number or an option letter
CONTEXT_BEFORE = 48  # characters of the chain shown before a fork's word
CONTEXT_AFTER = 32


def marker(rank: int) -> str:
    return CIRCLED[rank - 1] if 1 <= rank <= len(CIRCLED) else f"[{rank}]"


def joins(word: str, nxt: str) -> bool:
    """Whether token text `nxt` continues the word `word` ends with: letters or digits on
    both sides, or a number's ',' / '.' between digits ("1,200", "3.5")."""
    if not word or not nxt:
        return False
    a, b = word[-1], nxt[0]
    if a.isalnum() and b.isalnum():
        return True
    if a.isdigit() and nxt in (",", "."):
        return True
    return a in ",." and len(word) >= 2 and word[-2].isdigit() and b.isdigit()


def word_span(text: str, start: int, end: int) -> tuple[int, int]:
    """[start, end) widened to the whole word or number it is part of, so that a mark
    never splits "24" or "boxes"."""
    while start > 0 and text[start - 1].isalnum() and (start == end or text[start].isalnum()):
        start -= 1
    while end < len(text) and text[end].isalnum() and end > start and text[end - 1].isalnum():
        end += 1
    # digits across , or . ("1,2|00")
    while (start >= 2 and text[start - 1] in ",." and text[start - 2].isdigit()
           and start < len(text) and text[start].isdigit()):
        start -= 2
        while start > 0 and text[start - 1].isdigit():
            start -= 1
    while (end + 1 < len(text) and text[end] in ",." and text[end + 1].isdigit()
           and end > 0 and text[end - 1].isdigit()):
        end += 2
        while end < len(text) and text[end].isdigit():
            end += 1
    return start, end


def token_starts(trace) -> list[int]:
    out, offs = [], 0
    for t in trace.tokens:
        out.append(offs)
        offs += len(t.text)
    return out


def shown_decisions(analysis) -> list:
    """The decisions a view marks, in chain order: the measured forks when outcomes were
    sampled, every proposal otherwise."""
    if analysis is None:
        return []
    sampled = analysis.outcomes is not None
    return sorted((d for d in analysis.decisions if d.confirmed or not sampled), key=lambda d: d.token_index)


def phase_line(trace) -> Text:
    """The footer: tokens, speed, first token, the analysis' phases, finish reason."""
    t = trace.timings
    facts = [f"{len(trace.tokens)} tokens", f"{t.get('tokens_per_s', 0):.1f} tok/s"]
    if "first_token_s" in t:
        facts.append(f"first token {t['first_token_s']:.2f} s")
    if "generate_s" in t:
        facts.append(f"chain {t['generate_s']:.1f} s")
    an = trace.analysis
    if an is not None and an.timings:
        at = an.timings
        part = f"analysis {at.get('analysis_s', 0):.1f} s"
        inner = []
        if at.get("exact_s"):
            inner.append(f"exact significance {at['exact_s']:.1f} s")
        if "coarse_s" in at:
            inner.append(f"curve {at['coarse_s']:.1f} s")
        if "fine_s" in at and at["fine_s"] >= 0.05:
            inner.append(f"forks {at['fine_s']:.1f} s")
        if at.get("sample_tokens"):
            inner.append(f"{at['sample_tokens']:.0f} tokens sampled at {at.get('sample_tokens_per_s', 0):.0f} tok/s")
        if inner:
            part += " (" + ", ".join(inner) + ")"
        facts.append(part)
    facts.append(f"finish: {trace.finish_reason}")
    return Text(" · ".join(facts), style="dim")


class AskView:
    """Live view of `sage ask`: header, streamed tokens, then the summary."""

    def __init__(self, out: Console = console, err: Console = err_console, verbose: bool = False) -> None:
        self.out = out
        self.err = err
        self.verbose = verbose
        self._word: list[tuple[str, float, bool]] = []  # the tokens of the word being streamed
        self._col = 0  # the terminal column the streamed chain has reached

    # --- streaming ---------------------------------------------------------------

    def header(self, problem: str, model_name: str, description: str, prompt_tokens: int) -> None:
        self.out.print(Text.assemble(("Problem ", "title"), untrusted(problem)))
        self.out.print(Text(untrusted(f"model {model_name} · {description} · prompt {prompt_tokens} tokens"), style="dim"))
        self.out.print(legend())
        self.out.rule(style="dim")

    def token(self, text: str, prob: float, possible_fork: bool = False) -> None:
        """One streamed token. Printed a word at a time: a word is tinted by its least
        certain token and underlined when one of its tokens is a possible fork."""
        word = "".join(t for t, _, _ in self._word)
        if self._word and not joins(word, text):
            self._flush()
        self._word.append((text, prob, possible_fork))
        if not text[-1:].isalnum() and text not in (",", "."):
            self._flush()

    def _flush(self) -> None:
        if not self._word:
            return
        word = "".join(t for t, _, _ in self._word)
        style = tint(min(p for _, p, _ in self._word))
        if any(f for _, _, f in self._word) and word.strip():
            style += " underline"
        self._word = []
        lead = len(word) - len(word.lstrip())
        space, core = untrusted(word[:lead]), untrusted(word[lead:])
        if self.out.is_terminal:
            # wrap between words, as the terminal would not: a word never breaks at the edge
            width = self.out.width
            if "\n" in space:
                self._col = cell_len(space.rsplit("\n", 1)[1])
            if self._col and self._col + cell_len(space) + cell_len(core) > width and cell_len(core) < width:
                space = "\n"
                self._col = 0
            elif "\n" not in space:
                self._col += cell_len(space)
            self._col = cell_len(core.rsplit("\n", 1)[1]) if "\n" in core else self._col + cell_len(core)
        # soft_wrap: Rich prints the text as it is (the column is tracked above)
        self.out.print(Text(space) + Text(core, style=style), end="", soft_wrap=True)
        self.out.file.flush()

    def end_chain(self) -> None:
        self._flush()

    def analyzing(self, budget: int, exact: bool = False):
        """Context manager yielding on_progress(samples, tokens, budget): a status line on
        stderr with the samples and tokens so far and the elapsed time."""
        self.out.print()
        what = "exact significance (torch model, backward per step), then " if exact else ""

        @contextmanager
        def cm():
            t0 = time.time()

            def msg(n, spent):
                return Text(f"inverse analysis: {what}sampling what the model answers from each point · "
                            f"{n} samples · {spent}/{budget} tokens · {time.time() - t0:.0f} s")

            with self.err.status(msg(0, 0), spinner="dots") as st:
                yield lambda n, spent, _budget: st.update(msg(n, spent))

        return cm()

    # --- the summary -------------------------------------------------------------

    def summary(self, trace, saved: Path | None, vote: bool = False) -> None:
        self._flush()
        self.out.print()
        self.out.rule(style="dim")
        an = trace.analysis
        value = trace.answer.value if trace.answer else None
        sampled = an is not None and an.outcomes is not None
        if self.verbose and trace.steps:
            self.out.print(self.steps_table(trace))
        if an is not None:
            if sampled:
                self.out.print(self.curve_line(an.outcomes, value))
            if an.exact is not None:
                self.out.print(self.exact_line(an))
            self.out.print(self.forks(trace))
            if self.verbose:
                self.out.print(self.explanation_panel(an))
        self.out.print(self.answer_panel(trace, vote))
        if sampled and value is not None:
            est = estimate(trace)
            self.out.print(scale_line(est is not None and est[1]))
        self.out.print(phase_line(trace))
        if saved:
            hint = "" if self.verbose else "; sage ask -v for every step's numbers"
            self.err.print(Text(untrusted(f"trace saved to {saved} · sage explain shows it as a tree{hint}"), style="dim"),
                           soft_wrap=True)

    def steps_table(self, trace) -> Table:
        an = trace.analysis
        oc = an.outcomes if an else None
        value = trace.answer.value if trace.answer else None
        table = Table(title="Steps", title_style="title", show_edge=False, expand=True)
        table.add_column("#", justify="right", style="dim", no_wrap=True)
        table.add_column("step", ratio=1)
        table.add_column("token certainty", no_wrap=True)
        if oc is not None:
            table.add_column("answers if continued from here")
        marks = {d.token_index: d for d in shown_decisions(an)}
        for s in trace.steps:
            cert = bar(s.confidence)
            cert.append(f" {s.confidence:.2f}")
            row = [str(s.index + 1), self.step_text(trace, s, marks), cert]
            if oc is not None:
                cell = dist_text(oc.steps[s.index], mark=value, most=3)
                if s.index in oc.anchors:
                    cell = Text.assemble(("answer moved here: ", "warn"), cell)
                row.append(cell)
            table.add_row(*row)
        table.caption = ("token certainty: the geometric mean probability of the step's tokens (how sure the model "
                         "was of its words, not whether they are right)")
        table.caption_style = "dim"
        return table

    @staticmethod
    def step_text(trace, step, marks: dict) -> Text:
        """The step's text, each marked decision's whole word highlighted and followed by
        its marker (①, ②, ...)."""
        starts = token_starts(trace)
        out = Text()
        pos = step.char_start
        for k in sorted(marks):
            if not step.token_start <= k < step.token_end:
                continue
            a0, a1 = word_span(trace.text, starts[k], starts[k] + len(trace.tokens[k].text))
            a0 = max(a0, step.char_start)
            a1 = min(a1, step.char_end)
            while a0 < a1 and trace.text[a0].isspace():
                a0 += 1
            if a0 < pos or a1 <= a0:
                continue
            out.append(untrusted(trace.text[pos:a0]))
            out.append(untrusted(trace.text[a0:a1]), style="decision")
            out.append(marker(marks[k].rank), style="sig")
            pos = a1
        out.append(untrusted(trace.text[pos : step.char_end]))
        return out

    @staticmethod
    def context(trace, k: int, mark: str = "") -> Text:
        """The chain around token k, its word highlighted and followed by `mark` (visible
        without colour too): '…find the number of boxes① that are left…'."""
        starts = token_starts(trace)
        a0, a1 = word_span(trace.text, starts[k], starts[k] + len(trace.tokens[k].text))
        while a0 < a1 and trace.text[a0].isspace():
            a0 += 1
        b0 = max(0, a0 - CONTEXT_BEFORE)
        b1 = min(len(trace.text), a1 + CONTEXT_AFTER)
        flat = lambda s: " ".join(s.split()) if s.strip() else (" " if s else "")  # noqa: E731
        before, after = trace.text[b0:a0], trace.text[a1:b1]
        t = Text("…" if b0 > 0 else "", style="dim")
        t.append(untrusted(flat(before) + (" " if before[-1:].isspace() else ""), False))
        t.append(untrusted(trace.text[a0:a1], False), style="decision")
        t.append(mark, style="sig")
        t.append(untrusted((" " if after[:1].isspace() else "") + flat(after), False))
        if b1 < len(trace.text):
            t.append("…", style="dim")
        return t

    def forks(self, trace) -> Group:
        """The forks that matter, in chain order: where each is, what the chosen token and
        its alternatives lead to, and the fork score in words."""
        an = trace.analysis
        sampled = an.outcomes is not None
        shown = shown_decisions(an)
        parts: list = []
        if sampled:
            parts.append(Text("Forks", style="title") + Text(
                "  where the reasoning could have gone another way: the chosen word and its alternatives, "
                "each continued many times by the model", style="dim"))
            if not shown:
                parts.append(Text("  none found: " + self.no_forks_reason(an), style="dim"))
        else:
            why = ("an open question has no short answer to compare across samples"
                   if trace.answer is not None and trace.answer.expected == "open" else "--budget 0 or no sampling")
            parts.append(Text("Possible decision points", style="title") + Text(
                f"  proposed from attention and uncertainty, not measured ({why}): a guess, not evidence",
                style="dim"))
        for d in shown:
            parts.append(self.fork_block(trace, d))
        cleared = [d for d in an.decisions if sampled and not d.confirmed and d.fork is not None]
        if cleared and self.verbose:
            parts.append(Text(
                "checked, not forks (their alternatives lead to the same answers): "
                + ", ".join(f"{token_label(d.text.strip() or d.text)} in step {d.step + 1} (fork {d.fork:.2f})"
                            for d in sorted(cleared, key=lambda d: d.token_index)), style="dim"))
        elif cleared:
            parts.append(Text(f"{len(cleared)} other candidate{'s' if len(cleared) != 1 else ''} checked: "
                              "not forks (sage ask -v lists them)", style="dim"))
        return Group(*parts)

    @staticmethod
    def no_forks_reason(an) -> str:
        oc = an.outcomes
        measured = [d for d in an.decisions if d.fork is not None]
        steps = ", ".join(str(i + 1) for i in sorted(oc.anchors))
        if measured:
            n = len(measured)
            return (f"{n} candidate{'s' if n != 1 else ''} checked inside step{'s' if len(oc.anchors) != 1 else ''} "
                    f"{steps}; their alternatives lead to the same answers")
        if oc.anchors and oc.proposed:
            return (f"the answer moved over step{'s' if len(oc.anchors) != 1 else ''} {steps}, but the budget "
                    f"({oc.budget} tokens) ran out before its words were checked; try --budget {2 * oc.budget}")
        if oc.anchors:
            return f"the answer moved over step {steps}, but no word in it had a likely alternative"
        if any(o is None for o in oc.steps):
            return (f"no sampled step moved the answer clearly; some steps were not sampled within the budget "
                    f"({oc.budget} tokens)")
        return "no step moved the answer clearly: the reasoning did not fork where sage could see it"

    def label(self, text: str) -> str:
        """A token in a line that wraps: without its leading space in the compact view (a
        wrapped line must not break a label at it), exactly as written with -v."""
        return token_label(text if self.verbose else (text.strip() or text))

    def fork_block(self, trace, d) -> Table:
        head = Table.grid(padding=(0, 1))
        head.add_column(no_wrap=True)
        head.add_column(ratio=1)
        head.add_row(Text(f" {marker(d.rank)} step {d.step + 1}", style="sig"),
                     self.context(trace, d.token_index, marker(d.rank)))
        sampled = d.outcome is not None
        if not sampled and not any(b.outcome is not None or b.answer is not None for b in d.branches):
            line = Text("   " + self.label(d.text), style="bold")
            line.append(f" p {d.prob:.2f}", style=tint(d.prob))
            line.append(" · alternatives ", style="dim")
            for i, alt in enumerate(d.alternatives[:3]):
                if i:
                    line.append(" · ", style="dim")
                line.append(self.label(alt.text))
                line.append(f" {alt.prob:.2f}", style=tint(alt.prob))
            line.append(" (not measured)", style="dim")
            g = Table.grid()
            g.add_row(head)
            g.add_row(line)
            return g
        rows = Table.grid(padding=(0, 1))
        rows.add_column(no_wrap=True)
        rows.add_column(justify="right", no_wrap=True)
        rows.add_column()
        value = trace.answer.value if trace.answer else None
        rows.add_row(Text("   " + token_label(d.text), style="bold"), Text(f"p {d.prob:.2f}", style=tint(d.prob)),
                     Text.assemble(("as written → ", "dim"), dist_text(d.outcome, mark=value) if sampled
                                   else Text("the chain", style="dim")))
        rolled = {b.token_id: b for b in d.branches}
        for alt in d.alternatives[: max(len(d.branches), 2) if not self.verbose else 5]:
            b = rolled.get(alt.id)
            if b is not None and b.outcome is not None:
                lead = dist_text(b.outcome, mark=value)
            elif b is not None:
                lead = Text(f"one greedy continuation answers {answer_value(b.answer)}", style="dim")
            else:
                lead = Text("not sampled", style="dim")
            rows.add_row(Text("   " + token_label(alt.text)), Text(f"p {alt.prob:.2f}", style=tint(alt.prob)),
                         Text.assemble(("instead → ", "dim"), lead))
        body = [head, rows]
        if d.fork is not None:
            words = ("the alternatives lead to other answers" if d.fork >= 0.6 else
                     "the alternatives often lead elsewhere" if d.fork >= 0.3 else
                     "the alternatives mostly lead to the same answers")
            line = Text(f"   fork score {d.fork:.2f}: {words}", style="dim")
            if d.fork_p is not None:
                line.append(f"; a difference this large by chance alone: p = {d.fork_p:.2f}", style="dim")
            body.append(line)
        elif self.verbose:
            body.append(Text(f"   normalized significance {d.significance:.2f} (eq. 7): how much later steps "
                             "drew on this token", style="dim"))
        if self.verbose and d.dependencies:
            deps = ", ".join(f"{token_label(x.text.strip() or x.text)} {x.weight:.2f}" for x in d.dependencies[:3])
            body.append(Text("   attended to most: " + deps, style="dim"))
        g = Table.grid()
        for b in body:
            g.add_row(b)
        return g

    @staticmethod
    def exact_line(analysis) -> Text:
        """How the significance was computed with --exact, how well the proxy agrees, the time."""
        x = analysis.exact
        rho = x.get("spearman_vs_proxy")
        t = Text(f"significance: {analysis.proxy}", style="dim")
        t.append(" · Spearman vs the llama.cpp proxy ")
        t.append("n/a" if rho is None else f"{rho:+.2f}", style="bold")
        t.append(f" · {x['exact_s']:.1f} s")
        if x.get("load_s", 0) >= 0.05:
            t.append(f" (+ {x['load_s']:.1f} s loading the torch model)")
        return t

    @staticmethod
    def curve_line(oc, value) -> Text:
        """The answer distribution along the chain, as the share of the chain's answer."""
        if value is None:  # the chain gave no answer: what the samples answer most, and how often
            t = Text("what the model answers most when continued from: the problem ", style="dim")

            def share(o):
                if o is None:
                    return Text("–", style="dim")
                return Text.assemble((answer_value(o.leader), "bold"), f" {o.share:.0%}")
        else:
            t = Text("how often the model reaches ", style="dim")
            t.append(answer_value(value), style="bold")
            t.append(" when continued from: the problem ", style="dim")

            def share(o):
                return Text("–", style="dim") if o is None else Text(f"{o.share_of(value):.0%}", style="bold")

        t.append_text(share(oc.start))
        for i, o in enumerate(oc.steps):
            t.append(f" · step {i + 1} ", style="dim")
            t.append_text(share(o))
        t.append(f"   (– not sampled; {oc.spent}/{oc.budget} tokens sampled, {oc.parallel} at a time)", style="dim")
        return t

    @staticmethod
    def explanation_panel(analysis) -> Panel:
        def rows(pairs) -> Table:  # a narrow label column, then the wrapped text
            t = Table.grid(padding=(0, 1))
            t.add_column(no_wrap=True)
            t.add_column(ratio=1)
            for label, text in pairs:
                t.add_row(label, text)
            return t

        e = analysis.explanation
        parts = []
        for title, lines in (
            ("Why these forks", e.justification),
            ("Alternatives", e.alternatives),
            ("Confidence", e.confidence),
            ("What the steps drew on", e.dependencies),
        ):
            if lines:
                parts += [Text(title, style="section"), rows((" •", safe_text(line)) for line in lines)]
        if analysis.notes:
            parts.append(rows((Text("note", style="warn"), safe_text(n, style="warn")) for n in analysis.notes))
        return Panel(Group(*parts), title="Explanation", title_align="left", border_style="cyan")

    @staticmethod
    def answer_panel(trace, vote: bool = False) -> Panel:
        a = trace.answer
        an = trace.analysis
        oc = an.outcomes if an else None
        border = "yellow"
        note = a.note if a is not None else None
        if is_open(trace):
            body = Text("No short answer to check", style="bold")
            body.append("\n")
            body.append(OPEN_QUESTION, style="dim")
            border = "blue"
        elif a is None or a.value is None:
            why = no_answer_reason(trace)
            body = Text("No answer: " + untrusted(why, False), style="warn")
        else:
            body = Text.assemble(("Answer ", "bold"), (untrusted(a.value, False), "bold"))
            est = estimate(trace)
            if oc is not None and oc.start is not None and est is not None:
                from sage.inverse.outcomes import wilson

                p, calibrated = est
                k, n = oc.start.count(a.value), oc.start.n
                lo, hi = wilson(k, n)
                word, _, border = trust(p)
                body.stylize(border, len("Answer "))
                body.append("  ")
                body.append(f"{word} trust", style=border)
                body.append("  ")
                body.append_text(bar(p))
                if calibrated:
                    body.append("\n")
                    body.append_text(calibrated_words(an))
                body.append("\n")
                body.append_text(confidence_words(k / n, k, n, lo, hi, word=False, meaning=not calibrated))
            else:
                body.append("  not checked by sampling", style="dim")
                if a.confidence is not None:
                    body.append("\n")
                    body.append(f"the model wrote it with probability {a.confidence:.2f}: how sure it was of those "
                                "words, not whether the answer is right", style="dim")
            if note:
                body.append("\n")
                body.append("note: " + untrusted(note, False), style="warn")
        if oc is not None and oc.start is not None:
            body.append("\n")
            body.append("answers from the problem alone: ", style="dim")
            body.append_text(dist_text(oc.start, mark=a.value if a else None))
            if vote:
                body.append("\n")
                body.append("vote (most frequent answer): ", style="bold")
                body.append(untrusted(oc.vote, False) if oc.vote is not None else "none (no answer leads)")
        return Panel(body, expand=False, border_style=border)

    def interrupted(self, saved: Path) -> None:
        self._flush()
        self.out.print()
        self.err.print(Text(untrusted(f"interrupted; partial trace saved to {saved}"), style="warn"), soft_wrap=True)

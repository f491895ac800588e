"""Rich views: the only place that formats terminal output.

One console for the views (stdout) and one for errors (stderr), with named styles.
`--json` output bypasses all of this and contains no markup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.theme import Theme

from sage.cli.ui.outcome import answer_value, confidence_words, dist_text, scale_line, trust
from sage.cli.ui.safe import text as safe_text, untrusted  # the rule for untrusted text

THEME = Theme(
    {
        "tok.sure": "default",
        "tok.mild": "yellow",
        "tok.unsure": "dark_orange",
        "tok.doubt": "bold red",
        "title": "bold cyan",
        "dim": "dim",
        "answer": "bold green",
        "warn": "bold yellow",
        "error": "bold red",
        "decision": "bold reverse magenta",
        "sig": "magenta",
        "same": "green",
        "changed": "bold red",
        "section": "bold",
    }
)

console = Console(theme=THEME, highlight=False)
err_console = Console(theme=THEME, stderr=True, highlight=False)

# token probability thresholds for the uncertainty tint, most certain first
TINTS = ((0.8, "tok.sure"), (0.5, "tok.mild"), (0.2, "tok.unsure"), (0.0, "tok.doubt"))


def tint(prob: float) -> str:
    for threshold, style in TINTS:
        if prob >= threshold:
            return style
    return TINTS[-1][1]


def confidence_style(c: float) -> str:
    return tint(c)


def bar(value: float, width: int = 10) -> Text:
    # a trace file may hold NaN or 1e308: clamp before rounding
    filled = round(min(max(value, 0.0), 1.0) * width) if value == value else 0
    return Text("█" * filled + "░" * (width - filled), style=confidence_style(value))


def error(message: str) -> None:
    """One line on stderr, no markup interpretation of the message."""
    err_console.print(Text("error: ", style="error") + safe_text(message, multiline=False), soft_wrap=True)


def legend() -> Text:
    t = Text("token certainty: ", style="dim")
    for label, style in (("p≥0.8", "tok.sure"), ("≥0.5", "tok.mild"), ("≥0.2", "tok.unsure"), ("<0.2", "tok.doubt")):
        t.append(label, style=style)
        t.append(" ")
    t.append("· ", style="dim")
    t.append("underlined", style="underline")
    t.append(": a possible fork (another token was nearly as likely), checked after the chain", style="dim")
    return t


def live_proposal(rec) -> bool:
    """A possible fork, known as the token streams: the chosen token had under 1/2 of the
    probability and the strongest other token at least 1/5 (the analysis measures it)."""
    others = [a.prob for a in rec.top if a.id != rec.id]
    return rec.prob < 0.5 and bool(others) and others[0] >= 0.2


class AskView:
    """Live view of `sage ask`: header, streamed tokens, then steps and answer."""

    def __init__(self, out: Console = console) -> None:
        self.out = out

    def header(self, problem: str, model_name: str, description: str, prompt_tokens: int) -> None:
        self.out.print(Text.assemble(("Problem ", "title"), untrusted(problem)))
        self.out.print(Text(untrusted(f"model {model_name} · {description} · prompt {prompt_tokens} tokens"), style="dim"))
        self.out.print(legend())
        self.out.rule(style="dim")

    def token(self, text: str, prob: float, possible_fork: bool = False) -> None:
        """One streamed token, tinted by its probability; underlined when it is a possible
        fork (live_proposal), which the analysis afterwards confirms or clears."""
        # soft_wrap: the terminal wraps; Rich does not know the column mid-line
        style = tint(prob) + (" underline" if possible_fork and text.strip() else "")
        self.out.print(safe_text(text, style=style), end="", soft_wrap=True)
        self.out.file.flush()

    def analyzing(self, budget: int, exact: bool = False):
        """Context manager yielding on_progress(samples, tokens, budget): a status line
        with the samples and tokens so far and the elapsed time while the analysis runs."""
        import time
        from contextlib import contextmanager

        self.out.print()
        what = "exact significance (torch model, backward per step), then " if exact else ""

        @contextmanager
        def cm():
            t0 = time.time()
            msg = lambda n, spent: Text(  # noqa: E731
                f"inverse analysis: {what}sampling outcome distributions · {n} samples · "
                f"{spent}/{budget} tokens · {time.time() - t0:.0f} s")
            with self.out.status(msg(0, 0), spinner="dots") as st:
                yield lambda n, spent, _budget: st.update(msg(n, spent))

        return cm()

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
    def step_text(trace, step) -> Text:
        """The step's text with its decision-point tokens highlighted and their significance."""
        a = trace.analysis
        marks = {}
        if a:
            for d in a.decisions:
                if step.token_start <= d.token_index < step.token_end and (d.confirmed or a.outcomes is None):
                    marks[d.token_index] = d
        if not marks:
            return safe_text(step.text)
        out = Text()
        pos = step.char_start
        offs = 0
        starts = []
        for t in trace.tokens:
            starts.append(offs)
            offs += len(t.text)
        for k in sorted(marks):
            d = marks[k]
            a0, a1 = starts[k], starts[k] + len(trace.tokens[k].text)
            a0, a1 = max(a0, step.char_start), min(a1, step.char_end)
            if a0 < pos or a1 <= a0:
                continue
            out.append(untrusted(trace.text[pos:a0]))
            out.append(untrusted(trace.text[a0:a1]), style="decision")
            score = d.fork if d.fork is not None else d.significance
            out.append(f"[{d.rank}: {score:.2f}]", style="sig")
            pos = a1
        out.append(untrusted(trace.text[pos : step.char_end]))
        return out

    def summary(self, trace, saved: Path | None, vote: bool = False) -> None:
        self.out.print()
        self.out.rule(style="dim")
        if trace.steps:
            table = Table(title="Steps", title_style="title", show_edge=False, expand=True)
            table.add_column("#", justify="right", style="dim", no_wrap=True)
            table.add_column("step", ratio=1)
            table.add_column("confidence", no_wrap=True)
            oc = trace.analysis.outcomes if trace.analysis else None
            value = trace.answer.value if trace.answer else None
            if oc is not None:
                table.add_column("answers if continued from here", no_wrap=False)
            for s in trace.steps:
                conf = bar(s.confidence)
                conf.append(f" {s.confidence:.2f}")
                row = [str(s.index + 1), self.step_text(trace, s), conf]
                if oc is not None:
                    cell = dist_text(oc.steps[s.index], mark=value, most=3)
                    if s.index in oc.anchors:
                        cell = Text.assemble(("moved ", "warn"), cell)
                    row.append(cell)
                table.add_row(*row)
            self.out.print(table)
        if trace.analysis:
            an = trace.analysis
            if an.outcomes is not None:
                self.out.print(self.curve_line(an.outcomes, trace.answer.value if trace.answer else None))
                self.out.print(Text("[k: f] marks decision point k, a measured fork, and its fork score f "
                                    "(0: the alternatives lead to the same answers, 1: to others)", style="dim"))
            else:
                self.out.print(Text("[k: s] marks decision point k and its normalized significance s", style="dim"))
            if an.exact is not None:
                self.out.print(self.exact_line(an))
            shown = [d for d in an.decisions if d.confirmed or an.outcomes is None]
            for d in sorted(shown, key=lambda d: d.token_index) if an.outcomes is not None else shown:
                self.out.print(self.decision_panel(d))
            cleared = [d for d in an.decisions if not d.confirmed and an.outcomes is not None]
            if cleared:
                self.out.print(Text(
                    "checked, not forks: " + ", ".join(f"{untrusted(repr(d.text.strip() or d.text), False)} (step {d.step + 1}, "
                                                       f"fork {d.fork:.2f})" for d in cleared if d.fork is not None),
                    style="dim"))
            self.out.print(self.explanation_panel(an))
        self.out.print(self.answer_panel(trace, vote))
        if trace.analysis and trace.analysis.outcomes is not None:
            self.out.print(scale_line())
        t = trace.timings
        facts = [f"{len(trace.tokens)} tokens", f"{t.get('tokens_per_s', 0):.1f} tok/s"]
        if "first_token_s" in t:
            facts.append(f"first token {t['first_token_s']:.2f} s")
        facts.append(f"finish: {trace.finish_reason}")
        self.out.print(Text(" · ".join(facts), style="dim"))
        if saved:
            self.out.print(Text(f"trace saved to {saved}", style="dim"))

    @staticmethod
    def decision_panel(d) -> Panel:
        table = Table(show_edge=False, box=None, pad_edge=False)
        table.add_column("token", no_wrap=True)
        table.add_column("p", justify="right")
        table.add_column("leads to")
        sampled = d.outcome is not None
        chosen = dist_text(d.outcome) if sampled else Text("chosen path", style="dim")
        table.add_row(Text(repr(d.text), style="decision"), f"{d.prob:.2f}", chosen)
        rolled = {b.token_id: b for b in d.branches}
        for alt in d.alternatives:
            b = rolled.get(alt.id)
            if b is None:
                lead = Text("not sampled" if sampled else "not rolled out", style="dim")
            elif b.outcome is not None:
                lead = dist_text(b.outcome)
            elif b.changed:
                lead = Text.assemble((f"different answer: {untrusted(b.answer)}", "changed"), (f"  ({b.n_tokens} tokens)", "dim"))
            else:
                lead = Text.assemble((f"same answer: {untrusted(b.answer)}", "same"), (f"  ({b.n_tokens} tokens)", "dim"))
            table.add_row(Text(repr(alt.text)), f"{alt.prob:.2f}", lead)  # repr: control characters escaped
        deps = untrusted(", ".join(f"{x.text.strip() or repr(x.text)} ({x.weight:.2f})" for x in d.dependencies[:3]), False)
        if d.fork is not None:
            title = f"decision {d.rank} · step {d.step + 1} · fork score {d.fork:.2f}"
            if d.fork_p is not None:
                title += f" (chance alone: p={d.fork_p:.2f})"
        else:
            title = (
                f"decision {d.rank} · step {d.step + 1} · significance {d.significance:.2f}"
                + (f" · {d.merged} more in this step" if d.merged else "")
            )
        body = Table.grid()
        body.add_row(table)
        if deps:
            body.add_row(Text(f"attended to: {deps}", style="dim"))
        return Panel(body, title=title, title_align="left", border_style="magenta", expand=False)

    @staticmethod
    def curve_line(oc, value) -> Text:
        """The answer distribution along the chain, as the share of the chain's answer."""
        t = Text("answer along the chain (share of samples reaching ", style="dim")
        t.append(untrusted(answer_value(value), False), style="bold")
        t.append("): start ", style="dim")

        def share(o):
            return Text("–", style="dim") if o is None else Text(f"{o.share_of(value):.0%}", style="bold")

        t.append_text(share(oc.start))
        for i, o in enumerate(oc.steps):
            t.append(f" → {i + 1}:", style="dim")
            t.append_text(share(o))
        t.append(f"   ({oc.spent}/{oc.budget} tokens sampled, {oc.parallel} at a time)", style="dim")
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
            ("Decision justification", e.justification),
            ("Alternatives", e.alternatives),
            ("Confidence", e.confidence),
            ("Critical dependencies", e.dependencies),
        ):
            if lines:
                parts += [Text(title, style="section"), rows((" •", safe_text(line)) for line in lines)]
        if analysis.notes:
            parts.append(rows((Text("refined", style="warn"), safe_text(n, style="warn")) for n in analysis.notes))
        grid = Group(*parts)
        return Panel(grid, title="Explanation", title_align="left", border_style="cyan")

    @staticmethod
    def answer_panel(trace, vote: bool = False) -> Panel:
        a = trace.answer
        an = trace.analysis
        oc = an.outcomes if an else None
        border = "yellow"
        if a is None or a.value is None:
            body = Text("no final answer found in the output", style="warn")
        else:
            body = Text.assemble(("Answer ", "bold"), (untrusted(a.value, False), "answer"))
            if oc is not None and oc.start is not None:
                from sage.inverse.outcomes import wilson

                k, n = oc.start.count(a.value), oc.start.n
                lo, hi = wilson(k, n)
                word, _, border = trust(k / n)
                body.append("   ")
                body.append_text(bar(k / n))
                body.append("\n")
                body.append_text(confidence_words(k / n, k, n, lo, hi))
            else:
                conf = an.answer_confidence if an and an.answer_confidence is not None else a.confidence
                if conf is not None:
                    body.append("   confidence ")
                    body.append_text(bar(conf))
                    body.append(f" {conf:.2f}")
                    border = "green"
                if an and an.consistency is not None:
                    body.append(f"   consistency {an.consistency:.2f}" + (" (refined)" if an.refined else ""))
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
        self.out.print()
        self.out.print(Text(f"interrupted; partial trace saved to {saved}", style="warn"))


class BenchView:
    """Progress while `sage bench` runs, then its table."""

    LABELS = {
        "llama": "(0) llama-cpp-python",
        "forward": "(1) sage forward",
        "track": "(2) + tracking",
        "analysis": "(3) + analysis",
        "rollouts": "(4) + sampled forks",
    }

    def __init__(self, out: Console = console) -> None:
        self.out = out

    def describe(self, step) -> str:
        """What a sage.bench.Step says is running, e.g. "(4) + sampled forks · rep 2/2 · problem 3/5"."""
        if step.phase == "load" and not step.config:
            return "loading the models"
        parts = [self.LABELS.get(step.config, step.config)]
        if step.rep:
            parts.append(f"rep {step.rep}/{step.reps}")
        phase = {"load": "loading the model", "warmup": "warm-up"}
        parts.append(phase.get(step.phase, f"problem {step.problem}/{step.n}"))
        return " · ".join(parts)

    def status(self, what: str):
        """A spinner while something without steps runs."""
        return self.out.status(Text(what), spinner="dots")

    def progress(self, total: int, header: str):
        """Context manager yielding a step(sage.bench.Step) callback: the bar says which
        configuration, repetition and problem runs, under a line with `header`, and
        advances when a step is finished."""
        from contextlib import contextmanager

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        class _Progress(Progress):
            def get_renderables(self):
                yield Text(header, style="dim")
                yield self.make_tasks_table(self.tasks)

        @contextmanager
        def cm():
            with _Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=self.out, transient=True, disable=not self.out.is_terminal,
            ) as prog:
                task = prog.add_task("starting", total=total)
                yield lambda step: prog.update(task, advance=1 if step.done else 0, description=self.describe(step))

        return cm()

    @staticmethod
    def _pct(x) -> str:
        return "—" if x is None else f"{x * 100:+.1f} %"

    def results(self, r: dict, saved: Path | None) -> None:
        mem = r["mem"]
        table = Table(
            title=Text(untrusted(f"sage bench · {r['model']} · {r['problems']} · {r['reps']} reps · ≤{r['max_tokens']} tokens")),
            title_style="title", show_edge=False,
        )
        for col, j in (("configuration", "left"), ("tok/s (min–max)", "right"), ("s / problem", "right"),
                       ("time vs (1)", "right"), ("time vs (0)", "right")):
            table.add_column(col, justify=j, no_wrap=True)
        if mem:
            for col in ("peak RSS", "mem vs (1)"):
                table.add_column(col, justify="right", no_wrap=True)
        table.add_column("accuracy", justify="right")
        for c, row in r["configs"].items():
            t, p = row["tokens_per_s"], row["time_per_problem_s"]
            cells = [
                self.LABELS.get(c, c),
                f"{t['median']:.1f} ({t['min']:.0f}–{t['max']:.0f})",
                f"{p['median']:.2f}",
                self._pct(row.get("time_overhead_vs_forward")),
                self._pct(row.get("time_overhead_vs_llama")),
            ]
            if mem:
                cells += [f"{row['memory']['peak_rss'] / 2**20:.0f} MiB", self._pct(row.get("memory_overhead_vs_forward"))]
            acc = f"{row['accuracy']:.2f}"
            if "vote_accuracy" in row:
                acc += f" · vote {row['vote_accuracy']:.2f}"
            cells.append(acc)
            table.add_row(*cells)
        self.out.print(table)
        seqs = r.get("sequences_tokens_per_s")
        if seqs:
            one = seqs.get("1")
            self.out.print(Text(
                "decoding sequences at once (shared prefix, one token each per decode): "
                + ", ".join(f"{b}: {v:.0f} tok/s" + (f" (×{v / one:.2f})" if one and b != "1" else "")
                            for b, v in seqs.items()), style="dim"))
        paper = r["paper"]
        self.out.print(Text(
            f"paper (SAGE-nano): inverse reasoning costs {paper['time_overhead'] * 100:.0f} % time, "
            f"{paper['memory_overhead'] * 100:.0f} % memory — compare with (3) + analysis", style="dim"))
        if mem:
            m = next(iter(r["configs"].values()))["memory"]
            tr = r["configs"].get("track", {}).get("memory", {})
            self.out.print(Text(
                f"model file {m['weights_file'] / 2**20:.0f} MiB · KV cache {m['kv_cache'] / 2**20:.0f} MiB (allocated, f16) · "
                f"tracking buffers {tr.get('tracking_buffers', 0) / 2**20:.1f} MiB · heads "
                + (f"{tr['heads'] / 2**10:.0f} KiB" if tr.get("heads") else "analytic (built in)"),
                style="dim"))
        for c, row in r["configs"].items():
            if "vote_accuracy" in row:
                self.out.print(Text(
                    f"greedy {row['accuracy']:.2f} vs vote of the samples {row['vote_accuracy']:.2f}; tokens per problem "
                    f"{row['tokens_per_problem']:.0f} vs {row['vote_tokens_per_problem']:.0f}", style="dim"))
        self.out.print(Text(f"heads: {r.get('heads', 'analytic (built in)')}", style="dim"))
        if saved:
            self.out.print(Text(f"saved to {saved}", style="dim"))


def models_table(rows: Iterable[tuple[str, str, str, str | None, bool]]) -> Table:
    """rows: (name, description, source, where it is on this machine or None, is default)."""
    table = Table(title="Models", title_style="title", show_edge=False, expand=True)
    table.add_column("name", no_wrap=True)
    table.add_column("model", ratio=1)
    table.add_column("on this machine", ratio=2, overflow="fold")
    for name, desc, source, where, default in rows:
        label = Text(name, style="bold") + (Text(" (default)", style="dim") if default else Text(""))
        if where:
            place = Text(where, style="green")
        else:
            place = Text(f"not downloaded ({source})", style="dim")
        table.add_row(label, desc, place)
    return table

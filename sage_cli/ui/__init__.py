"""Rich views: the only place that formats terminal output.

One console for the views (stdout) and one for errors (stderr), with named styles.
`--json` output bypasses all of this and contains no markup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.theme import Theme

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
    t = Text("each word tinted by the model's certainty: ", style="dim")
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
        tracking = r.get("tracking")
        if tracking and tracking.get("decode_ratio") is not None:
            how = ("the native tracker, in C" if tracking.get("tracker") == "native" else
                   "the Python fallback: the native tracker (kernels/tracker.c) is not built here; reinstall sage")
            self.out.print(Text(
                f"tracking overhead: (2) decodes at {tracking['decode_ratio']:.3f} × (1)'s tokens/s "
                f"({(1 / tracking['decode_ratio'] - 1) * 100:+.1f} % time per token; {how})", style="dim"))
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
        m = r.get("machine")
        if m:
            self.out.print(Text(untrusted(
                f"machine: {m.get('cpu')} · {m.get('cores')} cores, {m.get('threads')} threads · llama.cpp CPU kernels "
                f"built for {', '.join(m.get('kernels') or []) or 'no listed extensions'}"), style="dim"))
        if saved:
            self.out.print(Text(f"saved to {saved}", style="dim"))


def _home_short(where: str) -> str:
    """A path under the home directory as ~/..., to save width."""
    home = str(Path.home())
    return "~" + where[len(home):] if home not in ("", "/") and where.startswith(home + "/") else where


WIDE_MODELS = 120  # columns from which `sage models` gives the description its own column


def _short_source(source: str) -> str:
    """hf:ORG/REPO/FILE.gguf -> "hub ORG/REPO" (the file name is the repo's; --json has all)."""
    if source.startswith("hf:"):
        return "hub " + "/".join(source[3:].split("/")[:2])
    return source


def models_table(rows: Iterable[tuple[str, str, str, str | None, bool]], width: int | None = None) -> Table:
    """rows: (name, description, source, where it is on this machine or None, is default).
    A name is never cut or wrapped; narrower than WIDE_MODELS columns the description and
    the place share one column, on two lines."""
    rows = list(rows)
    wide = width is None or width >= WIDE_MODELS
    hub = any(not where and source.startswith("hf:") for _, _, source, where, _ in rows)
    table = Table(title="Models", title_style="title", show_edge=False, expand=True,
                  caption="sage models pull NAME downloads a hub model" if hub else None, caption_style="dim")
    table.add_column("name", no_wrap=True, min_width=max((len(r[0]) for r in rows), default=4))
    if wide:
        table.add_column("model", no_wrap=True)
        table.add_column("on this machine", ratio=1, overflow="fold")
    else:
        table.add_column("model · on this machine", ratio=1, overflow="fold")
    for name, desc, source, where, default in rows:
        label = Text(untrusted(name), style="bold")
        if default:
            label.append("\n(default)" if not wide else " (default)", style="dim")
        if where:
            place = Text(untrusted(_home_short(where)), style="green")
        else:
            place = Text(untrusted(f"not downloaded ({_short_source(source)})"), style="dim")
        if wide:
            table.add_row(label, Text(untrusted(desc)), place)
        else:
            table.add_row(label, Text(untrusted(desc)) + Text("\n") + place)
    return table


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def pulled(p, out: Console = console) -> None:
    """What `sage models pull` did (a sage.presets.Pulled)."""
    where = Text(untrusted(str(p.path)), style="green")
    size = _size(p.size)
    what = {
        "downloaded": f"{p.name}: downloaded ({size}) to ",
        "present": f"{p.name}: already downloaded ({size}; --force downloads it again): ",
        "embedded": f"{p.name}: ships in the {p.source}, no download needed ({size}): ",
        "assembled": f"{p.name}: ships in the {p.source}, no download needed; joined ({size}) into ",
    }[p.status]
    out.print(Text(untrusted(what)) + where, soft_wrap=True)


from sage.cli.ui.ask import AskView  # noqa: E402  (it uses the helpers above)

__all__ = ["AskView", "BenchView", "console", "err_console", "error", "legend", "live_proposal", "models_table", "pulled", "tint"]

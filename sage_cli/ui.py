"""Rich views: the only place that formats terminal output.

One console for the views (stdout) and one for errors (stderr), with named styles.
`--json` output bypasses all of this and contains no markup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.theme import Theme

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
    filled = max(0, min(width, round(value * width)))
    return Text("█" * filled + "░" * (width - filled), style=confidence_style(value))


def error(message: str) -> None:
    """One line on stderr, no markup interpretation of the message."""
    err_console.print(Text("error: ", style="error") + Text(message), soft_wrap=True)


def legend() -> Text:
    t = Text("token certainty: ", style="dim")
    for label, style in (("p≥0.8", "tok.sure"), ("≥0.5", "tok.mild"), ("≥0.2", "tok.unsure"), ("<0.2", "tok.doubt")):
        t.append(label, style=style)
        t.append(" ")
    return t


class AskView:
    """Live view of `sage ask`: header, streamed tokens, then steps and answer."""

    def __init__(self, out: Console = console) -> None:
        self.out = out

    def header(self, problem: str, model_name: str, description: str, prompt_tokens: int) -> None:
        self.out.print(Text("Problem ", style="title") + Text(problem))
        self.out.print(Text(f"model {model_name} · {description} · prompt {prompt_tokens} tokens", style="dim"))
        self.out.print(legend())
        self.out.rule(style="dim")

    def token(self, text: str, prob: float) -> None:
        # soft_wrap: the terminal wraps; Rich does not know the column mid-line
        self.out.print(Text(text, style=tint(prob)), end="", soft_wrap=True)
        self.out.file.flush()

    def summary(self, trace, saved: Path | None) -> None:
        self.out.print()
        self.out.rule(style="dim")
        if trace.steps:
            table = Table(title="Steps", title_style="title", show_edge=False, expand=True)
            table.add_column("#", justify="right", style="dim", no_wrap=True)
            table.add_column("step", ratio=1)
            table.add_column("confidence", no_wrap=True)
            for s in trace.steps:
                conf = bar(s.confidence)
                conf.append(f" {s.confidence:.2f}")
                table.add_row(str(s.index + 1), Text(s.text), conf)
            self.out.print(table)
        self.out.print(self.answer_panel(trace))
        t = trace.timings
        facts = [f"{len(trace.tokens)} tokens", f"{t.get('tokens_per_s', 0):.1f} tok/s"]
        if "first_token_s" in t:
            facts.append(f"first token {t['first_token_s']:.2f} s")
        facts.append(f"finish: {trace.finish_reason}")
        self.out.print(Text(" · ".join(facts), style="dim"))
        if saved:
            self.out.print(Text(f"trace saved to {saved}", style="dim"))

    @staticmethod
    def answer_panel(trace) -> Panel:
        a = trace.answer
        if a is None or a.value is None:
            body = Text("no final answer found in the output", style="warn")
        else:
            body = Text("Answer ", style="bold") + Text(a.value, style="answer")
            if a.confidence is not None:
                body.append("   confidence ")
                body.append_text(bar(a.confidence))
                body.append(f" {a.confidence:.2f}")
        return Panel(body, expand=False, border_style="green" if a and a.value else "yellow")

    def interrupted(self, saved: Path) -> None:
        self.out.print()
        self.out.print(Text(f"interrupted; partial trace saved to {saved}", style="warn"))


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

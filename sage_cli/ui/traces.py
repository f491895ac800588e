"""The list of `sage traces list`: two lines a trace, so that it reads at 60 columns
(the ids are in --json and `sage traces path N`)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from sage.cli.ui.outcome import TRUST
from sage.cli.ui.safe import untrusted

PROBLEM_CHARS = 200


def _when(created: str) -> str:
    # 2026-12-03T18:58:00.550423+0000 -> 2026-12-03 18:58 UTC
    return created[:16].replace("T", " ") + " UTC" if created else ""


def traces_table(rows: list[dict]) -> Group:
    styles = {word: style for _, word, _, style in TRUST}
    grid = Table.grid(padding=(0, 1), expand=True)
    grid.add_column(justify="right", no_wrap=True, style="dim")
    grid.add_column(ratio=1)
    for r in rows:
        if "error" in r:
            grid.add_row(str(r["number"]), Text(untrusted(r["error"], False), style="warn"))
            continue
        head = Text(_when(r["created"]), style="dim")
        head.append(" · ")
        head.append(untrusted(r["model"], False))
        if r.get("expected") == "open":
            head.append(" · an open question (no short answer)", style="dim")
        elif r["answer"] is None:
            head.append(" · no answer" + (" (cut off)" if r.get("finish") in ("length", "context", "interrupted")
                                          else ""), style="warn")
        else:
            head.append(" · answer ")
            head.append(untrusted(r["answer"], False), style="bold")
        if r["trust"]:
            head.append(" · ")
            head.append(f"{r['trust']} trust {round(r['share'] * r['samples'])}/{r['samples']}",
                        style=styles.get(r["trust"], ""))
        elif r.get("samples"):
            lead = (f"most samples answer {untrusted(r['leader'], False)} ({r['leader_n']}/{r['samples']})"
                    if r.get("leader") is not None else f"no sample answered ({r['samples']} samples)")
            head.append(" · " + lead, style="dim")
        elif r.get("expected") != "open":
            head.append(" · not sampled", style="dim")
        problem = " ".join(r["problem"].split())
        if len(problem) > PROBLEM_CHARS:
            problem = problem[: PROBLEM_CHARS - 1] + "…"
        line = Text(untrusted(problem, False), overflow="ellipsis", no_wrap=True)
        grid.add_row(str(r["number"]), Group(head, line))
    return Group(Text("Saved traces, newest first (sage traces show N)", style="title"), grid)

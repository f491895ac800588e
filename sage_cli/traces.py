"""`sage traces`: the runs `sage ask` saved, listed, shown and removed (like `llm logs`).

Every `sage ask` writes its trace to the user data dir's traces/ (the file name is the
run's UTC time, e.g. 20261203T185800.550423Z.json) and a copy as last.json. A trace is
named by that stem, any unique prefix of it, `last`, or its number in the list (1 is the
newest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from sage.errors import SageError
from sage.paths import sage_home
from sage.cli.options import JsonOpt, user_errors

app = typer.Typer(
    help="List, show and remove the traces `sage ask` saved (newest first).\n\nExample: sage traces list -n 5",
    invoke_without_command=True,
    no_args_is_help=False,
)


def trace_dir() -> Path:
    return sage_home() / "traces"


def trace_files() -> list[Path]:
    """The saved traces, newest first (their names sort by time)."""
    d = trace_dir()
    if not d.is_dir():
        return []
    return sorted((p for p in d.glob("*.json") if p.is_file()), key=lambda p: p.name, reverse=True)


def find_trace(name: str) -> Path:
    """A trace by stem, unique stem prefix, 'last', or number in the list (1 = newest)."""
    files = trace_files()
    if not files:
        raise SageError(f"no saved traces in {trace_dir()}: run `sage ask \"PROBLEM\"` first")
    if name == "last":
        return files[0]
    if name.isdigit() and len(name) <= 6:
        i = int(name)
        if not 1 <= i <= len(files):
            have = "there is 1 saved trace" if len(files) == 1 else f"there are {len(files)} saved traces"
            raise SageError(f"{have}; {name} is not one of their numbers (1 is the newest)")
        return files[i - 1]
    stem = name[:-5] if name.endswith(".json") else name
    exact = [p for p in files if p.stem == stem]
    if exact:
        return exact[0]
    hits = [p for p in files if p.stem.startswith(stem)] if stem else []
    if not hits:
        raise SageError(f"no saved trace named {name!r} (sage traces list shows them)")
    if len(hits) > 1:
        raise SageError(f"{name!r} names {len(hits)} traces ({hits[0].stem}, {hits[1].stem}, ...); give more of the name")
    return hits[0]


def summary_row(path: Path, number: int) -> dict:
    """What the list shows of a trace; a file that is not a readable trace says so."""
    from sage.trace import TraceError, load_trace

    row = {"number": number, "id": path.stem, "path": str(path)}
    try:
        t = load_trace(path)
    except TraceError as e:
        row["error"] = str(e)
        return row
    a = t.answer
    value = a.value if a is not None else None
    row.update(created=t.created, model=t.model.name, problem=t.problem, answer=value,
               expected=a.expected if a is not None else "number", tokens=len(t.tokens),
               finish=t.finish_reason, share=None, samples=None, trust=None)
    oc = t.analysis.outcomes if t.analysis is not None else None
    if oc is not None and oc.start is not None and oc.start.n and value is not None:
        from sage.cli.ui.outcome import estimate, trust

        k = oc.start.count(value)
        est = estimate(t)
        row.update(share=k / oc.start.n, samples=oc.start.n, trust=trust(est[0] if est else k / oc.start.n)[0])
        if est is not None and est[1]:
            row.update(calibrated=est[0])
    elif oc is not None and oc.start is not None and oc.start.n:
        row.update(samples=oc.start.n, leader=oc.start.leader, leader_n=oc.start.count(oc.start.leader))
    return row


@app.callback(invoke_without_command=True)
def traces(
    ctx: typer.Context,
    count: Annotated[int, typer.Option("--count", "-n", help="With no command: how many to list (0: all).")] = 20,
    json_out: JsonOpt = False,
) -> None:
    """List, show and remove the traces `sage ask` saved (newest first).

    A trace is named by its id (the file name without .json), a unique prefix of it,
    `last`, or its number in the list (1 = the newest).

    Example: sage traces list -n 5; sage traces show 2; sage traces rm 2
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_traces, count=count, json_out=json_out)


@app.command("list")
@user_errors
def list_traces(
    count: Annotated[int, typer.Option("--count", "-n", help="How many of the newest to list (0: all).")] = 20,
    json_out: JsonOpt = False,
) -> None:
    """List saved traces, newest first: number, id, model, answer, trust, problem."""
    if count < 0:
        raise SageError("--count must be >= 0")
    files = trace_files()
    shown = files if count == 0 else files[:count]
    rows = [summary_row(p, i + 1) for i, p in enumerate(shown)]
    if json_out:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return
    from sage.cli.ui import console, err_console
    from sage.cli.ui.traces import traces_table

    if not rows:
        err_console.print(f"no saved traces in {trace_dir()}", markup=False, highlight=False)
        return
    console.print(traces_table(rows))
    if len(files) > len(shown):
        err_console.print(f"{len(files) - len(shown)} older not shown (sage traces list -n 0 lists all)",
                          markup=False, highlight=False, style="dim")


@app.command("show")
@user_errors
def show(
    name: Annotated[str, typer.Argument(metavar="TRACE", help="Id, unique prefix, last, or number (1 = newest).")] = "last",
    json_out: JsonOpt = False,
) -> None:
    """Show a saved trace as `sage explain` does (the tree), or as JSON."""
    from sage.trace import load_trace

    path = find_trace(name)
    trace = load_trace(path)
    if json_out:
        print(json.dumps(trace.to_dict(), ensure_ascii=False))
        return
    from sage.cli.ui.tree import show_tree

    show_tree(trace)


@app.command("path")
@user_errors
def path(name: Annotated[Optional[str], typer.Argument(metavar="[TRACE]", help="A trace; default: the folder.",
                                                       show_default=False)] = None) -> None:
    """Print the folder the traces are saved in, or one trace's file."""
    print(find_trace(name) if name else trace_dir())


@app.command("rm")
@user_errors
def remove(
    names: Annotated[Optional[list[str]], typer.Argument(metavar="TRACE...", help="Traces to remove.",
                                                         show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Remove every saved trace.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="With --all: do not ask.")] = False,
) -> None:
    """Remove saved traces (and last.json when it is a copy of one of them).

    Example: sage traces rm 1 3; sage traces rm --all --yes
    """
    from sage.cli.ui import err_console

    if all_ and names:
        raise SageError("give traces or --all, not both")
    if not all_ and not names:
        raise SageError("name the traces to remove (sage traces list shows them), or --all")
    if all_:
        paths = trace_files()
        if not paths:
            err_console.print("no saved traces", markup=False, highlight=False)
            return
        if not yes:
            if not typer.confirm(f"remove all {len(paths)} saved traces in {trace_dir()}?", err=True):
                raise typer.Exit(1)
    else:
        paths = list(dict.fromkeys(find_trace(n) for n in names))  # all found before any is removed
    last = sage_home() / "last.json"
    try:
        last_bytes = last.read_bytes() if last.is_file() else None
    except OSError:
        last_bytes = None
    for p in paths:
        try:
            same = last_bytes is not None and p.read_bytes() == last_bytes
            p.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise SageError(f"cannot remove {p}: {e.strerror or e}") from None
        if same:
            last.unlink(missing_ok=True)
            last_bytes = None
    err_console.print(f"removed {len(paths)} trace{'s' if len(paths) != 1 else ''}", markup=False, highlight=False)

"""`sage explain --tree [TRACE]`: a saved trace as a tree, optionally exported (SVG, HTML report).

Reads the trace file only: no model is loaded and nothing heavy is imported, unless
--exact asks for exact eq. 7 on the trace's model (torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sage.errors import SageError
from sage.paths import atomic_files
from sage.cli.options import JsonOpt, user_errors

HOW_TO_READ = """How to read sage's output:

- **Tint**: each word is coloured by how sure the model was of it (the probability of its
  least certain token): plain ≥ 0.8, yellow ≥ 0.5, orange ≥ 0.2, red below. Sure words can
  still be wrong: the tint is the model's certainty, not correctness.

- **Underlined** while the chain streams: a possible fork (another word was nearly as
  likely). The analysis then checks it.

- **Answer and trust**: sage asks the model the same problem again several times
  (samples) and counts how often it reaches the answer. That share is the answer's
  trust: high ≥ 80 %, medium ≥ 50 %, low ≥ 20 %, very low below (probably wrong); the
  answer is coloured by it. The 90 % interval says how rough the share is with that few
  samples. Where the model's trained heads were calibrated on held-out answers (`sage
  heads show` says so), the trust word rests instead on their estimate of the chance the
  answer is right, shown with how far such estimates were off on those answers (ECE);
  the samples' own share stays beside it. "No answer" means the chain gave none: it was cut off (raise --max-tokens) or
  stated no final value; sage never guesses one from the middle of a sentence or a list
  number. A note under the answer flags an option letter whose value belongs to another
  option. Questions without a short answer ("Why is the sky blue?") get none to check:
  sage shows where the model was unsure, but cannot count answers or judge the words.

- **How often the model reaches the answer when continued from each step**: the same,
  from the chain cut after step 1, 2, ...; where the share jumps, that step decided the
  answer ("answer moved here").

- **Forks** (①, ②): words inside such a step where sage forced each alternative and let
  the model continue many times. "as written → 18 ×7 of 8 samples" is where the chosen
  word leads, "instead → ..." where an alternative leads. The fork score is 0 when they
  lead to the same answers, 1 when to entirely different ones; p is how often a
  difference this large comes from chance alone (small p: not chance).

- **Possible decision points** (with --budget 0): proposed from attention and uncertainty,
  not measured; a guess, not evidence.
"""


def _check_target(path: Path, force: bool) -> None:
    try:
        _check_target_path(path, force)
    except OSError as e:  # a name too long, a path through a file
        raise SageError(f"cannot write {path}: {e.strerror or e}") from None


def _check_target_path(path: Path, force: bool) -> None:
    if path.is_dir():
        raise SageError(f"{path} is a directory; give a file name")
    if path.exists() and not force:
        raise SageError(f"{path} exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise SageError(f"cannot write {path}: directory {path.parent} does not exist")


@user_errors
def explain(
    trace: Annotated[
        Optional[Path],
        typer.Argument(
            metavar="TRACE",
            help="A trace file, or a saved run by its number, name or 'last' (sage traces lists them). "
            "Default: the latest run.",
            show_default=False,
        ),
    ] = None,
    tree: Annotated[
        bool, typer.Option("--tree", help="Show the reasoning as a tree (the default view).")
    ] = False,
    svg: Annotated[
        Optional[Path], typer.Option("--svg", metavar="FILE", help="Also write the tree as SVG.", show_default=False)
    ] = None,
    html: Annotated[
        Optional[Path], typer.Option("--html", metavar="FILE", help="Also write a self-contained HTML report (opens in any browser, no network).", show_default=False)
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing export files.")] = False,
    json_out: JsonOpt = False,
    exact: Annotated[
        bool,
        typer.Option(
            "--exact",
            help="Also compute exact eq. 7 (true gradients on the torch reference model of the trace's GGUF): "
            "what each step depends on most, each decision point's exact significance and rank against the "
            "proxy's. Loads the model.",
        ),
    ] = False,
) -> None:
    """Show a saved reasoning trace as a tree: the steps along the chosen path, and at each
    decision point the alternatives and the answers they lead to.

    Reads TRACE, by default last.json of the latest `sage ask` ($SAGE_HOME overrides).

    No model is loaded, except with --exact: it recomputes the significance with true
    gradients on the trace's model file. --svg also writes the tree to a file; --html writes a
    self-contained report page (the chain, its forks, the outcome plot) that opens in any browser.

    --json prints the trace itself (with --exact, the exact report under "exact_report").

    Example: sage explain --tree --svg reasoning.svg
    """
    from sage.api import explain as explain_trace
    from sage.cli.ui.tree import exact_status, export_tree, exported, show_exact, show_tree

    del tree  # the tree is the only view; the flag is accepted as users type it
    if trace is not None and not trace.exists() and len(trace.parts) == 1:
        from sage.cli.traces import find_trace

        trace = find_trace(str(trace))  # a saved run: "2", "last", a name or its prefix
    loaded = explain_trace(trace).trace
    exports = [(p, fmt) for p, fmt in ((svg, "svg"), (html, "html")) if p is not None]
    if svg is not None and html is not None and svg.resolve() == html.resolve():
        raise SageError("--svg and --html name the same file")
    for path, _ in exports:
        _check_target(path, force)  # before any output: refuse early, not after rendering

    report = None
    if exact:  # before any output, so that a refusal is the only line
        with exact_status():
            report = explain_trace(loaded, exact=True).exact
    if json_out:
        import json

        data = loaded.to_dict()
        if report is not None:
            from dataclasses import asdict

            data["exact_report"] = asdict(report)
        print(json.dumps(data, ensure_ascii=False))
    else:
        show_tree(loaded)
        if report is not None:
            show_exact(report)
    # all exports or none: each is written to a temp file beside it, renamed when all are
    docs = [export_tree(loaded, fmt) for _, fmt in exports]
    path = None
    try:
        with atomic_files([p for p, _ in exports]) as tmps:
            for (path, _), tmp, doc in zip(exports, tmps, docs):
                with open(tmp, "x", encoding="utf-8") as f:
                    f.write(doc)
    except OSError as e:
        raise SageError(f"cannot write {path}: {e.strerror or e}") from None
    for path, fmt in exports:
        exported(fmt, path)


explain.__doc__ = explain.__doc__.rstrip() + "\n\n" + HOW_TO_READ

"""`sage explain --tree [TRACE]`: a saved trace as a tree, optionally exported to SVG/HTML.

Reads the trace file only: no model is loaded and nothing heavy is imported, unless
--exact asks for exact eq. 7 on the trace's model (torch).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from model.errors import SageError
from model.trace import Dependency, Trace, load_trace
from sage_cli.common import sage_home, user_errors

EXACT_TOP = 3  # earlier tokens shown per step


@dataclass
class DecisionCheck:
    """A decision point of the trace under exact eq. 7. Significance of a generated token:
    its largest normalized significance over the steps (as Decision.significance); rank
    among the generated tokens that could be decision points (non-blank text), 1 = most."""

    rank: int  # the decision's rank in the trace
    step: int
    text: str
    recorded: float  # significance the trace recorded (the proxy's, or exact with ask --exact)
    exact: float
    exact_rank: int
    proxy: float  # the proxy formula on the torch model's attention and values
    proxy_rank: int


@dataclass
class ExactReport:
    method: str  # how the gradient factor was computed
    attention: str  # how the attention rows w_ij were aggregated
    spearman: float | None  # proxy formula vs exact: mean per-step Spearman (None: undefined)
    timings: dict[str, float]  # exact_s, forward_s, backward_s, load_s
    n_ranked: int  # generated tokens ranked
    steps: list[tuple[int, list[Dependency]]]  # per step: its most significant earlier tokens (exact)
    decisions: list[DecisionCheck]


def trace_heads(trace: Trace, model_path: Path):
    """The SAGE heads sidecar the trace was analyzed with, found as `sage ask` finds one
    (beside the model, the user dir, the shipped one) and recognized by its description;
    None for the built-in analytic heads or when it is not found."""
    recorded = trace.analysis.heads if trace.analysis is not None else None
    if not recorded or "sidecar" not in recorded:
        return None
    from model.heads import SageHeads, find_heads
    from sage_cli.presets import Resolved

    where = find_heads(model_path, Resolved(model_path, trace.model.name).preset, sage_home() / "heads")
    if where is None:
        return None
    try:
        heads = SageHeads.load(where)
    except SageError:
        return None
    return heads if heads.describe() == recorded else None


def exact_report(trace: Trace, top: int = EXACT_TOP) -> ExactReport:
    """Exact eq. 7 over a saved trace with the trace's own model file (imports torch)."""
    import math

    import numpy as np

    path = Path(trace.model.path)
    if not path.is_file():
        raise SageError(f"--exact needs the model that made this trace, and there is no file at {path}")
    if not trace.tokens or not trace.steps:
        raise SageError("--exact: the trace has no generated steps")
    from model.engine import Engine
    from model.exact import exact_significance, proxy_agreement
    from model.inverse import map_prompt

    heads = trace_heads(trace, path)
    # the tokenizer (the prompt is re-tokenized as `sage ask` did) and, with the trace's
    # own SAGE heads, the tracker's layers and head weights that aggregate the attention
    eng = Engine(path, n_ctx=256, heads=heads, track=heads is not None)
    try:
        res = exact_significance(trace, engine=eng)
        prompt_tokens = eng.tokenize(trace.prompt)
        texts = map_prompt(eng, prompt_tokens, trace.prompt, trace.problem).texts + [t.text for t in trace.tokens]
    finally:
        eng.close()
    rho = proxy_agreement(trace, res)
    n_prompt = res.n_prompt
    steps = []
    for s in trace.steps:
        row, mask = res.significance[s.index], res.candidates[s.index]
        order = [int(j) for j in np.argsort(-row, kind="stable") if mask[j] and row[j] > 0][:top]
        deps = [
            Dependency(j, texts[j], "prompt" if j < n_prompt else "output", float(row[j])) for j in order
        ]
        steps.append((s.index, deps))

    def best(sig: np.ndarray) -> np.ndarray:  # (n_gen,) a generated token's largest significance
        return sig[:, n_prompt:].max(axis=0)

    eligible = np.array([bool(t.text.strip()) for t in trace.tokens])
    ex, px = best(res.significance), best(res.proxy)

    def rank(v: np.ndarray, k: int) -> int:
        return 1 + int((v[eligible] > v[k]).sum())

    checks = [
        DecisionCheck(d.rank, d.step, d.text, d.significance, float(ex[d.token_index]), rank(ex, d.token_index),
                      float(px[d.token_index]), rank(px, d.token_index))
        for d in sorted(trace.analysis.decisions if trace.analysis else [], key=lambda d: d.rank)
        if 0 <= d.token_index < len(trace.tokens)
    ]
    if heads is not None:
        n = int((heads.head_weights > 0).sum())
        attention = f"{heads.describe()}: {n} heads in layers {', '.join(map(str, heads.tracked_layers))}"
    else:
        attention = f"mean over all heads of layers {', '.join(map(str, res.layers))}"
    return ExactReport(
        method=res.method,
        attention=attention,
        spearman=rho if math.isfinite(rho) else None,
        timings=dict(res.timings),
        n_ranked=int(eligible.sum()),
        steps=steps,
        decisions=checks,
    )


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temp file in the same directory and a rename (never half a file)."""
    # open("x") rather than mkstemp: the export gets the user's umask, not mode 0600
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_target(path: Path, force: bool) -> None:
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
            metavar="TRACE", help="A trace file. Default: last.json in the user data dir.", show_default=False
        ),
    ] = None,
    tree: Annotated[
        bool, typer.Option("--tree", help="Show the reasoning as a tree (the default view).")
    ] = False,
    svg: Annotated[
        Optional[Path], typer.Option("--svg", metavar="FILE", help="Also write the tree as SVG.", show_default=False)
    ] = None,
    html: Annotated[
        Optional[Path], typer.Option("--html", metavar="FILE", help="Also write the tree as HTML.", show_default=False)
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing export files.")] = False,
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
    gradients on the trace's model file. --svg and --html also write the tree to a file.

    Example: sage explain --tree --svg reasoning.svg
    """
    from sage_cli.ui_tree import exact_status, export_tree, exported, show_exact, show_tree

    del tree  # the tree is the only view; the flag is accepted as users type it
    if trace is None:
        trace = sage_home() / "last.json"
        if not trace.exists():
            raise SageError(f"no trace yet: run `sage ask \"PROBLEM\"` first (nothing at {trace})")
    loaded = load_trace(trace)
    exports = [(p, fmt) for p, fmt in ((svg, "svg"), (html, "html")) if p is not None]
    if svg is not None and html is not None and svg.resolve() == html.resolve():
        raise SageError("--svg and --html name the same file")
    for path, _ in exports:
        _check_target(path, force)  # before any output: refuse early, not after rendering

    report = None
    if exact:  # before any output, so that a refusal is the only line
        with exact_status():
            report = exact_report(loaded)
    show_tree(loaded)
    if report is not None:
        show_exact(report)
    for path, fmt in exports:
        try:
            _write_atomic(path, export_tree(loaded, fmt))
        except OSError as e:
            raise SageError(f"cannot write {path}: {e.strerror or e}") from None
        exported(fmt, path)

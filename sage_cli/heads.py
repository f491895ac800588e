"""`sage heads`: train SAGE heads for a model on outcome distributions it samples, and
show what a sidecar holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from sage.errors import SageError
from sage.cli.options import JsonOpt, MaxTokensOpt, ModelOpt, RayOpt, ThreadsOpt, WorkersOpt, user_errors
from sage.paths import heads_dir

app = typer.Typer(
    name="heads",
    help="Train and inspect SAGE heads (tracking heads, inverse analysis layer, meta-cognitive head).\n\n"
    "Example: sage heads train --n-problems 128 --seed 0",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal
)


def _check_out(out: Path, force: bool) -> None:
    if out.is_dir():
        raise SageError(f"{out} is a directory; give a file name")
    if not out.name.endswith(".sage.gguf"):
        raise SageError(f"{out}: a heads sidecar is named NAME.sage.gguf")
    if out.exists() and not force:
        raise SageError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise SageError(f"cannot write {out}: directory {out.parent} does not exist")


@app.command("train")
@user_errors
def train(
    model: ModelOpt = None,
    n: Annotated[int, typer.Option("--n-problems", "-N", help="Problems: half GSM8K-train (the sample shipped with sage, or $SAGE_DATA's), half arithmetic.")] = 64,
    holdout: Annotated[float, typer.Option("--holdout", help="Share of the problems held out for evaluation.")] = 0.25,
    seed: Annotated[int, typer.Option("--seed", "-s", help="Seed of the problem sample, the token sample and training.")] = 0,
    max_tokens: MaxTokensOpt = 160,
    sample: Annotated[
        int, typer.Option("--sample", help="Random tokens labelled per fork problem (of those with a plausible "
                          "alternative): the unbiased sample the held-out evaluation rests on.")
    ] = 3,
    candidates: Annotated[
        int, typer.Option("--candidates", help="Analytic candidates (highest significance x (1 - p)) labelled per fork problem.")
    ] = 1,
    samples: Annotated[
        int, typer.Option("--samples", help="Samples per outcome distribution at a labelled token (the chosen token "
                          "and each alternative).")
    ] = 8,
    alternatives: Annotated[
        int, typer.Option("--alternatives", help="Alternatives sampled at a labelled token (as `sage ask`: 2).")
    ] = 2,
    fork_problems: Annotated[
        Optional[int], typer.Option("--fork-problems", help="Problems that get token labels (the rest only answer "
                                    "labels, which cost far less). 0: answers only; the meta-cognitive head is trained and "
                                    "the fork heads stay the analytic ones. Default: all.", show_default=False)
    ] = None,
    depth: Annotated[int, typer.Option("--depth", help="Blocks of the inverse analysis layer (the paper: 6).")] = 6,
    width: Annotated[int, typer.Option("--width", help="Width of the inverse analysis layer.")] = 16,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs (full batch; best validation epoch kept).")] = 300,
    n_heads: Annotated[int, typer.Option("--n-heads", help="Attention heads to track.")] = 8,
    max_layers: Annotated[int, typer.Option("--layers", help="Most layers the tracked heads may span.")] = 4,
    labels: Annotated[
        Optional[Path],
        typer.Option("--labels", help="Labels file (JSON lines), reused and resumed. Default: in the user data dir.",
                     show_default=False),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Sidecar to write. Default: NAME.sage.gguf in the user data dir's heads/, "
                     "where `sage ask` finds it.", show_default=False),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing sidecar.")] = False,
    workers: WorkersOpt = None,
    ray: RayOpt = None,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Train SAGE heads on outcome distributions sampled from the model and write NAME.sage.gguf.

    Every problem is answered greedily with attention tracking, and its answers are
    sampled from the problem alone, as `sage ask` does. On the fork problems, a few
    analytic candidates and a seeded random sample of the tokens that had a plausible
    alternative get outcome distributions (--samples continuations after the chosen token
    and after each of its --alternatives), with a seed of their own. A token's label: it
    is a fork (fork score >= 0.3, permutation p < 0.1). An answer's label: it is right.
    Then the tracking heads are chosen by how well their attention ranks the forks, the
    inverse analysis layer (from its analytic start) and the meta-cognitive head are
    trained with torch on CPU, and all is evaluated on the held-out problems as `sage ask`
    runs them, against the labels' independent samples: proposal AUROC on the random
    tokens (trained, analytic, entropy alone, the feature ablation), recall of the forks
    among the candidates, answer-confidence calibration (ECE).

    Labels are saved as they are collected: an interrupted run resumes. Collection runs
    over --workers processes (default: one per core, one thread each on 2 cores), each
    with its own copy of the model, or over Ray actors (--ray); the rest runs here.

    Example: sage heads train --n-problems 128 --fork-problems 64 --seed 0
    """
    from sage.heads import heads_name
    from sage.presets import resolve_model

    from sage.workers import available_cores

    if ray is not None:
        from sage.workers import check_ray_address

        check_ray_address(ray)
    if workers is None and ray is None:
        workers = available_cores()
    if threads is not None and not 1 <= threads <= 512:
        raise SageError("--threads must be between 1 and 512")
    for name, v, lo in (("--workers", 1 if workers is None else workers, 1), ("--n-problems", n, 4), ("--max-tokens", max_tokens, 8), ("--sample", sample, 0), ("--candidates", candidates, 0), ("--samples", samples, 2),
                        ("--alternatives", alternatives, 1), ("--fork-problems", 4 if fork_problems is None else fork_problems, 0),
                        ("--depth", depth, 1),
                        ("--width", width, 2), ("--epochs", epochs, 1), ("--n-heads", n_heads, 1),
                        ("--layers", max_layers, 1)):
        if v < lo:
            raise SageError(f"{name} must be at least {lo}")
    if not 0.0 < holdout < 1.0:
        raise SageError("--holdout must be between 0 and 1")
    resolved = resolve_model(model)
    from sage.engine import check_gguf_file

    check_gguf_file(resolved.path)
    name = heads_name(resolved.path, resolved.preset)
    out = out or heads_dir() / name
    if out == heads_dir() / name:
        out.parent.mkdir(parents=True, exist_ok=True)
    _check_out(out, force)  # before the long part, not after it
    labels = labels or heads_dir() / f"{name[: -len('.sage.gguf')]}.labels-seed{seed}-max{max_tokens}.jsonl"
    if labels.is_dir():
        raise SageError(f"--labels {labels} is a directory; give a file name")

    from sage.reference.train import TrainSettings, train as run_train
    from sage.reference.train import training_problems
    from sage.cli.ui.heads import HeadsView

    training_problems(n, seed, holdout)  # refuse missing data now
    if sample + candidates < 1:
        raise SageError("--sample and --candidates label no token at all; give at least one")
    if alternatives > 5:
        raise SageError("--alternatives must be at most 5 (the alternatives a token keeps)")
    s = TrainSettings(model_path=resolved.path, base_name=resolved.preset or resolved.path.name,
                      preset=resolved.preset, n=n, holdout=holdout, seed=seed, max_tokens=max_tokens, n_sample=sample,
                      n_candidates=candidates, samples=samples, alternatives=alternatives,
                      fork_problems=fork_problems, depth=depth, width=width, epochs=epochs, n_heads=n_heads,
                      max_layers=max_layers, labels=labels, n_threads=threads, workers=workers, ray=ray)
    view = None if json_out else HeadsView()
    if view:
        with view.live(n) as on_event:
            res = run_train(s, on_event)
    else:
        res = run_train(s)
    cmd = (f"sage heads train --model {resolved.name} --n-problems {n} --holdout {holdout} --seed {seed} "
           f"--max-tokens {max_tokens} --sample {sample} --candidates {candidates} --samples {samples} "
           f"--alternatives {alternatives}" + (f" --fork-problems {fork_problems}" if fork_problems is not None else "")
           + f" --depth {depth} --width {width} --epochs {epochs} --n-heads {n_heads} --layers {max_layers}")
    res.heads.info["command"] = cmd
    res.heads.save(out, force=force)
    if json_out:
        print(json.dumps({"sidecar": str(out), "labels": str(labels), "metrics": res.metrics}))
    else:
        view.results(res.heads, res.metrics, out, labels)


@app.command("show")
@user_errors
def show(
    sidecar: Annotated[
        Optional[Path],
        typer.Argument(metavar="SIDECAR", help="A NAME.sage.gguf. Default: the heads `sage ask` uses for --model.",
                       show_default=False),
    ] = None,
    model: ModelOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show what a heads sidecar holds: the base model, tracked heads, the inverse layer,
    and the metrics measured when it was trained.

    Example: sage heads show
    """
    from sage.heads import SageHeads, resolve_heads
    from sage.cli.ui.heads import HeadsView

    if sidecar is None:
        from sage.presets import resolve_model

        resolved = resolve_model(model)
        sidecar = resolve_heads(None, resolved.path, resolved.preset)
        if sidecar is None:
            raise SageError(f"no heads sidecar for {resolved.name}: `sage ask` uses the built-in analytic heads; "
                            "train some with `sage heads train`")
    else:
        sidecar = resolve_heads(sidecar)
    heads = SageHeads.load(sidecar)
    if json_out:
        print(json.dumps(HeadsView.summary(heads, sidecar)))
    else:
        HeadsView().show(heads, sidecar)

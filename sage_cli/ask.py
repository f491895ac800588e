"""`sage ask "problem"`: reason step by step, streamed, then steps and answer."""

from __future__ import annotations

import json
import time
from typing import Annotated, Optional

import typer

from sage.cli.options import JsonOpt, MaxTokensOpt, ModelOpt, SeedOpt, ThreadsOpt, read_problem, user_errors
from sage.paths import sage_home

T_IMPORT = time.time()  # fallback start time where /proc is not available
MAX_CTX = 1 << 20  # tokens; llama.cpp would try to allocate the KV cache of whatever it is given


@user_errors
def ask(
    problem: Annotated[
        Optional[str],
        typer.Argument(help="The problem to reason about; - (or nothing, with a pipe) reads it from stdin.",
                       show_default=False),
    ] = None,
    model: ModelOpt = None,
    max_tokens: MaxTokensOpt = 512,
    temperature: Annotated[
        float, typer.Option("--temp", "--temperature", help="Temperature of the chain; 0 = greedy.")
    ] = 0.0,
    seed: SeedOpt = 0,
    ctx: Annotated[
        int,
        typer.Option("--ctx-size", "-c", "--ctx",
                     help="Context size in tokens (the chain and the samples decoded with it share it)."),
    ] = 8192,
    threads: ThreadsOpt = None,
    track: Annotated[
        bool, typer.Option("--track/--no-track", help="Track attention and run the inverse analysis.")
    ] = True,
    threshold: Annotated[
        Optional[float],
        typer.Option(
            "--threshold",
            help="Least proposal score of a candidate token: normalized significance with analytic heads "
            "(default 0.3, the paper's), the decision score with trained heads (default: the sidecar's own). "
            "The most uncertain token of a step where the answer moved is measured as well.",
        ),
    ] = None,
    max_decisions: Annotated[int, typer.Option("--max-decisions", help="Most decision points to keep.")] = 3,
    alternatives: Annotated[
        int, typer.Option("--alternatives", help="Alternatives sampled per candidate token (0-5).")
    ] = 2,
    budget: Annotated[
        Optional[int],
        typer.Option("--budget", help="Tokens to spend sampling outcome distributions (default 6000: about a "
                     "minute on 2 cores with the embedded model); 0: none, the heads' proposals only.",
                     show_default=False),
    ] = None,
    samples: Annotated[int, typer.Option("--samples", help="Most samples per outcome distribution.")] = 16,
    vote: Annotated[bool, typer.Option("--vote", help="Also print the most frequent answer of the samples.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="The full detail: every step's numbers, every candidate, the explanation.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the answer (nothing when there is none); for scripts.")
    ] = False,
    sample_temperature: Annotated[
        Optional[float],
        typer.Option("--sample-temperature", help="Temperature of the samples (default: the preset's "
                     "recommended sampling, else 1).", show_default=False),
    ] = None,
    sample_top_p: Annotated[
        Optional[float], typer.Option("--sample-top-p", help="Nucleus (top-p) of the samples.", show_default=False)
    ] = None,
    sample_top_k: Annotated[
        Optional[int], typer.Option("--sample-top-k", help="Top-k of the samples (0: all).", show_default=False)
    ] = None,
    heads: Annotated[
        Optional[str],
        typer.Option(
            "--heads",
            help="SAGE heads sidecar (NAME.sage.gguf); default: the one beside the model if any; 'none' for the built-in analytic heads.",
            show_default=False,
        ),
    ] = None,
    exact: Annotated[
        bool,
        typer.Option(
            "--exact",
            help="Decision points from exact eq. 7 (true gradients on the torch reference model of the same GGUF) "
            "instead of the fast proxy; reports how well the proxy agrees. Slower.",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Reason step by step about a problem, with each token tinted by the model's certainty.

    With tracking (the default) sage then looks back over the chain: significance of
    earlier tokens for each step (SAGE-nano eq. 7), then outcome distributions sampled
    from the model itself within --budget tokens: from the problem alone (the answer's
    confidence: the share of samples that reach it), after every step (where the answer
    moves), and at the candidate tokens of the steps where it moved, for the chosen token
    and its alternatives (the fork score); then an explanation from those numbers. --exact computes the significance with true
    gradients (a forward and a backward pass per step on the torch model) instead of
    the fast proxy. The trace is saved under the user data dir
    ($SAGE_HOME overrides) as last.json; `sage explain --tree` shows it as a tree.

    Example: sage ask "Tom has 3 boxes of 12 eggs and uses 7. How many eggs are left?"
    """
    from sage.api import Asking
    from sage.errors import SageError
    from sage.reason import process_start_time
    from sage.trace import save_trace
    from sage.cli.ui import AskView, live_proposal

    problem = read_problem(problem)
    if quiet and json_out:
        raise SageError("--quiet and --json both choose the output: pick one")
    if exact and not track:
        raise SageError("--exact computes the significance of the inverse analysis: drop --no-track")
    if max_tokens < 1:
        raise SageError("--max-tokens must be at least 1")
    if not temperature >= 0 or temperature == float("inf"):  # nan and inf too
        raise SageError("--temperature must be a number >= 0")
    if seed < 0 or seed >= 2**63:
        raise SageError("--seed must be between 0 and 2**63 - 1")
    if not 64 <= ctx <= MAX_CTX:
        raise SageError(f"--ctx must be between 64 and {MAX_CTX} tokens")
    if threads is not None and not 1 <= threads <= 512:
        raise SageError("--threads must be between 1 and 512")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise SageError("--threshold must be between 0 and 1")
    if max_decisions < 0:
        raise SageError("--max-decisions must be >= 0")
    if not 0 <= alternatives <= 5:
        raise SageError("--alternatives must be between 0 and 5")
    if budget is not None and budget < 0:
        raise SageError("--budget must be >= 0 tokens")
    if not 1 <= samples <= 256:
        raise SageError("--samples must be between 1 and 256")
    if sample_temperature is not None and not 0 <= sample_temperature <= 10:
        raise SageError("--sample-temperature must be between 0 and 10")
    if sample_top_p is not None and not 0 < sample_top_p <= 1:
        raise SageError("--sample-top-p must be in (0, 1]")
    if sample_top_k is not None and sample_top_k < 0:
        raise SageError("--sample-top-k must be >= 0")
    t_start = process_start_time() or T_IMPORT
    run = Asking(
        problem, model, max_tokens=max_tokens, temperature=temperature, seed=seed, ctx=ctx, threads=threads,
        track=track, threshold=threshold, max_decisions=max_decisions, alternatives=alternatives, heads=heads,
        exact=exact, t_start=t_start, budget=budget, samples=samples, sample_temperature=sample_temperature,
        sample_top_p=sample_top_p, sample_top_k=sample_top_k,
    )
    view = None if json_out or quiet else AskView(verbose=verbose)
    try:
        if view:
            view.header(run.trace.problem, run.resolved.name, run.engine.info.description, run.trace.prompt_tokens)
        for rec in run:
            if view:
                view.token(rec.text, rec.prob, track and live_proposal(rec))
        if view:
            view.end_chain()
        if track and view:
            with view.analyzing(run.cfg.budget_tokens(), exact) as progress:
                run.analyze(on_progress=progress)
        else:
            run.analyze()
    except KeyboardInterrupt:
        saved = save_trace(run.interrupted(), sage_home())
        if view:
            view.interrupted(saved)
        raise typer.Exit(130) from None
    finally:
        run.close()
    saved = save_trace(run.trace, sage_home())
    if json_out:
        print(json.dumps(run.trace.to_dict(), ensure_ascii=False))
    elif quiet:
        a = run.trace.answer
        if a is not None and a.value is not None:
            print(a.value)
    else:
        view.summary(run.trace, saved, vote=vote)

"""`sage ask "problem"`: reason step by step, streamed, then steps and answer."""

from __future__ import annotations

import json
import time
from typing import Annotated, Optional

import typer

from sage_cli.common import JsonOpt, ModelOpt, sage_home, user_errors

T_IMPORT = time.time()  # fallback start time where /proc is not available


@user_errors
def ask(
    problem: Annotated[str, typer.Argument(help="The problem to reason about.", show_default=False)],
    model: ModelOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed (with --temperature > 0).")] = 0,
    ctx: Annotated[int, typer.Option("--ctx", help="Context size in tokens.")] = 2048,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: all, up to 8).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Reason step by step about a problem, with each token tinted by the model's certainty.

    The trace is saved under the user data dir ($SAGE_HOME overrides) as last.json.

    Example: sage ask "Tom has 3 boxes of 12 eggs and uses 7. How many eggs are left?"
    """
    from model.engine import Engine
    from model.errors import SageError
    from model.reason import ReasonRun, check_problem, process_start_time
    from model.trace import save_trace
    from sage_cli.presets import resolve_model
    from sage_cli.ui import AskView

    check_problem(problem)
    if ctx < 64:
        raise SageError("--ctx must be at least 64 tokens")
    if threads is not None and threads < 1:
        raise SageError("--threads must be at least 1")
    t_start = process_start_time() or T_IMPORT
    resolved = resolve_model(model)
    engine = Engine(resolved.path, n_ctx=ctx, n_threads=threads, name=resolved.name)
    run = ReasonRun(engine, problem, max_tokens=max_tokens, temperature=temperature, seed=seed, t_start=t_start)
    view = None if json_out else AskView()
    if view:
        view.header(run.trace.problem, resolved.name, engine.info.description, run.trace.prompt_tokens)
    try:
        for rec in run:
            if view:
                view.token(rec.text, rec.prob)
    except KeyboardInterrupt:
        saved = save_trace(run.interrupted(), sage_home())
        if view:
            view.interrupted(saved)
        raise typer.Exit(130) from None
    finally:
        engine.close()
    saved = save_trace(run.trace, sage_home())
    if json_out:
        print(json.dumps(run.trace.to_dict(), ensure_ascii=False))
    else:
        view.summary(run.trace, saved)

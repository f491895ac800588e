"""`sage bench`: measured time and memory overhead of inverse reasoning, and its accuracy."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Annotated, Optional

import typer

from sage.cli.options import JsonOpt, MaxTokensOpt, ModelOpt, RayOpt, WorkersOpt, user_errors
from sage.paths import sage_home


@user_errors
def bench(
    problems: Annotated[
        Optional[str],
        typer.Option(
            "--problems",
            "-p",
            help="gsm8k or aqua (a seeded sample of the problems shipped with sage, or of "
            "$SAGE_DATA's full files), arithmetic (generated), or a GSM8K/AQuA JSONL file.",
            show_default=False,
        ),
    ] = None,
    n: Annotated[int, typer.Option("--n-problems", "-N", help="Number of problems.")] = 2,
    reps: Annotated[
        int, typer.Option("--reps", help="Repetitions of every configuration (2 or more give a min and max).")
    ] = 2,
    max_tokens: MaxTokensOpt = 160,
    mem: Annotated[bool, typer.Option("--mem", help="Also measure memory: each configuration in its own process.")] = False,
    accuracy: Annotated[
        bool, typer.Option("--accuracy", help="Score greedy vs the samples' vote (only configurations 1 and 4 run).")
    ] = False,
    budget: Annotated[
        int, typer.Option("--budget", help="Sampled tokens per problem in (4) (sage ask's default is 6000).")
    ] = 2000,
    model: ModelOpt = None,
    heads: Annotated[
        Optional[str],
        typer.Option("--heads", help="SAGE heads sidecar for (2)-(4); default: the one `sage ask` uses; "
                     "'none' for the analytic heads.", show_default=False),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", "-s", help="Seed of the problem sample.")] = 0,
    sequences_arg: Annotated[
        Optional[str],
        typer.Option("--sequences", help="Sequence counts whose decode throughput is measured after the "
                     "configurations, comma-separated (default 1,4,8,16,32; 'none': skip it).", show_default=False),
    ] = None,
    workers: WorkersOpt = None,
    ray: RayOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Measure what inverse reasoning costs against plain generation on the same model.

    Configurations, interleaved per repetition: (0) llama-cpp-python's own generation,
    (1) sage forward only, (2) + attention tracking, (3) + inverse analysis without
    sampling, (4) + sampled outcome distributions within --budget tokens (the whole
    `sage ask`; 2000 here against sage ask's 6000, to keep the bench short). Median,
    min and max over repetitions;
    the paper's 14 % time / 10 % memory claims beside them. Results are saved under
    the user data dir in bench/. The progress bar names the configuration, repetition
    and problem that runs.

    Then it measures the aggregate decode throughput of 1, 4, 8, 16 and 32 sequences at once
    (--sequences), and prints the tracking overhead ((2)'s tokens/s over (1)'s, and which tracker ran) and
    the machine: CPU, threads, the instruction sets llama.cpp's kernels were built for.

    Cost: (4) dominates: its time grows with --budget (the sampled tokens decode at the
    multi-sequence rate measured last). A machine shared with another CPU-heavy job can
    make it several times slower.

    --accuracy runs each problem once, the problems shared out over --workers processes
    (default: one per core), each with its own models; timings need the machine to
    themselves, so the other modes run in one process.

    Example: sage bench --mem --n-problems 5 --reps 3   (longer and steadier than the defaults)
    """
    from sage.bench import (CONFIGS, PAPER, BenchSettings, machine, parse_sequences, run_bench, run_over_workers,
                            summarize, total_steps, tracker_kind, tracking_ratio)
    from sage.problems import problem_set
    from sage.errors import SageError
    from sage.trace import write_json_atomic
    from sage.presets import resolve_model
    from sage.cli.ui import BenchView

    for name, v in (("--max-tokens", max_tokens), ("--n-problems", n), ("--reps", reps)):
        if v < 1:
            raise SageError(f"{name} must be at least 1")
    if budget < 0:
        raise SageError("--budget must be >= 0 tokens")
    seq_counts = parse_sequences(sequences_arg)
    if workers is not None and workers < 1:
        raise SageError("--workers must be at least 1")
    if ray is not None:
        from sage.workers import check_ray_address

        check_ray_address(ray)
    if ((workers is not None and workers > 1) or ray is not None) and not accuracy:
        raise SageError(f"{'--ray' if ray else '--workers'} applies to --accuracy: timings need the machine to themselves")
    if accuracy and workers is None and ray is None:
        from sage.workers import available_cores

        workers = available_cores()
    label, probs = problem_set(problems, n, seed)
    resolved = resolve_model(model)
    from sage.engine import check_gguf_file

    check_gguf_file(resolved.path)
    from sage.heads import resolve_heads

    sidecar = resolve_heads(heads, resolved.path, resolved.preset)
    if sidecar is not None:
        from sage.engine import Engine
        from sage.heads import SageHeads

        with Engine(resolved.path, n_ctx=64, heads=SageHeads.load(sidecar)):
            pass  # a sidecar for another model is refused here, not in a worker
    settings = BenchSettings(model_path=str(resolved.path), max_tokens=max_tokens,
                             heads=str(sidecar) if sidecar else None, budget=budget)
    configs = ("forward", "rollouts") if accuracy else CONFIGS
    view = None if json_out else BenchView()
    if accuracy:  # answers do not change with repetition: once, over the workers
        reps = 1
        total = len(configs) * len(probs)

        def go(step=None):
            return run_over_workers(settings, probs, configs, workers, on_step=step, ray=ray)
    else:
        total = total_steps(len(probs), reps, mem, configs)

        def go(step=None):
            return run_bench(settings, probs, reps=reps, mem=mem, configs=configs, on_step=step)
    if view:
        header = f"sage bench · {resolved.name} · {label} · {reps} reps · ≤{max_tokens} tokens"
        header += " · --mem" if mem else ""
        header += f" · Ray at {ray}" if ray else (f" · {workers} workers" if workers and workers > 1 else "")
        with view.progress(total, header) as step:
            runs = go(step)
    else:
        runs = go()
    table = summarize(runs, probs, mem)
    sequences = None
    if not accuracy and seq_counts:  # what batched rollouts and branch sampling get from this machine
        from sage.bench import multi_sequence_throughput

        if view:
            counts = ", ".join(map(str, seq_counts[:-1])) + (" and " if len(seq_counts) > 1 else "") + str(seq_counts[-1])
            with view.status(f"decoding {counts} sequences at once"):
                sequences = multi_sequence_throughput(resolved.path, sequences=seq_counts)
        else:
            sequences = multi_sequence_throughput(resolved.path, sequences=seq_counts)
    result = {
        "model": resolved.name,
        "model_path": str(resolved.path),
        "problems": label,
        "n_problems": len(probs),
        "reps": reps,
        "workers": (workers or 1) if ray is None else workers,
        "ray": ray,
        "max_tokens": max_tokens,
        "budget": budget,
        "mem": mem,
        "heads": str(sidecar) if sidecar else "analytic (built in)",
        "configs": table,
        "sequences_tokens_per_s": sequences,
        "tracking": {"tracker": tracker_kind(), "decode_ratio": tracking_ratio(table)} if "track" in table else None,
        "machine": machine(),
        "paper": PAPER,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+0000"),
    }
    saved = sage_home() / "bench" / (result["created"].replace(":", "").replace("-", "").replace("+0000", "Z") + ".json")
    write_json_atomic(saved, result)
    if json_out:
        print(json.dumps(result))
    else:
        view.results(result, saved)

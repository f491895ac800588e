"""`sage bench` as a library: what inverse reasoning costs, measured, and what it buys.

Configurations, on the same model, problems and greedy settings:
  0 llama      llama-cpp-python's own `Llama.create_completion` (external baseline)
  1 forward    sage generation only
  2 track      + attention tracking (native eval callback)
  3 analysis   + inverse analysis without sampling (significance, proposals)
  4 rollouts   + sampled outcome distributions at the default budget (the full `sage ask`)
Per repetition the configurations run interleaved (problem by problem) so machine noise
hits them alike; a warm-up pass (one problem, at most WARMUP_TOKENS tokens) is excluded.
With `mem`, each (configuration, repetition) runs in its own subprocess so its peak RSS is
its own; the subprocess reports every problem it starts and finishes to the parent (JSON
lines on its stdout), so progress shows per problem in both modes.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from sage.errors import SageError
from sage.problems import Problem, score


CONFIGS = ("llama", "forward", "track", "analysis", "rollouts")
PAPER = {"time_overhead": 0.14, "memory_overhead": 0.10}
# the warm-up problem's token cap: enough to fault the weights in and build every graph
# (for (4) its chain still has decision points to roll out), not a whole excluded problem
WARMUP_TOKENS = 32


@dataclass
class BenchSettings:
    model_path: str
    max_tokens: int = 160
    n_ctx: int = 4096
    threshold: float = 0.3
    max_decisions: int = 3
    alternatives: int = 2
    threads: int | None = None
    heads: str | None = None  # SAGE heads sidecar for configurations 2-4 (None: the analytic heads)
    budget: int | None = None  # sampled tokens of configuration 4 (None: `sage ask`'s default)


# --- measuring ---------------------------------------------------------------------------


def rss_now() -> int:
    """Current resident set size in bytes (psutil: Linux, macOS, Windows)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (psutil has no portable peak). On
    Linux VmHWM (/proc/self/status):
    getrusage's ru_maxrss keeps, across exec, the high-water mark of the memory the
    process had before it (for a subprocess spawned by vfork, the parent's), so a
    --mem worker would report at least its parent's peak; VmHWM is its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


@dataclass
class Step:
    """What the bench is doing now, for a progress display. `rep` counts from 1 (0: the
    warm-up before the repetitions), `problem` from 1 (0: the warm-up problem); phase
    "load" is loading the model (config "": all configurations' models, in this
    process). Every step is reported when it starts (done False) and, except "load",
    when it is finished (done True): total_steps() of those."""

    config: str
    rep: int
    reps: int
    problem: int
    n: int
    phase: str  # "load" | "warmup" | "problem"
    done: bool = False


def total_steps(n: int, reps: int, mem: bool, configs: tuple[str, ...] = CONFIGS) -> int:
    """How many finished steps run_bench reports: every problem of every configuration and
    repetition, and the warm-ups (one per configuration; with mem, one per process)."""
    return len(configs) * (reps * (n + 1) if mem else 1 + reps * n)


@dataclass
class Run:
    """One configuration over the problem set, once."""

    config: str
    tokens: int = 0  # chain tokens generated
    gen_s: float = 0.0  # generation time (first token to last)
    total_s: float = 0.0  # generation + analysis (+ rollouts)
    rollout_tokens: int = 0
    answers: list = field(default_factory=list)  # per problem: greedy answer
    votes: list = field(default_factory=list)  # per problem: branch-vote answer (config 4)
    spent: list = field(default_factory=list)  # per problem: tokens spent (chain + rollouts)
    mem: dict = field(default_factory=dict)


class Runner:
    """Holds the loaded models of one process and runs configurations on problems."""

    def __init__(self, s: BenchSettings, configs: tuple[str, ...]) -> None:
        from sage.engine import Engine

        self.s = s
        self.mem: dict[str, int] = {"rss_start": rss_now()}
        self.engines: dict[str, object] = {}
        self.llm = None
        need_plain = "forward" in configs
        need_tracked = any(c in configs for c in ("track", "analysis", "rollouts"))
        if "llama" in configs:
            from llama_cpp import Llama

            from sage.engine import default_threads

            self.llm = Llama(s.model_path, n_ctx=s.n_ctx, n_threads=s.threads or default_threads(),
                             n_threads_batch=s.threads or default_threads(), verbose=False)
            self.mem["rss_model"] = rss_now()
        if need_plain:
            self.engines["plain"] = Engine(s.model_path, n_ctx=s.n_ctx, n_threads=s.threads)
            self.mem["rss_model"] = rss_now()
        if need_tracked:
            from sage.inverse import AnalysisConfig

            cfg = AnalysisConfig(max_decisions=s.max_decisions, alternatives=s.alternatives, budget=s.budget)
            n_seq = cfg.n_seq_max() if "rollouts" in configs else 1
            heads = None
            if s.heads:
                from sage.heads import SageHeads

                heads = SageHeads.load(Path(s.heads))
                self.mem["heads"] = os.path.getsize(s.heads)
            self.engines["tracked"] = eng = Engine(s.model_path, n_ctx=s.n_ctx, n_threads=s.threads, track=True,
                                                   n_seq_max=n_seq, heads=heads)
            self.mem["rss_model"] = rss_now()
            eng.tracker.allocate(eng.n_ctx, s.max_tokens + 1)
            self.mem["tracking_buffers"] = int(sum(a.nbytes for a in (eng.tracker.attn, eng.tracker.vattn,
                                                                      eng.tracker.vnorm, eng.tracker.scratch)))
        e = next(iter(self.engines.values()), None)
        if e is not None:
            # f16 K and V for every layer and cell, as llama.cpp allocates them
            self.mem["kv_cache"] = int(e.n_ctx * e.n_layer * 2 * e.n_head_kv * e.head_dim_v * 2)
        elif self.llm is not None:
            import llama_cpp

            m = self.llm.model
            n_embd, n_head = llama_cpp.llama_model_n_embd(m), llama_cpp.llama_model_n_head(m)
            self.mem["kv_cache"] = int(self.llm.n_ctx() * llama_cpp.llama_model_n_layer(m) * 2
                                       * llama_cpp.llama_model_n_head_kv(m) * (n_embd // n_head) * 2)
        self.mem["weights_file"] = os.path.getsize(s.model_path)

    def close(self) -> None:
        for e in self.engines.values():
            e.close()
        if self.llm is not None:
            self.llm.close()

    def run(self, config: str, problems: list[Problem], on_problem: Callable[[int, bool], None] | None = None,
            max_tokens: int | None = None) -> Run:
        """on_problem(index, done) when a problem starts and when it is finished;
        max_tokens: a cap below the settings' (the warm-up)."""
        from sage.inverse import AnalysisConfig
        from sage.reason import ReasonRun

        s = self.s
        max_tokens = min(max_tokens or s.max_tokens, s.max_tokens)
        out = Run(config)
        for i, p in enumerate(problems):
            if on_problem:
                on_problem(i, False)
            if config == "llama":
                from sage.engine import format_prompt

                tmpl = self.llm.metadata.get("tokenizer.chat_template")
                prompt, _ = format_prompt(tmpl.encode() if tmpl else None, p.text)
                toks = self.llm.tokenize(prompt.encode(), add_bos=True, special=True)
                t0 = time.perf_counter()
                t_first, n, text, finish = None, 0, "", None
                for chunk in self.llm.create_completion(toks, max_tokens=max_tokens, temperature=0.0, stream=True):
                    n += 1
                    text += chunk["choices"][0]["text"]
                    finish = chunk["choices"][0].get("finish_reason") or finish
                    if t_first is None:
                        t_first = time.perf_counter()
                t1 = time.perf_counter()
                from sage.steps import extract_answer

                out.tokens += n
                out.gen_s += t1 - (t_first or t1)
                out.total_s += t1 - t0
                # as sage's own chains: a chain cut off by the token limit has only stated answers
                ans = extract_answer(text, p.text, complete=finish == "stop").value
                out.answers.append(ans)
                out.spent.append(n)
            else:
                eng = self.engines["plain" if config == "forward" else "tracked"]
                cfg = AnalysisConfig(threshold=s.threshold, max_decisions=s.max_decisions,
                                     alternatives=s.alternatives if config == "rollouts" else 0,
                                     budget=s.budget if config == "rollouts" else 0)
                t0 = time.perf_counter()
                run = ReasonRun(eng, p.text, max_tokens=max_tokens, analysis=cfg)
                for _ in run:
                    pass
                if config in ("analysis", "rollouts"):
                    run.analyze()
                t1 = time.perf_counter()
                tr = run.trace
                n = len(tr.tokens)
                out.tokens += n
                tps = tr.timings.get("tokens_per_s", 0.0)
                out.gen_s += (n - 1) / tps if tps > 0 and n > 1 else 0.0
                out.total_s += t1 - t0
                ans = tr.answer.value if tr.answer else None
                out.answers.append(ans)
                spent = n
                if tr.analysis is not None:
                    extra = int(tr.analysis.timings.get("sample_tokens", tr.analysis.timings.get("rollout_tokens", 0)))
                    spent += extra
                    out.rollout_tokens += extra
                out.spent.append(spent)
                if config == "rollouts":
                    out.votes.append(branch_vote(tr))
            if on_problem:
                on_problem(i, True)
        return out


def branch_vote(trace) -> str | None:
    """The vote of the analysis: with sampled outcomes, the most frequent answer of the
    samples from the problem alone (else the chain's answer). Schema-2 traces: the answer
    of the chosen path and its rollouts, weighted by probability: at every
    decision point the chosen token's probability votes for the chain's answer and each
    rolled-out alternative's for its branch's answer."""
    chain = trace.answer.value if trace.answer else None
    a = trace.analysis
    if a is not None and a.outcomes is not None:
        return a.outcomes.vote if a.outcomes.vote is not None else chain
    if a is None or not any(d.branches for d in a.decisions):
        return chain
    votes: dict[str | None, float] = {}
    for d in a.decisions:
        if not d.branches:
            continue
        votes[chain] = votes.get(chain, 0.0) + d.prob
        for b in d.branches:
            votes[b.answer] = votes.get(b.answer, 0.0) + b.prob
    votes.pop(None, None)
    if not votes:
        return chain
    return max(votes.items(), key=lambda kv: (kv[1], kv[0] == chain))[0]


# --- subprocess worker (for --mem) -------------------------------------------------------------


def worker_main() -> None:
    """python -m sage.bench: run one configuration on the problems given as JSON on
    stdin. Writes JSON lines on stdout: {"event": "start"|"done", "problem": k} for
    every problem (k from 1; 0: the warm-up), then {"event": "run", "run": Run with its
    memory facts}."""
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever else writes to stdout (C code included) goes to stderr

    def emit(**kv) -> None:
        events.write(json.dumps(kv) + "\n")
        events.flush()

    job = json.loads(sys.stdin.read())
    s = BenchSettings(**job["settings"])
    problems = [Problem(**p) for p in job["problems"]]
    config = job["config"]
    runner = Runner(s, (config,))
    if job.get("warmup"):
        runner.run(config, problems[:1], max_tokens=WARMUP_TOKENS,
                   on_problem=lambda i, done: emit(event="done" if done else "start", problem=0))
    out = runner.run(config, problems,
                     on_problem=lambda i, done: emit(event="done" if done else "start", problem=i + 1))
    out.mem = {**runner.mem, "peak_rss": peak_rss()}
    runner.close()
    emit(event="run", run=asdict(out))
    events.close()


def run_in_subprocess(config: str, s: BenchSettings, problems: list[Problem], warmup: bool,
                      on_event: Callable[[int, bool], None] | None = None) -> Run:
    """Run one configuration in a fresh process (python -m sage.bench); on_event(problem,
    done) as the worker reports it (problem from 1; 0: the warm-up)."""
    job = {"settings": asdict(s), "problems": [asdict(p) for p in problems], "config": config, "warmup": warmup}
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = None
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sage.bench"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True, env=env)
        try:
            try:
                proc.stdin.write(json.dumps(job))  # the worker reads all of it before it writes
                proc.stdin.close()
            except BrokenPipeError:  # it died first; its stderr says why
                pass
            for line in proc.stdout:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(ev, dict):
                    continue
                if ev.get("event") == "run":
                    result = ev.get("run")
                elif ev.get("event") in ("start", "done") and on_event:
                    on_event(int(ev.get("problem", 0)), ev["event"] == "done")
            rc = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted here: the worker must not run on
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if rc != 0 or result is None:
            err.seek(0)
            last = ([ln for ln in err.read().strip().splitlines() if ln.strip()] or ["no output"])[-1]
            raise SageError(f"bench worker for {config} failed: {last}")
    return Run(**result)


# --- the machine and the tracker --------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, macOS sysctl), else what platform knows."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> dict:
    """What a bench ran on: the CPU, its cores, the threads sage uses, and the instruction
    sets llama.cpp's CPU kernels were built with here (it builds with the host's native
    flags, so the same model runs different kernels, at different costs, on another CPU)."""
    import re

    import llama_cpp

    from sage.engine import default_threads

    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count() or 1,
        "threads": default_threads(),
        "kernels": re.findall(r"([A-Z][A-Z0-9_]*) = 1\b", info),
    }


def tracker_kind() -> str:
    """"native" where the C tracker (kernels/tracker.c) is built and loads, else "python"."""
    from sage.kernels.tracker import load_native

    return "native" if load_native() is not None else "python"


def tracking_ratio(table: dict) -> float | None:
    """(2)'s median decode tokens/s over (1)'s: what attention tracking leaves of the speed."""
    try:
        fwd = table["forward"]["tokens_per_s"]["median"]
        return table["track"]["tokens_per_s"]["median"] / fwd if fwd > 0 else None
    except KeyError:
        return None


# --- decoding many sequences at once ---------------------------------------------------------

SEQUENCES = (1, 4, 8, 16, 32)
MAX_SEQUENCES = 64  # the most `sage bench --sequences` decodes at once (sage ask samples 16)


def parse_sequences(text: str | None) -> tuple[int, ...]:
    """`--sequences`: comma-separated counts of sequences decoded at once, 'none' (()), or
    None for the default SEQUENCES."""
    if text is None:
        return SEQUENCES
    text = text.strip()
    if text.lower() == "none":
        return ()
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise SageError(f"--sequences takes comma-separated counts such as 1,4,16 or 'none', not {text!r}") from None
    if not counts or any(not 1 <= b <= MAX_SEQUENCES for b in counts):
        raise SageError(f"--sequences: each count between 1 and {MAX_SEQUENCES}")
    return tuple(sorted(set(counts)))


def multi_sequence_throughput(
    model_path: str | Path, n_threads: int | None = None, sequences: tuple[int, ...] = SEQUENCES,
    prefix_tokens: int = 150, steps: int = 32, reps: int = 2,
) -> dict[str, float]:
    """Aggregate decode tokens/s with B sequences that share a prefix's KV cells, one token
    each per llama_decode (as batched rollouts decode), greedy; the best of `reps`, by B."""
    import numpy as np

    from sage.engine import Engine

    text = "Question: A farmer has 17 sheep and buys 5 more, then sells 8. How many are left? " * 16
    out: dict[str, float] = {}
    with Engine(model_path, n_ctx=prefix_tokens + max(sequences) * steps + 8, n_threads=n_threads,
                n_seq_max=max(sequences) + 1) as eng:
        prefix = eng.tokenize(text)[:prefix_tokens]
        for b in sequences:
            best = 0.0
            for _ in range(reps):
                eng.reset()
                eng.decode(prefix, 0)
                for seq in range(1, b + 1):
                    eng.seq_copy(0, seq, 0, len(prefix))
                toks = [int(np.argmax(eng.logits()))] * b
                t0 = time.perf_counter()
                for k in range(steps):
                    eng.decode_batch([(toks[i], len(prefix) + k, i + 1) for i in range(b)])
                    toks = [int(np.argmax(eng.logits(i))) for i in range(b)]
                best = max(best, b * steps / (time.perf_counter() - t0))
            out[str(b)] = best
    return out


# --- the whole bench ---------------------------------------------------------------------------


def _median(xs):
    return statistics.median(xs) if xs else 0.0


def summarize(runs: dict[str, list[Run]], problems: list[Problem], mem: bool) -> dict:
    """Per configuration: tokens/s and time per problem (median/min/max over repetitions),
    overheads against forward (1) and llama (0), memory, and accuracy."""
    table = {}
    n_prob = len(problems)
    for c, rs in runs.items():
        tps = [r.tokens / r.gen_s for r in rs if r.gen_s > 0]
        tpp = [r.total_s / n_prob for r in rs]
        row = {
            "tokens_per_s": {"median": _median(tps), "min": min(tps, default=0.0), "max": max(tps, default=0.0)},
            "time_per_problem_s": {"median": _median(tpp), "min": min(tpp, default=0.0), "max": max(tpp, default=0.0)},
            "tokens_per_problem": _median([r.tokens / n_prob for r in rs]),
            "rollout_tokens_per_problem": _median([r.rollout_tokens / n_prob for r in rs]),
        }
        if mem:
            row["memory"] = {k: _median([r.mem.get(k, 0) for r in rs]) for k in
                             ("weights_file", "rss_model", "kv_cache", "tracking_buffers", "heads", "peak_rss")}
        first = rs[0]
        row["accuracy"] = sum(score(a, p) for a, p in zip(first.answers, problems)) / n_prob
        if first.votes:
            row["vote_accuracy"] = sum(score(a, p) for a, p in zip(first.votes, problems)) / n_prob
            row["vote_tokens_per_problem"] = sum(first.spent) / n_prob
        table[c] = row
    for c, row in table.items():
        for base in ("forward", "llama"):
            if base in table and table[base]["time_per_problem_s"]["median"] > 0:
                row[f"time_overhead_vs_{base}"] = (
                    row["time_per_problem_s"]["median"] / table[base]["time_per_problem_s"]["median"] - 1.0
                )
            if mem and base in table and table[base]["memory"]["peak_rss"] > 0:
                row[f"memory_overhead_vs_{base}"] = row["memory"]["peak_rss"] / table[base]["memory"]["peak_rss"] - 1.0
    return table


def _add(acc: Run, r: Run) -> None:
    """Fold one problem's run into a configuration's run over the set."""
    acc.tokens += r.tokens
    acc.gen_s += r.gen_s
    acc.total_s += r.total_s
    acc.rollout_tokens += r.rollout_tokens
    acc.answers += r.answers
    acc.votes += r.votes
    acc.spent += r.spent


def _open_runner(s: BenchSettings, configs: tuple[str, ...], threads: int | None) -> Runner:
    """A worker's models (sage.workers calls it once per worker)."""
    return Runner(replace(s, threads=threads or s.threads), configs)


def _bench_task(runner: Runner, task: tuple) -> dict[str, Run]:
    configs, p = task
    return {c: runner.run(c, [p]) for c in configs}


def run_over_workers(s: BenchSettings, problems: list[Problem], configs: tuple[str, ...], workers: int | None,
                     on_step: Callable[[Step], None] | None = None, ray: str | None = None) -> dict[str, list[Run]]:
    """Every configuration once over the problems, the problems shared out over worker
    processes (sage.workers), one set of models in each: for --accuracy, whose answers do
    not depend on timing. No warm-up; on_step gets each problem's configurations as they
    finish."""
    from sage.workers import run_tasks

    n = len(problems)
    if on_step:
        on_step(Step("", 0, 0, 0, n, "load"))
    parts: dict[int, dict[str, Run]] = {}
    tasks = [(configs, p) for p in problems]
    for i, res in run_tasks(_open_runner, (s, configs), _bench_task, tasks, workers=workers, threads=s.threads,
                              ray=ray):
        parts[i] = res
        for c in configs:
            if on_step:
                on_step(Step(c, 1, 1, len(parts), n, "problem", True))
    runs = {c: Run(c) for c in configs}
    for i in range(n):  # in the problems' order, whatever order they finished in
        for c in configs:
            _add(runs[c], parts[i][c])
    return {c: [runs[c]] for c in configs}


def run_bench(
    s: BenchSettings,
    problems: list[Problem],
    reps: int = 2,
    mem: bool = False,
    configs: tuple[str, ...] = CONFIGS,
    on_step: Callable[[Step], None] | None = None,
) -> dict[str, list[Run]]:
    """Run every configuration `reps` times, interleaved; returns the raw runs. on_step
    gets every Step as it starts and as it is finished."""
    if reps < 1:
        raise SageError("the bench needs at least 1 repetition")
    n = len(problems)

    def step(config: str, rep: int, problem: int, phase: str, done: bool = False) -> None:
        if on_step:
            on_step(Step(config, rep, reps, problem, n, phase, done))

    runs: dict[str, list[Run]] = {c: [] for c in configs}
    if mem:
        for rep in range(1, reps + 1):
            for c in configs:
                step(c, rep, 0, "load")

                def on_event(problem: int, done: bool, c=c, rep=rep) -> None:
                    step(c, rep, problem, "warmup" if problem == 0 else "problem", done)

                runs[c].append(run_in_subprocess(c, s, problems, warmup=True, on_event=on_event))
        return runs
    step("", 0, 0, "load")
    runner = Runner(s, configs)
    try:
        for c in configs:  # warm-up, excluded
            step(c, 0, 0, "warmup")
            runner.run(c, problems[:1], max_tokens=WARMUP_TOKENS)
            step(c, 0, 0, "warmup", True)
        for rep in range(1, reps + 1):
            parts = {c: Run(c) for c in configs}
            for i, p in enumerate(problems, 1):  # interleaved problem by problem
                for c in configs:
                    step(c, rep, i, "problem")
                    _add(parts[c], runner.run(c, [p]))
                    step(c, rep, i, "problem", True)
            for c in configs:
                runs[c].append(parts[c])
    finally:
        runner.close()
    return runs


if __name__ == "__main__":
    worker_main()

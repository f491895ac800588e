"""The Python API under the CLI: what `sage ask` and `sage explain` do, as functions.

    import sage
    trace = sage.ask("Tom has 3 boxes of 12 eggs and uses 7. How many are left?")
    print(trace.answer.value, trace.analysis.answer_confidence)

    with sage.open_ask("What is 12 * 7?") as run:   # the streaming form
        for token in run:
            print(token.text, end="", flush=True)
        trace = run.analyze()

    report = sage.explain(trace, exact=True)          # exact eq. 7 (imports torch)

Nothing here imports torch unless `exact` asks for it, nor llama.cpp until a model is
opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from sage.errors import SageError
from sage.trace import TokenRecord, Trace, load_trace

if TYPE_CHECKING:
    from sage.presets import Resolved
    from sage.reference.report import ExactReport


class Asking:
    """One `sage ask` in progress: iterate for the generated tokens (TokenRecord), then
    `analyze()` for the inverse analysis. Owns its llama.cpp engine: use it as a context
    manager or call close()."""

    def __init__(
        self,
        problem: str,
        model: str | Path | None = None,
        *,
        max_tokens: int = 512,
        temperature: float = 0.0,
        seed: int = 0,
        ctx: int = 8192,
        threads: int | None = None,
        track: bool = True,
        threshold: float | None = None,
        max_decisions: int = 3,
        alternatives: int = 2,
        heads: str | Path | None = None,
        exact: bool = False,
        t_start: float | None = None,
        budget: int | None = None,
        samples: int = 16,
        sample_temperature: float | None = None,
        sample_top_p: float | None = None,
        sample_top_k: int | None = None,
    ) -> None:
        """model: a .gguf path, a preset name or hf:ORG/REPO/FILE.gguf (default: the
        embedded SmolLM2). heads: a sidecar path, "none" for the analytic heads, or None
        to look one up as `sage ask` does. threshold: on normalized significance with
        analytic heads, on the decision score with trained heads (default: the sidecar's
        own). exact: decision points from exact eq. 7 on the torch reference model.
        budget: tokens for the sampled outcome distributions (None: the default, 0: none);
        samples: most samples per distribution; sample_*: how they are drawn (default:
        the preset's recommended sampling, else temperature 1)."""
        # llama.cpp is imported here, not with the module: `sage explain` uses this module
        from sage.engine import Engine
        from sage.heads import SageHeads, resolve_heads
        from sage.inverse import AnalysisConfig
        from sage.presets import resolve_model
        from sage.reason import ReasonRun, check_problem

        check_problem(problem)
        if exact and not track:
            raise SageError("exact significance is part of the inverse analysis, which needs tracking")
        from sage.inverse.sampler import SamplingSettings

        self.cfg = AnalysisConfig(max_decisions=max_decisions, alternatives=alternatives, budget=budget,
                                  samples=samples)
        self.exact = exact
        self.resolved: Resolved = resolve_model(None if model is None else str(model))
        from sage.presets import PRESETS

        rec = PRESETS[self.resolved.preset].sampling if self.resolved.preset is not None else None
        t, k, p = rec or (1.0, 0, 1.0)
        self.cfg.sampling = SamplingSettings(
            temperature=t if sample_temperature is None else sample_temperature,
            top_k=k if sample_top_k is None else sample_top_k,
            top_p=p if sample_top_p is None else sample_top_p,
            seed=seed,
        )
        self.heads = None
        if track:
            where = resolve_heads(heads, self.resolved.path, self.resolved.preset)
            self.heads = SageHeads.load(where) if where else None
        if threshold is not None:
            if self.heads is not None and self.heads.trained:
                self.cfg.score_threshold = threshold
            else:
                self.cfg.threshold = threshold
        self.engine = Engine(
            self.resolved.path,
            heads=self.heads,
            n_ctx=ctx,
            n_threads=threads,
            name=self.resolved.name,
            track=track,
            n_seq_max=self.cfg.n_seq_max() if track else 1,
        )
        try:
            if exact:
                # refused before generating, not after: exact eq. 7 needs a torch twin of the architecture
                from sage.reference.arch import get_arch

                try:
                    get_arch(self.engine.architecture)
                except SageError as e:
                    raise SageError(f"exact significance needs the torch reference model: {e}") from None
            self.run = ReasonRun(
                self.engine, problem, max_tokens=max_tokens, temperature=temperature, seed=seed,
                t_start=t_start, analysis=self.cfg,
            )
        except BaseException:
            self.engine.close()
            raise
        self.track = track

    @property
    def trace(self) -> Trace:
        return self.run.trace

    def __iter__(self) -> Iterator[TokenRecord]:
        return iter(self.run)

    def analyze(self, on_progress=None) -> Trace:
        """The inverse analysis of the finished chain (with tracking; a no-op without).
        on_progress(samples, tokens, budget) while outcome distributions are sampled."""
        if self.track:
            self.run.analyze(self.exact, on_progress=on_progress)
        return self.run.trace

    def interrupted(self) -> Trace:
        """The partial trace after an interrupt (finish_reason "interrupted")."""
        return self.run.interrupted()

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Asking":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_ask(problem: str, model: str | Path | None = None, **options) -> Asking:
    """Start `sage ask` without running it: the streaming form of `ask` (see Asking)."""
    return Asking(problem, model, **options)


def ask(problem: str, model: str | Path | None = None, **options) -> Trace:
    """Reason step by step about `problem` and run the inverse analysis; the trace (not
    saved: `sage.trace.save_trace(trace, sage.paths.sage_home())` does what the CLI does).
    Options as Asking's."""
    with Asking(problem, model, **options) as run:
        for _ in run:
            pass
        return run.analyze()


@dataclass
class Explained:
    trace: Trace
    exact: "ExactReport | None"  # with exact=True: exact eq. 7 against the recorded analysis


def explain(trace: Trace | str | Path | None = None, exact: bool = False) -> Explained:
    """A trace (a Trace, a trace file, or by default the newest `sage ask` saved) for
    `sage explain`; exact=True recomputes eq. 7 with true gradients on the trace's own
    model file (imports torch)."""
    if not isinstance(trace, Trace):
        if trace is None:
            from sage.paths import sage_home

            trace = sage_home() / "last.json"
            if not trace.exists():
                raise SageError(f"no trace yet: run `sage ask \"PROBLEM\"` first (nothing at {trace})")
        trace = load_trace(Path(trace))
    report = None
    if exact:
        from sage.reference.report import exact_report

        report = exact_report(trace)
    return Explained(trace, report)

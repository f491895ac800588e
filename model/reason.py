"""One reasoning run on a loaded engine: the prompt, the generated chain, its steps and
answer, and (with tracking) the inverse analysis, as a Trace.

`ReasonRun` yields each generated TokenRecord as it is produced; its `trace` is the
finished Trace (after an interrupt (Ctrl-C), marked "interrupted"). `reason` just
collects it. `sage.api` builds on these with model resolution and the heads.
"""

from __future__ import annotations

import bisect
import math
import os
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable, Iterator

from sage.engine import Engine, Sampling
from sage.errors import SageError
from sage.steps import extract_answer, problem_kind, segment_steps
from sage.trace import Answer, Settings, Step, TokenRecord, Trace
from sage import __version__

if TYPE_CHECKING:
    from sage.inverse import AnalysisConfig


def process_start_time() -> float | None:
    """Wall-clock time this process started, for honest first-token timing. On Linux from
    /proc/self/stat and /proc/uptime (10 ms resolution): psutil's create_time adds the
    start ticks to /proc/stat's whole-second boot time, which put it 0.3 s early here.
    Elsewhere (macOS, Windows) psutil's."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # neither is readable here (a sandbox): unknown
        return None


def _geo_mean_prob(tokens: list[TokenRecord]) -> float:
    if not tokens:
        return 1.0
    return math.exp(sum(t.logprob for t in tokens) / len(tokens))


def _token_offsets(tokens: list[TokenRecord]) -> list[int]:
    """Character offset of each token's text in the joined output (len = n + 1)."""
    out = [0]
    for t in tokens:
        out.append(out[-1] + len(t.text))
    return out


def _char_to_token_span(offsets: list[int], start: int, end: int) -> tuple[int, int]:
    """Tokens overlapping characters [start, end)."""
    t0 = max(bisect.bisect_right(offsets, start) - 1, 0)
    t1 = max(bisect.bisect_left(offsets, end), t0 + 1)
    return t0, min(t1, len(offsets) - 1)


def finish_trace(trace: Trace) -> Trace:
    """Derive text, steps, answer and confidences from the trace's tokens."""
    trace.text = "".join(t.text for t in trace.tokens)
    offsets = _token_offsets(trace.tokens)
    trace.steps = []
    for i, span in enumerate(segment_steps(trace.text)):
        t0, t1 = _char_to_token_span(offsets, span.start, span.end)
        trace.steps.append(
            Step(
                index=i,
                text=trace.text[span.start : span.end],
                char_start=span.start,
                char_end=span.end,
                token_start=t0,
                token_end=t1,
                kind=span.kind,
                confidence=_geo_mean_prob(trace.tokens[t0:t1]),
            )
        )
    # a chain cut off (token limit, context, Ctrl-C) has only the answers it stated
    found = extract_answer(trace.text, trace.problem, complete=trace.finish_reason == "stop")
    conf = None
    if found.value is not None and trace.tokens:
        t0, t1 = _char_to_token_span(offsets, found.start, found.end)
        conf = _geo_mean_prob(trace.tokens[t0:t1])
    trace.answer = Answer(
        text=found.text,
        value=found.value,
        kind=found.kind,
        char_start=found.start,
        char_end=found.end,
        confidence=conf,
        expected=problem_kind(trace.problem),
        note=found.note,
    )
    return trace


def _cut_at_stop(tokens: list[TokenRecord], stops: tuple[str, ...]) -> list[TokenRecord]:
    """Drop the stop string (and what follows) that ended a plain-prompt generation."""
    text = "".join(t.text for t in tokens)
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut < 0:
        return tokens
    offsets = _token_offsets(tokens)
    keep = [t for t, o in zip(tokens, offsets) if o < cut]
    if keep:
        # the last kept token may carry the start of the stop string
        over = offsets[len(keep)] - cut
        if over > 0:
            last = keep[-1]
            keep[-1] = TokenRecord(last.id, last.text[: len(last.text) - over], last.logprob,
                                   last.entropy, last.varentropy, last.top)
    return keep


def check_problem(problem: str) -> str:
    """The problem, stripped; a SageError if there is nothing to reason about."""
    from sage.text import encodable

    problem = encodable(problem or "").strip()
    if not problem:
        raise SageError('the problem is empty; give a question, e.g. sage ask "What is 17 * 3?"')
    return problem


class ReasonRun:
    """One reasoning run over an engine. Iterate for tokens; `trace` is complete after
    iteration ends (or is partial, finish_reason "interrupted", after Ctrl-C)."""

    def __init__(
        self,
        engine: Engine,
        problem: str,
        max_tokens: int = 512,
        temperature: float = 0.0,
        seed: int = 0,
        t_start: float | None = None,
        analysis: "AnalysisConfig | None" = None,
    ) -> None:
        """analysis: inverse-analysis settings, used when the engine tracks attention
        (Engine(track=True)); None = defaults."""
        problem = check_problem(problem)
        if max_tokens < 1:
            raise SageError("max_tokens must be at least 1")
        if not 0 <= temperature < math.inf:
            raise SageError("the temperature must be a number >= 0")
        if not 0 <= seed < 2**63:
            raise SageError("the seed must be between 0 and 2**63 - 1")
        self.engine = engine
        self.t_start = t_start if t_start is not None else time.time()
        prompt, self.stops, self.prompt_tokens = engine.prompt_tokens(problem)
        self.trace = Trace(
            problem=problem,
            prompt=prompt,
            prompt_tokens=len(self.prompt_tokens),
            model=engine.info,
            settings=Settings(
                temperature=temperature,
                seed=seed,
                max_tokens=max_tokens,
                n_ctx=engine.n_ctx,
                n_threads=engine.n_threads,
            ),
            created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f+0000"),
            sage_version=__version__,
        )
        self.analysis_config = analysis
        self._t0: float | None = None
        self._t_first: float | None = None
        self._done = False
        self.generation = engine.generate(
            self.prompt_tokens, max_tokens, Sampling(temperature, seed), stop=self.stops
        )

    def __iter__(self) -> Iterator[TokenRecord]:
        self._t0 = time.time()
        try:
            for rec in self.generation:
                if self._t_first is None:
                    self._t_first = time.time()
                self.trace.tokens.append(rec)
                yield rec
        except (KeyboardInterrupt, GeneratorExit):
            self.interrupted()
            raise
        self._finish(self.generation.finish_reason or "length")

    def analyze(self, exact: bool = False, on_progress=None) -> Trace:
        """Inverse analysis of the finished chain (needs a tracking engine).

        exact: decision points from exact eq. 7 (sage.reference.exact: the torch reference
        model of the same GGUF, a backward pass per step) instead of the tracker's proxy;
        the proxy's agreement with it (mean per-step Spearman) and its time go to
        Analysis.exact. Imports torch. on_progress(samples, tokens, budget) while the
        outcome distributions are sampled."""
        from sage.inverse import AnalysisConfig, analyze

        if self.engine.tracker is None or self.trace.finish_reason == "interrupted" or not self.trace.tokens:
            return self.trace
        sig = facts = method = None
        if exact:
            from sage.reference.exact import exact_significance, proxy_agreement, tracker_proxy

            # the proxy first: the rollouts decode on this engine and overwrite the tracker rows
            proxy = tracker_proxy(self.engine, self.trace)
            res = exact_significance(self.trace, engine=self.engine)
            rho = proxy_agreement(self.trace, res, proxy)
            sig, method = res.significance, res.method
            facts = {"spearman_vs_proxy": rho if math.isfinite(rho) else None}
            facts.update({k: float(v) for k, v in res.timings.items()})  # exact_s, load_s, ...
        analysis = analyze(
            self.engine,
            self.trace,
            self.prompt_tokens,
            self.analysis_config or AnalysisConfig(),
            self.stops,
            significance=sig,
            on_progress=on_progress,
        )
        if exact:
            analysis.proxy, analysis.exact = method, facts
        self.trace.analysis = analysis
        return self.trace

    def interrupted(self) -> Trace:
        """Close the trace as interrupted (Ctrl-C in the generator or in its consumer, or
        during the analysis: the chain is kept, the analysis is not)."""
        self._finish("interrupted")
        self.trace.finish_reason = "interrupted"
        return self.trace

    def _finish(self, reason: str) -> Trace:
        tr = self.trace
        if self._done:
            return tr
        self._done = True
        t1 = time.time()
        tr.finish_reason = reason
        if reason == "stop" and self.stops:
            tr.tokens = _cut_at_stop(tr.tokens, self.stops)
        t_first = self._t_first or t1
        gen_s = t1 - t_first
        n = len(tr.tokens)
        tr.timings = {
            "generate_s": t1 - (self._t0 or t1),
            "first_token_s": t_first - self.t_start,
            "tokens_per_s": (n - 1) / gen_s if gen_s > 0 and n > 1 else 0.0,
        }
        return finish_trace(tr)


def reason(engine: Engine, problem: str, on_token: Callable[[TokenRecord], None] | None = None, **kw) -> Trace:
    """Run `sage ask` on a loaded engine and return the finished trace (with the inverse
    analysis when the engine tracks attention)."""
    run = ReasonRun(engine, problem, **kw)
    for rec in run:
        if on_token:
            on_token(rec)
    return run.analyze()

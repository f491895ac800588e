"""The branch sampler: outcome distributions of many branches of one chain, decoded
together, on a token budget.

A branch is a prefix of the chain (its first `prefix` generated tokens) plus an optional
forced token. Its samples are continuations drawn from the model itself (on-policy, at the
sampling settings given), each to its stated answer, an end-of-generation token, or the
chain's own token cap (never past `max_tokens`). Every live sample is one KV sequence that
shares the chain's cells before the branch (llama_memory_seq_cp on the unified cache:
the prefix is never re-evaluated) and all live samples advance together, one
`llama_decode` per token over up to `parallel` sequences; a finished sample frees its
sequence and cells for the next one (continuous batching).

Samples are drawn in rounds; after each round a branch stops by the rule in
`outcomes.STOP_RULE`. Sample i of branch b draws from its own generator
`default_rng([seed, b, i])`, so what a sample draws does not depend on which others
share its decode.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field

import numpy as np

from sage.errors import SageError
from sage.inverse.outcomes import answer_stated, make_outcome, settled
from sage.sampling import StopMatcher
from sage.steps import extract_answer
from sage.trace import Outcome, Trace


@dataclass
class SamplingSettings:
    """How samples are drawn: softmax(logits / temperature) restricted to the top_k most
    probable tokens (0: all) and to the smallest set holding top_p of the mass (1: all)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}


def sample_token(logits: np.ndarray, s: SamplingSettings, rng: np.random.Generator) -> int:
    """One draw from the model's next-token distribution under the sampling settings."""
    x = np.asarray(logits, dtype=np.float32)
    idx = None
    if 0 < s.top_k < x.shape[0]:
        idx = np.argpartition(x, -s.top_k)[-s.top_k :]
        x = x[idx]
    if s.temperature <= 0:
        j = int(np.argmax(x))
        return int(idx[j]) if idx is not None else j
    z = (x - x.max()) / np.float32(s.temperature)
    p = np.exp(z)
    p /= p.sum()
    if s.top_p < 1.0:
        # the smallest set holding top_p of the mass, sorted: among the 64 most probable
        # tokens when they hold it (almost always), else over all
        cand = np.argpartition(-p, 64)[:64] if p.shape[0] > 64 else np.arange(p.shape[0])
        if p[cand].sum() < s.top_p:
            cand = np.arange(p.shape[0])
        order = cand[np.argsort(-p[cand], kind="stable")]
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, s.top_p)) + 1]
        q = np.cumsum(p[keep])
        j = int(keep[min(int(np.searchsorted(q, rng.random() * q[-1])), len(keep) - 1)])
    else:
        cum = np.cumsum(p)
        j = min(int(np.searchsorted(cum, rng.random() * cum[-1])), len(p) - 1)
    return int(idx[j]) if idx is not None else j


@dataclass
class Request:
    """One branch to sample: the chain's first `prefix` generated tokens, then `forced`."""

    prefix: int
    forced: int | None = None
    k_max: int = 16
    values: list = field(default_factory=list)  # answers of finished samples, in sample order
    tokens: int = 0
    example: str | None = None
    started: int = 0  # samples started
    round_end: int = 0  # samples of the current round
    first_round: int = 0  # samples of the first round (0: the sampler's round size)
    committed: bool = False  # the current round fits the budget and is under way
    stop: str | None = None
    index: int = 0  # the branch's number, for its samples' generators

    def outcome(self) -> Outcome:
        return make_outcome(self.prefix, self.forced, self.values, self.tokens, self.stop or "budget",
                            self.example or "")


class _Sample:
    def __init__(self, req: Request, i: int, seq: int, first: int, pos: int, text0: str, seed: int,
                 utf8, cap: int) -> None:
        self.req, self.i, self.seq = req, i, seq
        self.next_token, self.pos = first, pos
        self.rng = np.random.default_rng([seed, req.index, i])
        self.utf8 = utf8
        self.text = text0  # the forced token's text, then the sampled ones
        self.cap = cap  # most tokens this sample may add (the chain's own cap)
        self.n = 0
        self.ids: list[int] = []  # the sampled tokens
        self.done = False
        self.cut = False  # stopped by the token limit or the context, not by itself


class BranchSampler:
    """Outcome distributions of branches of `trace` (generated on `engine` from
    `prompt_tokens`), all decoded on `engine` in sequences 1..parallel; sequence 0 must
    still hold the whole chain."""

    def __init__(self, engine, trace: Trace, prompt_tokens: list[int], settings: SamplingSettings,
                 stops: tuple[str, ...] = (), parallel: int = 16, round_size: int = 4, budget: int = 6000) -> None:
        self.engine, self.trace = engine, trace
        self.prompt = list(prompt_tokens)
        self.chain = [t.id for t in trace.tokens]
        self.settings = settings
        self.stops = StopMatcher(stops)
        self.parallel = max(1, min(parallel, engine.n_seq_max - 1, engine.n_batch))
        self.round_size = max(1, round_size)
        self.budget = budget
        self.spent = 0
        self.max_tokens = trace.settings.max_tokens
        self.offsets = [0]
        for t in trace.tokens:
            self.offsets.append(self.offsets[-1] + len(t.text))
        self._n_requests = 0
        self._lengths: list[tuple[int, int]] = []  # (tokens, the chain's rest) of finished samples
        self.decode_s = 0.0
        self.decodes = 0
        self.context_full = False  # a decode found no free KV cells

    @property
    def left(self) -> int:
        return max(0, self.budget - self.spent)

    def request(self, prefix: int, forced: int | None = None, k_max: int = 16) -> Request:
        r = Request(prefix=prefix, forced=forced, k_max=k_max, index=self._n_requests)
        self._n_requests += 1
        return r

    def _start(self, req: Request, seq: int) -> _Sample | None:
        eng, n_prompt = self.engine, len(self.prompt)
        end = n_prompt + req.prefix  # the branch's cells: [0, end) of the chain, then its own
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        if req.forced is None:
            # the logits after the prefix: decode its last token again, in this sequence
            first = self.chain[req.prefix - 1] if req.prefix > 0 else self.prompt[-1]
            pos, text0, used = end - 1, "", 0
        else:
            first, pos = req.forced, end
            text0, used = utf8.decode(eng.piece(req.forced)), 1
        cap = self.max_tokens - req.prefix - used
        if req.forced is not None and (eng.is_eog(req.forced) or cap < 0):
            return None
        eng.seq_remove(seq)
        if pos > 0:
            eng.seq_copy(0, seq, 0, pos)
        i = req.started
        req.started += 1
        return _Sample(req, i, seq, first, pos, text0, self.settings.seed, utf8, max(cap, 0))

    def _expected(self, req: Request) -> int:
        """Tokens a sample of req is expected to take: the mean of its finished samples,
        else of all finished samples scaled to its remaining chain, else that remainder."""
        if req.values:
            return max(1, round(req.tokens / max(1, len(req.values))))
        rest = len(self.chain) - req.prefix + 2
        if self._lengths:
            ratio = sum(n for n, _ in self._lengths) / max(1, sum(r for _, r in self._lengths))
            return max(2, round(rest * ratio))
        return max(2, rest)

    def _finish(self, s: _Sample) -> None:
        req = s.req
        self._lengths.append((s.n + 1, len(self.chain) - req.prefix + 2))
        self.engine.seq_remove(s.seq)
        prefix_text = self.trace.text[: self.offsets[req.prefix]] if req.prefix else ""
        text = s.text
        if self.stops and self.stops.hit(prefix_text[-64:] + text):
            text = self.stops.cut(prefix_text[-64:] + text)[len(prefix_text[-64:]):]
        # cut off at the token limit, as the chain would have been: only a stated answer counts
        found = extract_answer(prefix_text + text, self.trace.problem, complete=not s.cut)
        req.values.append(found.value)
        if req.example is None:
            req.example = text

    def run(self, requests: list[Request], on_progress=None) -> None:
        """Sample every request in rounds until each has stopped (settled, most samples or
        budget). on_progress(done_samples, spent_tokens) after each decode."""
        eng = self.engine
        pending: list[Request] = []
        for r in requests:
            if r.stop is not None:
                continue
            if r.started == 0:
                r.round_end = min(r.k_max, r.first_round or self.round_size)
            elif settled(r.values) or r.started >= r.k_max:  # resumed, and done
                r.stop = "settled" if settled(r.values) else "max"
                continue
            else:  # resumed: its next round
                r.round_end, r.committed = min(r.k_max, r.started + self.round_size), False
            if r.forced is not None and eng.is_eog(r.forced):
                r.stop = "settled"  # the alternative ends the output here: nothing to continue
                continue
            pending.append(r)
        free = list(range(1, self.parallel + 1))
        live: list[_Sample] = []
        chain_cells = len(self.prompt) + len(self.chain)
        n_done = 0
        while True:
            # admit new samples while sequences and KV cells are free
            queue = [r for r in pending if r.stop is None and r.started < r.round_end]
            for r in queue:
                while free and r.started < r.round_end:
                    reserved = sum(s.cap - s.n + 1 for s in live)
                    room = eng.n_ctx - chain_cells - reserved - 8
                    need = self.max_tokens - r.prefix + 1
                    if live and need > room:
                        break
                    # the budget: start a round only if all of it is expected to finish within it
                    if not r.committed:
                        expect = sum(max(1, min(s.cap, self._expected(s.req)) - s.n) for s in live)
                        expect += sum(self._expected(x) * (x.round_end - x.started) for x in pending
                                      if x.committed and x.stop is None and x is not r)
                        fit = (self.budget - self.spent - expect) // self._expected(r)
                        if fit < 1:
                            break
                        # a round that does not fit whole is cut to what fits
                        r.round_end = min(r.round_end, r.started + int(fit))
                        r.committed = True
                    seq = free.pop()
                    s = self._start(r, seq)
                    if s is None:
                        free.append(seq)
                        r.stop = "max"  # no token left to sample after this prefix
                        break
                    s.cap = min(s.cap, max(0, room - 1))
                    live.append(s)
                if not free:
                    break
            if not live:
                # nothing runs: rounds that are complete get the stopping rule, then maybe
                # a next round; if nothing can start (the budget), every branch stops
                progressed = False
                for r in pending:
                    if r.stop is not None or r.started < r.round_end:
                        continue
                    if settled(r.values):
                        r.stop = "settled"
                    elif r.started >= r.k_max:
                        r.stop = "max"
                    else:
                        r.round_end = min(r.k_max, r.started + self.round_size)
                        r.committed = False
                        progressed = True
                if not progressed:
                    for r in pending:
                        if r.stop is None:
                            r.stop = "settled" if settled(r.values) else ("max" if r.started >= r.k_max else "budget")
                    return
                continue
            if self.spent + len(live) > self.budget:
                # the budget is spent: live samples are dropped unfinished
                for s in live:
                    eng.seq_remove(s.seq)
                    s.req.stop = "budget"
                for r in pending:
                    if r.stop is None:
                        r.stop = "budget"
                return
            t0 = time.perf_counter()
            try:
                eng.decode_batch([(s.next_token, s.pos, s.seq) for s in live])
            except SageError:
                # no KV cells left (a context too small for this many samples): what is
                # sampled so far stands; the live samples are dropped unfinished
                for s in live:
                    eng.seq_remove(s.seq)
                for r in pending:
                    if r.stop is None:
                        r.stop = "budget"
                self.context_full = True
                return
            self.decode_s += time.perf_counter() - t0
            self.decodes += 1
            self.spent += len(live)
            still = []
            for i, s in enumerate(live):
                s.req.tokens += 1
                s.pos += 1
                if s.n >= s.cap or s.pos >= eng.n_ctx - 1:
                    s.done = s.cut = True
                else:
                    tok = sample_token(eng.logits(i), self.settings, s.rng)
                    if eng.is_eog(tok):
                        s.done = True
                    else:
                        s.n += 1
                        s.ids.append(tok)
                        s.text += s.utf8.decode(eng.piece(tok))
                        s.next_token = tok
                        tail = self.trace.text[max(0, self.offsets[s.req.prefix] - 48) : self.offsets[s.req.prefix]]
                        if answer_stated(tail + s.text) or (self.stops and self.stops.hit(s.text)):
                            s.done = True
                if s.done:
                    self._finish(s)
                    free.append(s.seq)
                    n_done += 1
                    if s.req.stop is None and s.req.started >= s.req.round_end and not any(
                        x.req is s.req for x in live if x is not s and not x.done
                    ):
                        r = s.req  # its round is complete
                        if settled(r.values):
                            r.stop = "settled"
                        elif r.started >= r.k_max:
                            r.stop = "max"
                        elif self.left > 0:
                            r.round_end = min(r.k_max, r.started + self.round_size)
                            r.committed = False
                else:
                    still.append(s)
            live = still
            if on_progress:
                on_progress(n_done, self.spent)

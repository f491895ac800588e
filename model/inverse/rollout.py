"""Stage 3 of the inverse analysis: rollouts of the alternatives at the decision points,
each on a KV sequence that shares the chain's cells before the decision."""

from __future__ import annotations

import codecs
import time

import numpy as np

from sage.inverse.config import AnalysisConfig
from sage.kernels.reference import token_stats
from sage.sampling import StopMatcher, pick_token
from sage.steps import extract_answer
from sage.trace import Branch, Decision, Trace


class _Branch:
    """Decoding state of one rollout."""

    def __init__(self, engine, d: Decision, alt, seq: int, budget: int, seed: int, index: int) -> None:
        self.d, self.alt, self.seq = d, alt, seq
        self.pos = d.position  # where the next token goes
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.text = self.utf8.decode(engine.piece(alt.id))
        self.budget = budget
        self.done: str | None = None
        self.rng = np.random.default_rng([seed, index])
        self.next_token = alt.id

    def step(self, engine, logits: np.ndarray, temp: float, stops: StopMatcher) -> None:
        """Consume the logits after self.next_token was decoded at self.pos."""
        self.pos += 1
        ts = token_stats(logits, 1)
        tok = pick_token(logits, ts.ids_top[0], temp, self.rng)
        if engine.is_eog(tok):
            self.done = "stop"
            return
        self.ids.append(tok)
        self.lps.append(float(logits[tok]) - ts.log_z)
        self.text += self.utf8.decode(engine.piece(tok))
        if stops and stops.hit(self.text):
            self.text = stops.cut(self.text)
            self.done = "stop"
        elif len(self.ids) >= self.budget:
            self.done = "length"
        elif self.pos >= engine.n_ctx - 1:
            self.done = "context"
        self.next_token = tok


def _decode_branches(engine, branches: list[_Branch], temp: float, stops: StopMatcher) -> int:
    """Decode the branches together, one token each per llama_decode, to the end."""
    n = 0
    active = list(branches)
    while active:
        try:
            engine.decode_batch([(b.next_token, b.pos, b.seq) for b in active])
        except Exception:
            for b in active:
                b.done = "context"
            break
        n += len(active)
        for i, b in enumerate(active):
            b.step(engine, engine.logits(i), temp, stops)
        active = [b for b in active if b.done is None]
    return n


def rollout(
    engine,
    trace: Trace,
    prompt_tokens: list[int],
    decisions: list[Decision],
    cfg: AnalysisConfig,
    stops: tuple[str, ...] = (),
) -> dict[str, float]:
    """Roll out the strongest alternatives of every decision point. Fills d.branches;
    returns timing/throughput facts.

    Each branch gets a new sequence that shares the chain's KV cells before the decision
    token (llama_memory_seq_cp on a unified cache: nothing is re-evaluated), then decodes
    the forced alternative and continues. Decisions are handled latest first, with the
    chain truncated at the decision, so a branch's cells follow its prefix exactly as in
    a fresh context. By default each branch is decoded alone: llama.cpp's CPU kernels
    round differently for multi-token batches, so only then is a rollout
    token-identical to decoding its prefix afresh. cfg.batch_rollouts decodes all
    branches of a decision point in one llama_decode per token instead (faster)."""
    n_gen = len(trace.tokens)
    temp, seed = trace.settings.temperature, trace.settings.seed
    matcher = StopMatcher(stops)
    max_branches = max(0, min(engine.n_seq_max - 1, engine.n_batch))
    t0 = time.time()
    n_decoded = 0
    index = 0
    for d in sorted(decisions, key=lambda d: -d.position):
        alts = [a for a in d.alternatives[: cfg.alternatives] if a.prob >= cfg.min_alt_prob][:max_branches]
        if not alts:
            continue
        engine.seq_remove(0, d.position, -1)  # the chain after this point is no longer needed
        if cfg.rollout_total:
            budget = max(1, cfg.rollout_total - d.token_index - 1)
        else:
            budget = cfg.rollout_tokens or max(64, 2 * (n_gen - d.token_index) + 32)
        branches = []
        for i, a in enumerate(alts):
            b = _Branch(engine, d, a, seq=1 + i, budget=budget, seed=seed, index=index)
            index += 1
            engine.seq_remove(b.seq)
            engine.seq_copy(0, b.seq, 0, d.position)
            branches.append(b)
        groups = [branches] if cfg.batch_rollouts else [[b] for b in branches]
        for group in groups:
            n_decoded += _decode_branches(engine, group, temp, matcher)
            for b in group:
                engine.seq_remove(b.seq)  # free its cells: the next branch starts where it did
        main_value = trace.answer.value if trace.answer else None
        prefix = "".join(t.text for t in trace.tokens[: d.token_index])
        for b in branches:
            found = extract_answer(prefix + b.text, trace.problem)
            d.branches.append(
                Branch(
                    token_id=b.alt.id,
                    token_text=b.alt.text,
                    prob=b.alt.prob,
                    text=b.text,
                    token_ids=[b.alt.id] + b.ids,
                    answer=found.value,
                    changed=found.value != main_value,
                    n_tokens=1 + len(b.ids),
                    finish_reason=b.done or "length",
                    mean_logprob=float(np.mean(b.lps)) if b.lps else 0.0,
                )
            )
    dt = time.time() - t0
    return {
        "rollout_s": dt,
        "rollout_tokens": float(n_decoded),
        "rollout_tokens_per_s": n_decoded / dt if dt > 0 else 0.0,
    }


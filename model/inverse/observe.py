"""Stage 1 of the inverse analysis: what the tracker observed, gathered once.

An `Observation` holds, for one finished chain, the prompt's token texts and which of
them belong to the problem, the content mask over prompt + output, and the tracker's
attention rows; from them the eq. 7 significance of every earlier token for every step.
The analysis, the exact path and the heads training all build it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from sage.kernels.reference import aggregate_rows, eq7_significance, normalize_max, value_norm_proxy
from sage.trace import Trace


@dataclass
class PromptMap:
    """Per position of the prompt: its text and whether it belongs to the problem."""

    texts: list[str]
    in_problem: np.ndarray  # (n_prompt,) bool


def map_prompt(engine, prompt_tokens: list[int], prompt: str, problem: str) -> PromptMap:
    texts = [engine.piece(t, special=True).decode("utf-8", "replace") for t in prompt_tokens]
    start = prompt.find(problem)
    end = start + len(problem)
    in_problem = np.zeros(len(prompt_tokens), dtype=bool)
    if start >= 0:
        # the pieces of the templated prompt concatenate to the prompt text (+ a BOS)
        offs = np.cumsum([0] + [len(t) for t in texts])
        shift = max(0, int(offs[-1]) - len(prompt))
        for i in range(len(texts)):
            a, b = offs[i] - shift, offs[i + 1] - shift
            in_problem[i] = b > start and a < end and texts[i].strip() != ""
    return PromptMap(texts, in_problem)


def step_of_tokens(trace: Trace) -> np.ndarray:
    """Index of the step containing each generated token (tokens between steps belong
    to the step before them; before the first step, to the first)."""
    owner = np.zeros(len(trace.tokens), dtype=np.int64)
    cur = 0
    bounds = sorted((s.token_start, s.token_end, s.index) for s in trace.steps)
    bi = 0
    for k in range(len(trace.tokens)):
        while bi < len(bounds) and bounds[bi][0] <= k:
            cur = bounds[bi][2]
            bi += 1
        owner[k] = cur
    return owner



def significance_matrix(
    trace: Trace, attn: np.ndarray, vattn: np.ndarray, content: np.ndarray, n_prompt: int
) -> np.ndarray:
    """(n_steps, n_pos) eq. 7 significance of each earlier content token for each step,
    normalized per step to [0, 1]. Tokens of the step itself and the query producing its
    first token are excluded (a query attends to itself and its neighbours by default)."""
    n_pos = n_prompt + len(trace.tokens)
    out = np.zeros((len(trace.steps), n_pos))
    ent = np.array([t.entropy for t in trace.tokens])
    for s in trace.steps:
        t0, t1 = s.token_start, s.token_end
        if t1 <= t0:
            continue
        w = aggregate_rows(attn[t0:t1, :n_pos])
        wv = aggregate_rows(vattn[t0:t1, :n_pos])
        g = value_norm_proxy(w, wv)
        sig = eq7_significance(w, g, float(ent[t0:t1].mean()))
        mask = content.copy()
        mask[max(n_prompt + t0 - 1, 0) :] = False
        out[s.index] = normalize_max(sig, mask)
    return out



def content_mask(prompt: PromptMap, n_gen: int) -> np.ndarray:
    """(n_prompt + n_gen,) the positions significance is taken over: the problem's tokens
    in the prompt (not the template around it) and every generated token."""
    return np.concatenate([prompt.in_problem, np.ones(n_gen, dtype=bool)])


@dataclass
class Observation:
    """One chain as the tracker saw it. attn / vattn: (n_gen, >= n_pos) rows, row k the
    query that produced generated token k (float64 copies, so the engine may go on)."""

    trace: Trace
    n_prompt: int
    prompt: PromptMap
    attn: np.ndarray
    vattn: np.ndarray
    content: np.ndarray = field(init=False)  # (n_pos,) problem tokens of the prompt + every output token
    texts: list[str] = field(init=False)  # (n_pos,) the text of every position

    def __post_init__(self) -> None:
        n_gen = len(self.trace.tokens)
        self.attn = np.asarray(self.attn, dtype=np.float64)
        self.vattn = np.asarray(self.vattn, dtype=np.float64)
        self.content = content_mask(self.prompt, n_gen)
        self.texts = self.prompt.texts + [t.text for t in self.trace.tokens]

    @classmethod
    def from_engine(cls, engine, trace: Trace, prompt_tokens: list[int]) -> "Observation":
        """From an engine that generated `trace` with tracking on (its tracker rows)."""
        tr = engine.tracker
        if tr is None:
            raise ValueError("the observation needs an engine created with track=True")
        rows = max(len(trace.tokens), 1)
        pm = map_prompt(engine, prompt_tokens, trace.prompt, trace.problem)
        return cls(trace, len(prompt_tokens), pm, tr.attn[:rows].astype(np.float64), tr.vattn[:rows].astype(np.float64))

    @property
    def n_gen(self) -> int:
        return len(self.trace.tokens)

    @property
    def n_pos(self) -> int:
        return self.n_prompt + self.n_gen

    @cached_property
    def significance(self) -> np.ndarray:
        """(n_steps, n_pos) normalized eq. 7 significance with the tracker's proxy."""
        return significance_matrix(self.trace, self.attn, self.vattn, self.content, self.n_prompt)

"""Inverse reasoning: look back over a finished chain to find where it could have gone
another way, what the alternatives were, where they lead, and how confident to be.

Inputs: the trace (tokens with their top-5 alternatives and entropies, steps, answer)
and the attention rows the tracker recorded during generation. Steps:

1. significance (paper eq. 7) of every earlier token for every step, normalized per step;
2. decision points: generated tokens at or above the threshold, merged per step, ranked
   by significance x (1 - p(chosen));
3. rollouts: the strongest alternatives at each decision point are forced on a copy of
   the KV sequence (shared prefix, never re-evaluated) and decoded to an answer, all
   branches batched in one llama_decode per token;
4. confidence, consistency (share of decision points the rollouts confirm; below 0.8
   the ranking is refined by the counterfactual evidence), and the explanation.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass

import numpy as np

from kernels.reference import aggregate_rows, eq7_significance, normalize_max, token_stats, value_norm_proxy
from model.engine import Engine
from model.heads import FEATURES, META_FEATURES, SageHeads, _logit
from model.steps import extract_answer
from model.trace import Analysis, Branch, Decision, Dependency, Explanation, Trace

PROXY = "attention-weighted value norm (tracked heads) in place of |grad_h L|"
CONSISTENCY_TARGET = 0.8


@dataclass
class AnalysisConfig:
    threshold: float = 0.3  # the paper's decision threshold on normalized significance
    # trained heads: the least decision score of a candidate token (None: the
    # sidecar's own, chosen when it was trained); analytic heads use `threshold`
    score_threshold: float | None = None
    max_decisions: int = 3
    alternatives: int = 2  # rollouts per decision point (<= 5)
    min_alt_prob: float = 0.01  # alternatives below this are listed, never rolled out
    rollout_tokens: int | None = None  # per branch; default: 2x the rest of the chain + 32
    # instead: every branch ends where the chain's own token cap would (the chain's
    # max_tokens), so a branch is never judged on tokens its chain did not get
    rollout_total: int | None = None
    batch_rollouts: bool = False  # one llama_decode for all branches of a decision (faster, not bit-exact)


@dataclass
class PromptMap:
    """Per position of the prompt: its text and whether it belongs to the problem."""

    texts: list[str]
    in_problem: np.ndarray  # (n_prompt,) bool


def map_prompt(engine: Engine, prompt_tokens: list[int], prompt: str, problem: str) -> PromptMap:
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


def _step_of_tokens(trace: Trace) -> np.ndarray:
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


def token_features(
    trace: Trace, sig: np.ndarray, attn: np.ndarray, vattn: np.ndarray, n_prompt: int
) -> np.ndarray:
    """(n_gen, len(FEATURES)) per-token features of the inverse analysis layer, in the
    order of model.heads.FEATURES."""
    n_gen = len(trace.tokens)
    f = np.zeros((n_gen, len(FEATURES)), np.float32)
    gen_sig = sig[:, n_prompt : n_prompt + n_gen]
    f[:, FEATURES.index("significance")] = gen_sig.max(axis=0) if len(trace.steps) else 0.0
    for k, t in enumerate(trace.tokens):
        f[k, FEATURES.index("entropy")] = t.entropy
        f[k, FEATURES.index("varentropy")] = t.varentropy
        f[k, FEATURES.index("prob")] = t.prob
        f[k, FEATURES.index("margin")] = t.top[0].prob - (t.top[1].prob if len(t.top) > 1 else 0.0)
    # rows r > k are the queries at positions >= the token's own
    cols = n_prompt + np.arange(n_gen)
    a = np.asarray(attn[:n_gen], np.float64)[:, cols]  # (rows, tokens)
    v = np.asarray(vattn[:n_gen], np.float64)[:, cols]
    later = np.triu(np.ones((n_gen, n_gen), bool), k=1).T  # later[r, k] = r > k
    n_later = np.maximum(later.sum(axis=0), 1)
    f[:, FEATURES.index("attention_received")] = (a * later).sum(axis=0) / n_later
    f[:, FEATURES.index("value_received")] = (v * later).sum(axis=0) / n_later
    for st in trace.steps:
        n = st.token_end - st.token_start
        if n > 0:
            f[st.token_start : st.token_end, FEATURES.index("position")] = np.arange(n) / max(n - 1, 1)
    return f


def find_decisions(
    trace: Trace,
    sig: np.ndarray,
    n_prompt: int,
    cfg: AnalysisConfig,
    scores: np.ndarray | None = None,
    threshold: float | None = None,
    trained: bool = False,
) -> tuple[list[Decision], int]:
    """Decision points; returns (ranked decisions, number of candidate tokens before
    merging). scores: the inverse analysis layer's per-token output (default: the eq. 7
    significance itself, which the analytic heads reproduce); a token is a candidate at
    scores >= threshold. Ranked by significance x (1 - p) for analytic scores, by the
    trained head's probability otherwise."""
    n_gen = len(trace.tokens)
    owner = _step_of_tokens(trace)
    gen_sig = sig[:, n_prompt : n_prompt + n_gen]  # (n_steps, n_gen)
    best = gen_sig.max(axis=0) if len(trace.steps) else np.zeros(n_gen)
    scores = best if scores is None else scores
    threshold = cfg.threshold if threshold is None else threshold
    cands = []
    for k, tok in enumerate(trace.tokens):
        if scores[k] < threshold or not tok.text.strip():
            continue
        alts = [a for a in tok.top if a.id != tok.id]
        if not alts or alts[0].prob < cfg.min_alt_prob:
            continue  # nothing else was plausible here: not a choice
        cands.append((float(scores[k]) if trained else float(best[k]) * (1.0 - tok.prob), k))
    by_step: dict[int, list[tuple[float, int]]] = {}
    for score, k in cands:
        by_step.setdefault(int(owner[k]), []).append((score, k))
    decisions = []
    for step, group in by_step.items():
        score, k = max(group)
        tok = trace.tokens[k]
        decisions.append(
            Decision(
                rank=0,
                token_index=k,
                position=n_prompt + k,
                step=step,
                text=tok.text,
                prob=tok.prob,
                entropy=tok.entropy,
                significance=float(best[k]),
                score=float(score),
                dependents=[int(i) for i in np.flatnonzero(gen_sig[:, k] >= cfg.threshold)],
                merged=len(group) - 1,
                alternatives=[a for a in tok.top if a.id != tok.id][:5],
                branches=[],
                dependencies=[],
                confirmed=None,
            )
        )
    decisions.sort(key=lambda d: -d.score)
    decisions = decisions[: cfg.max_decisions]
    for i, d in enumerate(decisions):
        d.rank = i + 1
    return decisions, len(cands)


def dependencies_of(
    k: int, vattn: np.ndarray, content: np.ndarray, n_prompt: int, texts: list[str], top: int = 5
) -> list[Dependency]:
    """What the query that produced generated token k drew on most: attention-weighted
    value norm over earlier content tokens, normalized to the strongest."""
    q = n_prompt + k - 1  # position of the query that produced token k
    row = np.asarray(vattn[k, : q + 1], dtype=np.float64)
    mask = content[: q + 1].copy()
    mask[q] = False  # its own position
    w = normalize_max(row, mask)
    order = [int(j) for j in np.argsort(-w, kind="stable") if mask[j] and w[j] > 0][:top]
    return [
        Dependency(position=j, text=texts[j], source="prompt" if j < n_prompt else "output", weight=float(w[j]))
        for j in order
    ]


class _Branch:
    """Decoding state of one rollout."""

    def __init__(self, engine: Engine, d: Decision, alt, seq: int, budget: int, seed: int, index: int) -> None:
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

    def step(self, engine: Engine, logits: np.ndarray, temp: float, stops: tuple[str, ...]) -> None:
        """Consume the logits after self.next_token was decoded at self.pos."""
        self.pos += 1
        ts = token_stats(logits, 1)
        if temp <= 0:
            tok = int(ts.ids_top[0])
        else:
            z = (logits.astype(np.float64) - float(logits.max())) / temp
            p = np.exp(z)
            p /= p.sum()
            tok = int(self.rng.choice(engine.n_vocab, p=p))
        if engine.is_eog(tok):
            self.done = "stop"
            return
        self.ids.append(tok)
        self.lps.append(float(logits[tok]) - ts.log_z)
        self.text += self.utf8.decode(engine.piece(tok))
        if stops and any(s in self.text[-64:] for s in stops):
            self.text = self.text[: min(i for i in (self.text.find(s) for s in stops) if i >= 0)]
            self.done = "stop"
        elif len(self.ids) >= self.budget:
            self.done = "length"
        elif self.pos >= engine.n_ctx - 1:
            self.done = "context"
        self.next_token = tok


def _decode_branches(engine: Engine, branches: list[_Branch], temp: float, stops: tuple[str, ...]) -> int:
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
    engine: Engine,
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
            n_decoded += _decode_branches(engine, group, temp, stops)
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


def meta_features(trace: Trace, decisions: list[Decision], consistency: float | None, conf: float) -> np.ndarray:
    """Answer features of the meta-cognitive head, in the order of META_FEATURES."""
    x = np.zeros(len(META_FEATURES), np.float32)
    x[0] = _logit(conf)
    x[1] = 1.0 - float(np.prod([1.0 - _risk(d) for d in decisions])) if decisions else 0.0
    x[2] = consistency if consistency is not None else 0.0
    x[3] = float(np.mean([t.entropy for t in trace.tokens])) if trace.tokens else 0.0
    x[4] = len(decisions)
    x[5] = 1.0 if trace.answer and trace.answer.value is not None else 0.0
    return x


def _risk(d: Decision) -> float:
    """Share of the explored probability mass at d that leads to another answer."""
    if not d.branches:
        return 0.0
    explored = d.prob + sum(b.prob for b in d.branches)
    return sum(b.prob for b in d.branches if b.changed) / explored if explored > 0 else 0.0


def _q(text: str) -> str:
    return repr(text.strip() or text)


def explain(trace: Trace, decisions: list[Decision], consistency: float | None, conf: float | None,
            trained: bool = False) -> Explanation:
    """The four parts of the paper's explanation, each sentence from a measured fact.
    trained: the decisions were scored by trained SAGE heads (d.score is their decision
    score: from a class-balanced fit, it ranks tokens; it is not a calibrated probability)."""
    just, alts, confs, deps = [], [], [], []
    for d in decisions:
        dep = ", ".join(str(i + 1) for i in d.dependents)
        sig = (f"normalized significance {d.significance:.2f} for step(s) {dep}" if dep
               else f"normalized significance {d.significance:.2f} (its largest for any later step)")
        head = f"; the trained heads give it a decision score of {d.score:.2f}" if trained else ""
        just.append(
            f"Decision {d.rank} (step {d.step + 1}): the model wrote {_q(d.text)} with p={d.prob:.2f}; {sig}{head}."
        )
        for b in d.branches:
            where = (
                f"a different answer ({b.answer if b.answer is not None else 'none found'})"
                if b.changed
                else f"the same answer ({b.answer})"
            )
            alts.append(
                f"At decision {d.rank}, {_q(b.token_text)} (p={b.prob:.2f}) instead of {_q(d.text)} leads to {where} "
                f"after {b.n_tokens} tokens."
            )
        rest = [a for a in d.alternatives if a.id not in {b.token_id for b in d.branches}]
        if rest:
            alts.append(
                f"At decision {d.rank}, not rolled out: "
                + ", ".join(f"{_q(a.text)} (p={a.prob:.2f})" for a in rest)
                + "."
            )
        if d.dependencies:
            top = ", ".join(f"{_q(x.text)} ({x.source}, {x.weight:.2f})" for x in d.dependencies[:3])
            deps.append(f"Decision {d.rank} drew most on {top}.")
    if trace.answer and trace.answer.value is not None:
        base = trace.answer.confidence
        confs.append(f"The answer {trace.answer.value} was written with token probability {base:.2f}.")
    else:
        confs.append("No final answer was found in the output.")
    rolled = [d for d in decisions if d.branches]
    if rolled:
        changed = sum(1 for d in rolled for b in d.branches if b.changed)
        total = sum(len(d.branches) for d in rolled)
        confs.append(f"{changed} of {total} rolled-out alternatives reach a different answer.")
    if conf is not None:
        confs.append(f"Answer confidence after the counterfactual check: {conf:.2f}.")
    if consistency is not None:
        confs.append(f"Consistency of the analysis with the rollouts: {consistency:.2f}.")
    if not decisions:
        just.append("No token reached the significance threshold with a plausible alternative: no decision points.")
    return Explanation(justification=just, alternatives=alts, confidence=confs, dependencies=deps)


def analyze(
    engine: Engine,
    trace: Trace,
    prompt_tokens: list[int],
    cfg: AnalysisConfig | None = None,
    stops: tuple[str, ...] = (),
    significance: np.ndarray | None = None,
) -> Analysis:
    """Inverse analysis of a finished trace generated on `engine` with tracking on.

    significance: (n_steps, n_prompt + n_gen) normalized eq. 7 significance to use in
    place of the proxy from the tracker rows (exact eq. 7 with `sage ask --exact`)."""
    cfg = cfg or AnalysisConfig()
    tr = engine.tracker
    if tr is None:
        raise ValueError("analysis needs an engine created with track=True")
    t0 = time.time()
    n_prompt = len(prompt_tokens)
    n_gen = len(trace.tokens)
    pm = map_prompt(engine, prompt_tokens, trace.prompt, trace.problem)
    content = np.concatenate([pm.in_problem, np.ones(n_gen, dtype=bool)])
    texts = pm.texts + [t.text for t in trace.tokens]
    attn = tr.attn[: max(n_gen, 1)]
    vattn = tr.vattn[: max(n_gen, 1)]
    if significance is None:
        sig = significance_matrix(trace, attn, vattn, content, n_prompt)
    else:
        sig = np.asarray(significance, dtype=np.float64)
        if sig.shape != (len(trace.steps), n_prompt + n_gen):
            raise ValueError(f"significance of shape {sig.shape} does not fit the trace")
    heads: SageHeads | None = engine.heads
    if heads is not None and heads.trained:
        scores = heads.inverse(token_features(trace, sig, attn, vattn, n_prompt))
        cand_threshold = heads.threshold if cfg.score_threshold is None else cfg.score_threshold
        decisions, n_cands = find_decisions(trace, sig, n_prompt, cfg, scores, cand_threshold, trained=True)
    else:
        # analytic heads pass the significance feature through: the eq. 7 pipeline itself
        cand_threshold = cfg.threshold
        decisions, n_cands = find_decisions(trace, sig, n_prompt, cfg)
    for d in decisions:
        d.dependencies = dependencies_of(d.token_index, vattn, content, n_prompt, texts)
    t1 = time.time()
    timings = {"significance_s": t1 - t0}
    if cfg.alternatives > 0 and decisions:
        timings.update(rollout(engine, trace, prompt_tokens, decisions, cfg, stops))
    notes: list[str] = []
    rolled = [d for d in decisions if d.branches]
    for d in rolled:
        d.confirmed = any(b.changed for b in d.branches)
    consistency = sum(d.confirmed for d in rolled) / len(rolled) if rolled else None
    refined = False
    if consistency is not None and consistency < CONSISTENCY_TARGET:
        # refine: the counterfactual evidence outranks the attention-based score
        before = [d.token_index for d in decisions]
        decisions.sort(key=lambda d: (-(1 if d.confirmed else 0), -_risk(d), -d.score))
        for i, d in enumerate(decisions):
            d.rank = i + 1
        refined = True
        unconfirmed = [d for d in rolled if not d.confirmed]
        notes.append(
            f"consistency {consistency:.2f} < {CONSISTENCY_TARGET}: {len(unconfirmed)} of {len(rolled)} decision points "
            "did not change the answer when rolled out; re-ranked by counterfactual evidence"
            + (" (order changed)" if [d.token_index for d in decisions] != before else " (order unchanged)")
        )
    answer_conf = None
    if trace.answer and trace.answer.confidence is not None:
        answer_conf = trace.answer.confidence
        for d in rolled:
            answer_conf *= 1.0 - _risk(d)
        if heads is not None and heads.trained:
            answer_conf = heads.meta(meta_features(trace, decisions, consistency, answer_conf))
    timings["analysis_s"] = time.time() - t0
    return Analysis(
        heads=heads.describe() if heads is not None else "analytic (built in)",
        tracked_layers=list(tr.layers),
        tracker="native" if tr.native else "python",
        proxy=PROXY,
        threshold=cand_threshold,
        max_decisions=cfg.max_decisions,
        alternatives=cfg.alternatives,
        candidates=n_cands,
        decisions=decisions,
        consistency=consistency,
        refined=refined,
        notes=notes,
        answer_confidence=answer_conf,
        explanation=explain(trace, decisions, consistency, answer_conf, trained=heads is not None and heads.trained),
        timings=timings,
    )

"""Labels for `sage heads train`: outcome distributions sampled from the model itself.

Every problem is answered greedily with tracking on (the default tracked layers, all
heads), as `sage ask` answers it. Then, per problem:

- the answer (where the chain has one): the distribution of answers sampled from the
  problem alone, drawn as `sage ask` draws it (its seed, its first round of `start_samples`, rounds of
  `round_size` up to `samples` while the coarse half of the default budget lasts, the
  stopping rule of `sage.inverse.outcomes`), and whether the chain's answer is right;
- the tokens (on "fork problems"): at a seeded random sample of all tokens that had a
  plausible alternative (unbiased: what the held-out evaluation rests on) and at the
  analytic candidates among the rest (the tokens of highest significance x (1 - p)), the outcome
  distributions of the chosen token and of its strongest alternatives, `samples` each
  (one fixed round, no early stop), drawn with a seed of their own, independent of the
  samples `sage ask` draws. A token's fork score and permutation p-value come from them
  (`sage.inverse.outcomes.fork_score`, `tv_pvalue`).

Labels are JSON lines: a header naming what every record shares (the model's token cap,
the sampling, the seed; a file for other settings is refused), then one Example per
problem, appended the moment it is collected, so an interrupted run resumes where it
stopped (a line cut short is collected again). A record names the settings its token
labels were drawn with; a problem collected with tokens serves a run that asks only for
its answer, and one with other token settings is collected again.
Problems run over worker processes or Ray actors (sage.workers: one model per worker,
problems as tasks) and land in the file in the order they finish; the result is in the
order asked.

numpy and llama.cpp only: the workers never import torch.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sage.engine import Engine
from sage.errors import SageError
from sage.inverse import AnalysisConfig
from sage.inverse.config import is_choice
from sage.inverse.forks import distinct_alternatives
from sage.inverse.observe import Observation
from sage.inverse.outcomes import fork_score, make_outcome, tv_pvalue
from sage.inverse.sampler import BranchSampler, SamplingSettings
from sage.problems import Problem, arithmetic_problems, data_file, load_problems, score
from sage.reason import ReasonRun
from sage.trace import Outcome, Trace

LABELS_VERSION = 3
LABEL_SEED = 1_000_003  # the label samples' seed is this + the run's seed: never sage ask's own (0)


def sampling_of(preset: str | None) -> dict:
    """How `sage ask` samples for a preset (its publisher's settings; else temperature 1)."""
    from sage.presets import PRESETS

    rec = PRESETS[preset].sampling if preset is not None and preset in PRESETS else None
    t, k, p = rec or (1.0, 0, 1.0)
    return {"temperature": float(t), "top_k": int(k), "top_p": float(p)}


@dataclass
class LabelSettings:
    """What a labels file holds; its header (a file for other settings is refused)."""

    max_tokens: int = 160  # the chain's cap, and every sample's
    n_random: int = 3  # random tokens per fork problem (of those with a plausible alternative)
    n_candidates: int = 1  # analytic candidates per fork problem
    samples: int = 8  # per distribution at a token: one round, no early stop
    alternatives: int = 2  # the strongest distinct alternatives sampled at a token (as sage ask's)
    seed: int = 0  # of the token sample and (+ LABEL_SEED) of the token labels' samples
    sampling: dict = field(default_factory=lambda: sampling_of(None))  # temperature, top_k, top_p

    @staticmethod
    def for_model(preset: str | None, **kw) -> "LabelSettings":
        """Settings whose samples are drawn as `sage ask` draws them for this preset."""
        return LabelSettings(sampling=sampling_of(preset), **kw)

    def header(self, model: str) -> dict:
        """What every record of a file shares: the chains and the answers' samples."""
        return {"sage_labels": LABELS_VERSION, "model": model, "max_tokens": self.max_tokens, "seed": self.seed,
                "sampling": self.sampling}

    def token_settings(self) -> dict:
        """What a record's token labels were drawn with (kept in the record: answers serve
        runs with other token settings)."""
        return {"n_random": self.n_random, "n_candidates": self.n_candidates, "samples": self.samples,
                "alternatives": self.alternatives, "draw": "random-first"}

    def sampling_settings(self, seed: int) -> SamplingSettings:
        s = self.sampling
        return SamplingSettings(float(s["temperature"]), int(s["top_k"]), float(s["top_p"]), seed=seed)

    def analysis(self) -> AnalysisConfig:
        """sage ask's analysis settings with this file's sampling (seed 0, as `sage ask`)."""
        return AnalysisConfig(sampling=self.sampling_settings(0))


@dataclass
class Example:
    """One problem: its chain, the answer distribution from the start, and (fork problems)
    its labelled tokens."""

    source: str
    problem: Problem
    prompt_tokens: list[int]
    in_problem: list[bool]  # per prompt position: part of the problem text
    trace: dict  # Trace.to_dict() without analysis
    start: dict  # {"values": [answer or None per sample], "tokens": n, "stop": why it stopped}
    tokens: list[dict] | None  # token labels (token_label); None: an answer-only problem
    answer: str | None
    correct: bool
    token_settings: dict | None = None  # LabelSettings.token_settings() of the token labels

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["problem"] = self.problem.__dict__
        return d

    @staticmethod
    def from_json(d: dict) -> "Example":
        d = dict(d)
        d["problem"] = Problem(**d["problem"])
        return Example(**d)

    def get_trace(self) -> Trace:
        return Trace.from_dict(self.trace)

    def start_outcome(self) -> Outcome:
        return outcome_of(self.start, 0, None)


def outcome_of(dist: dict, prefix: int, forced: int | None) -> Outcome:
    return make_outcome(prefix, forced, dist["values"], dist["tokens"], dist.get("stop", "max"), "")


def _dist(req) -> dict:
    return {"values": list(req.values), "tokens": int(req.tokens), "stop": req.stop or "budget"}


def token_label(k: int, kind: str, chosen: dict, alts: list[dict]) -> dict:
    """One labelled token: its distributions and, from them, its fork score and p-value
    (None / 1.0 without a sampled alternative)."""
    co = outcome_of(chosen, k, None)
    ao = [(a["prob"], outcome_of(a["dist"], k, a["id"])) for a in alts if a["dist"]["values"]]
    f = fork_score(co, ao) if ao else None
    p = tv_pvalue(co, [o for _, o in ao]) if f is not None else 1.0
    return {"token": k, "kind": kind, "chosen": chosen, "alternatives": alts, "fork": f, "p": p}


def is_fork(lab: dict, fork_threshold: float = 0.3, alpha: float = 0.1) -> bool:
    """A true fork: fork score >= the threshold, and chance alone gives that distance less
    often than alpha (sage's own rule for a decision point, on the label's samples)."""
    return lab["fork"] is not None and lab["fork"] >= fork_threshold and lab["p"] < alpha


def analytic_proposal(obs: Observation) -> np.ndarray:
    """(n_gen,) the analytic heads' proposal score: max normalized significance x (1 - p)."""
    trace = obs.trace
    n_gen = len(trace.tokens)
    if not n_gen or not trace.steps:
        return np.zeros(n_gen)
    best = obs.significance[:, obs.n_prompt : obs.n_prompt + n_gen].max(axis=0)
    return best * (1.0 - np.array([t.prob for t in trace.tokens]))


def pick_tokens(trace: Trace, proposal: np.ndarray, s: LabelSettings, key: str, min_alt_prob: float) -> list[tuple[int, str]]:
    """[(token, "random" | "candidate")]: a seeded random sample of n_random of the choices
    (every token with a plausible alternative equally likely: the unbiased sample), then
    the n_candidates other choices of highest proposal."""
    choices = [k for k, t in enumerate(trace.tokens) if is_choice(t, min_alt_prob)]
    rng = random.Random(f"{s.seed}|{key}")
    rnd = rng.sample(choices, min(s.n_random, len(choices)))
    rest = [k for k in choices if k not in rnd]
    cands = sorted(rest, key=lambda k: (-proposal[k], k))[: s.n_candidates]
    return sorted([(k, "candidate") for k in cands] + [(k, "random") for k in rnd])


def collect_one(engine: Engine, source: str, p: Problem, s: LabelSettings, with_tokens: bool) -> Example:
    cfg = s.analysis()
    run = ReasonRun(engine, p.text, max_tokens=s.max_tokens, analysis=cfg)
    for _ in run:
        pass
    trace = run.trace
    answer = trace.answer.value if trace.answer else None

    # the answer: the distribution from the problem alone, drawn as sage ask draws it
    start_s = BranchSampler(engine, trace, run.prompt_tokens, cfg.sampling, run.stops, parallel=cfg.parallel,
                            round_size=cfg.round_size, budget=int(cfg.budget_tokens() * cfg.coarse_share))
    start = start_s.request(0, None, cfg.samples)
    start.first_round = cfg.start_samples
    if answer is not None:  # (without an answer there is no confidence to learn)
        start_s.run([start])

    tokens = None
    if with_tokens:
        tokens = []
        obs = Observation.from_engine(engine, trace, run.prompt_tokens) if trace.tokens else None
        picks = pick_tokens(trace, analytic_proposal(obs), s, p.text, cfg.min_alt_prob) if obs is not None else []
        sampler = BranchSampler(engine, trace, run.prompt_tokens, s.sampling_settings(LABEL_SEED + s.seed), run.stops,
                                parallel=cfg.parallel, round_size=s.samples, budget=10**12)
        todo = []
        for k, kind in picks:
            tok = trace.tokens[k]
            alts = distinct_alternatives(tok, cfg.min_alt_prob)[: s.alternatives]
            reqs = [sampler.request(k, tok.id, s.samples)] + [sampler.request(k, a.id, s.samples) for a in alts]
            for r in reqs:
                r.first_round = s.samples
            todo.append((k, kind, alts, reqs))
        sampler.run([r for *_, reqs in todo for r in reqs])
        for k, kind, alts, reqs in todo:
            tokens.append(token_label(k, kind, _dist(reqs[0]), [
                {"id": a.id, "text": a.text, "prob": a.prob, "dist": _dist(r)} for a, r in zip(alts, reqs[1:])]))
    d = trace.to_dict()
    d["analysis"] = None
    return Example(source, p, list(run.prompt_tokens), _in_problem(engine, trace, run.prompt_tokens), d,
                   _dist(start), tokens, answer, score(answer, p), s.token_settings() if with_tokens else None)


def problem_sequence(n: int, seed: int) -> list[tuple[str, Problem]]:
    """The first n problems of a run's seeded sequence, GSM8K-train (a seeded order of the
    file sage.problems.data_file finds: $SAGE_DATA, ../shared/data or the shipped sample)
    and generated arithmetic alternating. A longer run's sequence starts with a shorter
    one's, so raising --n-problems extends a labels file rather than replacing it."""
    if n < 4:
        raise SageError("training needs at least 4 problems (some to train on, some held out)")
    path, where = data_file("gsm8k")
    gsm = load_problems(path)
    n_gsm = (n + 1) // 2
    if n_gsm > len(gsm):
        raise SageError(f"{n} problems need {n_gsm} GSM8K problems, and {path} ({where}) holds {len(gsm)}; "
                        "ask for fewer, or set $SAGE_DATA to a folder with the full gsm8k_train.jsonl")
    order = list(range(len(gsm)))
    random.Random(seed).shuffle(order)
    arith = arithmetic_problems(n // 2, seed=1000 + seed)
    return [("gsm8k", gsm[order[i // 2]]) if i % 2 == 0 else ("arithmetic", arith[i // 2]) for i in range(n)]


def held_out(i: int, seed: int, holdout: float) -> bool:
    """Whether problem i of the sequence is held out: a seeded draw of its own (so a
    problem keeps its side when the run grows), true with probability `holdout`."""
    return random.Random(f"held-out|{seed}|{i}").random() < holdout


def _sides(n: int, seed: int, holdout: float) -> list[bool]:
    if not 0.0 < holdout < 1.0:
        raise SageError("the held-out share must be between 0 and 1")
    test = [held_out(i, seed, holdout) for i in range(n)]
    if all(test):  # a few problems can all land on one side: one goes the other way
        test[0] = False
    if not any(test):
        test[-1] = True
    return test


def training_problems(n: int, seed: int, holdout: float) -> tuple[list[tuple[str, Problem]], list[tuple[str, Problem]]]:
    """(train, held-out) of the first n problems of the sequence; each item is (source,
    problem), in sequence order."""
    test = _sides(n, seed, holdout)
    seq = problem_sequence(n, seed)
    return [x for x, t in zip(seq, test) if not t], [x for x, t in zip(seq, test) if t]


def plan(n: int, seed: int, holdout: float, fork_problems: int | None = None
         ) -> tuple[list[tuple[str, Problem, bool]], int, list[int]]:
    """(items, n_train, order) of a training run: (source, problem, with token labels) for
    the train problems then the held-out ones. The fork problems (token labels) are the
    first `fork_problems` of the sequence (default: all), on both sides; they are
    collected first, in sequence order, then the rest."""
    test = _sides(n, seed, holdout)
    seq = problem_sequence(n, seed)
    k = n if fork_problems is None else max(0, min(fork_problems, n))
    tr = [i for i in range(n) if not test[i]]
    te = [i for i in range(n) if test[i]]
    idx = tr + te
    items = [(seq[i][0], seq[i][1], i < k) for i in idx]
    pos = {i: j for j, i in enumerate(idx)}
    order = [pos[i] for i in range(n) if i < k] + [pos[i] for i in range(n) if i >= k]
    return items, len(tr), order


def _in_problem(engine: Engine, trace: Trace, prompt_tokens: list[int]) -> list[bool]:
    from sage.inverse.observe import map_prompt

    return [bool(x) for x in map_prompt(engine, prompt_tokens, trace.prompt, trace.problem).in_problem]


def _open_engine(model_path: str, threads: int | None) -> Engine:
    """A worker's model (sage.workers calls it once per worker)."""
    return Engine(model_path, n_ctx=8192, n_threads=threads, track=True, n_seq_max=AnalysisConfig().n_seq_max())


def _collect_task(eng: Engine, task: tuple) -> Example:
    source, p, settings, with_tokens = task
    return collect_one(eng, source, p, LabelSettings(**settings), with_tokens)


def read_labels(labels_path: Path, header: dict, token_settings: dict | None = None) -> dict[str, Example]:
    """The examples a labels file already holds, by problem text; {} for no file. Where a
    problem has several records, one with token labels drawn with `token_settings` wins,
    then the latest."""
    done: dict[str, Example] = {}
    if not labels_path.exists():
        return done
    with open(labels_path) as f:
        lines = f.read().splitlines()
    try:
        head = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        head = {}
    if not isinstance(head, dict) or (
            {k: v for k, v in head.items() if k != "model"} != {k: v for k, v in header.items() if k != "model"}):
        raise SageError(f"{labels_path} holds labels for other settings; remove it or pass another --labels")
    for line in lines[1:]:
        try:
            ex = Example.from_json(json.loads(line))
        except (json.JSONDecodeError, TypeError, KeyError):
            break  # a line cut short by an interrupt: collect it again
        old = done.get(ex.problem.text)
        if old is None or not (old.tokens is not None and old.token_settings == token_settings):
            done[ex.problem.text] = ex  # a record with the asked tokens serves both kinds of request
    return done


def collect(model_path: Path, items: list[tuple[str, Problem, bool]], labels_path: Path, settings: LabelSettings, *,
            order: list[int] | None = None, n_threads: int | None = None, workers: int | None = 1,
            ray: str | None = None, on_problem: Callable[[Example], None] | None = None) -> list[Example]:
    """Collect (or resume collecting) examples into labels_path for items (source,
    problem, with token labels), in `order` (default: as given), over `workers` processes
    that share n_threads (default: the cores), or Ray actors at the address `ray`
    (sage.workers). Returns them in the order of items."""
    header = settings.header(str(model_path))
    wanted = settings.token_settings()
    done = read_labels(labels_path, header, wanted)

    def have(p: Problem, with_tokens: bool) -> bool:
        ex = done.get(p.text)
        return ex is not None and (not with_tokens or (ex.tokens is not None and ex.token_settings == wanted))

    todo = [items[i] for i in (order if order is not None else range(len(items))) if not have(items[i][1], items[i][2])]
    if todo:
        from sage.workers import run_tasks

        labels_path.parent.mkdir(parents=True, exist_ok=True)
        with open(labels_path, "w") as f:  # the header and the complete lines (drops a cut one)
            f.write(json.dumps(header) + "\n")
            for ex in done.values():
                f.write(json.dumps(ex.to_json()) + "\n")
        tasks = [(s, p, asdict(settings), w) for s, p, w in todo]
        for _, ex in run_tasks(_open_engine, (str(model_path),), _collect_task, tasks, workers=workers,
                               threads=n_threads, ray=ray):
            with open(labels_path, "a") as f:
                f.write(json.dumps(ex.to_json()) + "\n")
            done[ex.problem.text] = ex
            if on_problem:
                on_problem(ex)
    for s, p, w in items:
        if not have(p, w):
            raise SageError(f"no labels for a problem of {labels_path}")
    return [done[p.text] for _, p, _ in items]

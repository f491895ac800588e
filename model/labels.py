"""Labels for `sage heads train`: what the model's own rollouts say about its tokens.

Every problem is answered greedily with tracking on (the default tracked layers, all
heads). Candidate tokens are those with a plausible alternative; the analytic pipeline's
decision points (their 2 strongest alternatives) and a seeded random sample of the other
candidates (their strongest alternative) are rolled out on KV branches. Decision label of
a token: the answer changes under the alternative. Confidence label of a chain: the answer
is right.

Labels are JSON lines: a header naming the settings (a file for other settings is
refused), then one Example per problem, appended the moment it is collected, so an
interrupted run resumes where it stopped (a line cut short is collected again). Problems
run over worker processes or Ray actors (sage.workers: one model per worker, problems as
tasks) and land in the file in the order they finish; the result is in the order asked.

numpy and llama.cpp only: the workers never import torch.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sage.engine import Engine
from sage.errors import SageError
from sage.heads import FEATURES
from sage.inverse import AnalysisConfig, find_decisions, meta_features, risk, rollout, token_features
from sage.inverse.config import is_choice, plausible_alternatives
from sage.inverse.observe import Observation, step_of_tokens
from sage.problems import Problem, score
from sage.reason import ReasonRun
from sage.trace import Decision, Trace

LABELS_VERSION = 2


@dataclass
class Example:
    """One problem's chain, its labelled tokens and its answer facts."""

    source: str
    problem: Problem
    prompt_tokens: list[int]
    in_problem: list[bool]  # per prompt position: part of the problem text
    trace: dict  # Trace.to_dict() without analysis
    features: list[list[float]]  # (n_gen, F) analytic features under the default tracker
    labels: list[dict]  # {"token": k, "label": 0/1, "sampled": bool, "alternatives": n}
    meta: list[float]  # META_FEATURES of the analytic analysis
    confidence: float | None  # the analytic (counterfactual) answer confidence
    answer: str | None
    correct: bool

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


def _probe(trace: Trace, k: int, n_prompt: int, owner: int) -> Decision:
    t = trace.tokens[k]
    alts = plausible_alternatives(t, 0.0)
    return Decision(rank=0, token_index=k, position=n_prompt + k, step=owner, text=t.text, prob=t.prob,
                    entropy=t.entropy, significance=0.0, score=0.0, dependents=[], merged=0,
                    alternatives=alts[:1], branches=[], dependencies=[], confirmed=None)


def collect_one(engine: Engine, source: str, p: Problem, max_tokens: int, n_sample: int, seed: int,
                cfg: AnalysisConfig) -> Example:
    run = ReasonRun(engine, p.text, max_tokens=max_tokens, analysis=cfg)
    for _ in run:
        pass
    trace = run.trace
    obs = Observation.from_engine(engine, trace, run.prompt_tokens)
    n_prompt, n_gen, pm = obs.n_prompt, obs.n_gen, obs.prompt
    feats = token_features(obs) if n_gen else np.zeros((0, len(FEATURES)))
    std, _ = find_decisions(trace, obs.significance, n_prompt, cfg)
    chosen = {d.token_index for d in std}
    # the tokens that had a plausible alternative (the candidate rule without the threshold)
    others = [k for k, t in enumerate(trace.tokens) if is_choice(t, cfg.min_alt_prob) and k not in chosen]
    rng = random.Random(f"{seed}|{p.text}")
    sampled = sorted(rng.sample(others, min(n_sample, len(others))))
    owner = step_of_tokens(trace) if n_gen else []
    probes = [_probe(trace, k, n_prompt, int(owner[k])) for k in sampled]
    if std or probes:
        rollout(engine, trace, run.prompt_tokens, std + probes, cfg, run.stops)
    labels = [
        {"token": d.token_index, "label": int(any(b.changed for b in d.branches)), "sampled": d in probes,
         "alternatives": len(d.branches)}
        for d in std + probes
        if d.branches
    ]
    # the analytic analysis' answer facts (as inverse.analyze computes them)
    rolled = [d for d in std if d.branches]
    for d in rolled:
        d.confirmed = any(b.changed for b in d.branches)
    consistency = sum(d.confirmed for d in rolled) / len(rolled) if rolled else None
    conf = None
    if trace.answer and trace.answer.confidence is not None:
        conf = trace.answer.confidence
        for d in rolled:
            conf *= 1.0 - risk(d)
    meta = meta_features(trace, std, consistency, conf if conf is not None else 0.5)
    answer = trace.answer.value if trace.answer else None
    d = trace.to_dict()
    d["analysis"] = None
    return Example(source, p, list(run.prompt_tokens), [bool(x) for x in pm.in_problem], d,
                   feats.astype(float).tolist(), labels, meta.astype(float).tolist(), conf, answer, score(answer, p))


def _config(max_tokens: int) -> AnalysisConfig:
    return AnalysisConfig(rollout_total=max_tokens, method="greedy", budget=0)


def _open_engine(model_path: str, max_tokens: int, threads: int | None) -> Engine:
    """A worker's model (sage.workers calls it once per worker)."""
    return Engine(model_path, n_ctx=2048, n_threads=threads, track=True, n_seq_max=_config(max_tokens).n_seq_max())


def _collect_task(eng: Engine, task: tuple) -> Example:
    source, p, max_tokens, n_sample, seed = task
    return collect_one(eng, source, p, max_tokens, n_sample, seed, _config(max_tokens))


def read_labels(labels_path: Path, header: dict) -> dict[str, Example]:
    """The examples a labels file already holds, by problem text; {} for no file."""
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
        done[ex.problem.text] = ex
    return done


def collect(model_path: Path, items: list[tuple[str, Problem]], labels_path: Path, *, max_tokens: int, n_sample: int,
            seed: int, n_threads: int | None = None, workers: int | None = 1, ray: str | None = None,
            on_problem: Callable[[Example], None] | None = None) -> list[Example]:
    """Collect (or resume collecting) labelled examples into labels_path, over `workers`
    processes that share n_threads (default: the cores), or Ray actors at the address
    `ray` (sage.workers); in the order of items."""
    header = {"sage_labels": LABELS_VERSION, "model": str(model_path), "max_tokens": max_tokens,
              "n_sample": n_sample, "seed": seed}
    done = read_labels(labels_path, header)
    todo = [(s, p) for s, p in items if p.text not in done]
    if todo:
        from sage.workers import run_tasks

        labels_path.parent.mkdir(parents=True, exist_ok=True)
        with open(labels_path, "w") as f:  # the header and the complete lines (drops a cut one)
            f.write(json.dumps(header) + "\n")
            for ex in done.values():
                f.write(json.dumps(ex.to_json()) + "\n")
        tasks = [(s, p, max_tokens, n_sample, seed) for s, p in todo]
        for _, ex in run_tasks(_open_engine, (str(model_path), max_tokens), _collect_task, tasks, workers=workers,
                               threads=n_threads, ray=ray):
            with open(labels_path, "a") as f:
                f.write(json.dumps(ex.to_json()) + "\n")
            done[ex.problem.text] = ex
            if on_problem:
                on_problem(ex)
    for s, p in items:
        if p.text not in done:
            raise SageError(f"no labels for a problem of {labels_path}")
    return [done[p.text] for _, p in items]

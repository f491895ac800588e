"""How far sage's sampled claims can be trusted: its fork scores, the heads' proposals and
the answer confidence against a large independent sample.

    .venv/bin/python scripts/faithfulness.py [--model smollm2-135m] [--n-fork 6] [--n-conf 40]
        [--k-gt 16] [--random 3] [--max-tokens 200] [--out results.json]

Two parts, on a seeded sample of GSM8K problems from ../shared/data (its own seed per part):

- Forks (--n-fork problems): a greedy chain and `sage ask`'s own analysis at the default
  budget. Evaluation tokens: the candidates sage measured, plus --random tokens per problem
  drawn (seeded) from all tokens that had a plausible alternative (unbiased). At each,
  sage's estimator (its stopping rule, at most 16 samples per distribution, sage's seed)
  and the ground truth: --k-gt samples per distribution for the chosen token and the same
  alternatives, with other seeds. A true fork: ground-truth fork score >= 0.3 with
  permutation p < 0.1 (sage's own rule, on the larger sample). Reported: fork AUROC of
  sage's fork score (all evaluation tokens), Spearman against the ground-truth score, the
  heads' proposal AUROC and entropy's on the random tokens, recall of the true forks by
  the default run's decision points, tokens spent.
- Confidence (--n-conf problems): a greedy chain and sage's distribution from the problem
  alone (its stopping rule, 8 first, at most 16): confidence = share of samples reaching
  the chain's answer. Against the gold answer: ECE (10 bins), AUROC, the token-probability
  confidence's ECE and AUROC, greedy vs vote accuracy.

Pin SAGE_THREADS when something else runs. Numbers are for the model and machine run on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

import numpy as np

from sage.engine import Engine
from sage.heads import SageHeads, resolve_heads
from sage.inverse import AnalysisConfig
from sage.inverse.config import is_choice
from sage.inverse.forks import vote_of
from sage.inverse.outcomes import fork_score, tv_pvalue
from sage.inverse.sampler import BranchSampler, SamplingSettings
from sage.presets import PRESETS, resolve_model
from sage.problems import problem_set, score
from sage.reason import ReasonRun


def auroc(scores, labels) -> float | None:
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return None
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def ece(conf, right, bins: int = 10) -> float | None:
    c, r = np.asarray(conf, float), np.asarray(right, float)
    if not len(c):
        return None
    idx = np.minimum((c * bins).astype(int), bins - 1)
    return float(sum(abs(c[idx == b].mean() - r[idx == b].mean()) * (idx == b).sum()
                     for b in range(bins) if (idx == b).any()) / len(c))


def spearman(a, b) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def measure(sampler: BranchSampler, trace, k: int, alts, k_max: int, fixed: bool):
    """(fork score, p, tokens) at token k over the alternatives `alts` (Alternative list)."""
    tok = trace.tokens[k]
    before = sampler.spent
    reqs = [sampler.request(k, tok.id, k_max)] + [sampler.request(k, a.id, k_max) for a in alts]
    if fixed:
        for r in reqs:
            r.first_round = k_max
    sampler.budget = sampler.spent + 10**9
    sampler.run(reqs)
    co, ao = reqs[0].outcome(), [r.outcome() for r in reqs[1:]]
    f = fork_score(co, [(a.prob, o) for a, o in zip(alts, ao)])
    p = tv_pvalue(co, ao) if f is not None else 1.0
    return f, p, sampler.spent - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-fork", type=int, default=6)
    ap.add_argument("--n-conf", type=int, default=40)
    ap.add_argument("--k-gt", type=int, default=16)
    ap.add_argument("--random", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    res = resolve_model(args.model)
    rec = PRESETS[res.preset].sampling if res.preset else None
    t, tk, tp = rec or (1.0, 0, 1.0)
    where = resolve_heads(None, res.path, res.preset)
    heads = SageHeads.load(where) if where else None
    cfg = AnalysisConfig(sampling=SamplingSettings(t, tk, tp, seed=0))
    eng = Engine(res.path, n_ctx=8192, track=True, n_seq_max=cfg.n_seq_max(), heads=heads, name=res.name)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"model": res.name, "cpu": cpu, "threads": eng.n_threads, "sampling": cfg.sampling.as_dict(),
           "k_gt": args.k_gt, "budget": cfg.budget_tokens(), "max_tokens": args.max_tokens}
    t0 = time.time()

    # --- forks ---------------------------------------------------------------------------
    _, probs = problem_set("gsm8k", args.n_fork, seed=11)
    rows = []
    spent_default, wall_default = [], []
    for pi, p in enumerate(probs):
        run = ReasonRun(eng, p.text, max_tokens=args.max_tokens, analysis=cfg)
        for _ in run:
            pass
        ta = time.time()
        trace = run.analyze()
        wall_default.append(time.time() - ta)
        a = trace.analysis
        spent_default.append(a.outcomes.spent if a.outcomes else 0)
        confirmed = {d.token_index for d in a.decisions if d.confirmed}
        measured = {d.token_index: d for d in a.decisions}
        # the heads' proposal score of every token, as the analysis computed it
        from sage.inverse.decisions import token_features
        from sage.inverse.observe import Observation

        obs = Observation.from_engine(eng, trace, run.prompt_tokens)
        n_prompt, n_gen = obs.n_prompt, len(trace.tokens)
        best = obs.significance[:, n_prompt:n_prompt + n_gen].max(axis=0) if trace.steps else np.zeros(n_gen)
        if heads is not None and heads.trained:
            proposal = np.asarray(heads.inverse(token_features(obs, obs.significance)), float)
        else:
            proposal = best * (1 - np.array([x.prob for x in trace.tokens]))
        choices = [k for k in range(n_gen) if is_choice(trace.tokens[k], cfg.min_alt_prob)]
        rnd = sorted(random.Random(pi).sample(choices, min(args.random, len(choices))))
        evals = sorted(set(measured) | set(rnd))
        sage_s = BranchSampler(eng, trace, run.prompt_tokens, SamplingSettings(t, tk, tp, seed=0), run.stops,
                               parallel=cfg.parallel, round_size=cfg.round_size)
        gt_s = BranchSampler(eng, trace, run.prompt_tokens, SamplingSettings(t, tk, tp, seed=1000 + pi), run.stops,
                             parallel=cfg.parallel, round_size=cfg.round_size)
        gt_s._n_requests = 10_000  # other generators than sage's
        for k in evals:
            tok = trace.tokens[k]
            alts = [x for x in tok.top if x.id != tok.id and x.prob >= cfg.min_alt_prob][: cfg.alternatives]
            if not alts:
                continue
            if k in measured and measured[k].fork is not None:
                sf, sp, st = measured[k].fork, measured[k].fork_p, 0
            else:
                sf, sp, st = measure(sage_s, trace, k, alts, cfg.samples, fixed=False)
            gf, gp, gtok = measure(gt_s, trace, k, alts, args.k_gt, fixed=True)
            if sf is None or gf is None:
                continue
            rows.append({"problem": pi, "token": k, "random": k in rnd, "measured_by_sage": k in measured,
                         "confirmed_by_sage": k in confirmed, "sage_fork": sf, "sage_p": sp, "gt_fork": gf,
                         "gt_p": gp, "true_fork": gf >= cfg.fork_threshold and gp < cfg.alpha,
                         "proposal": float(proposal[k]), "entropy": tok.entropy, "gt_tokens": gtok})
        print(f"forks: problem {pi + 1}/{len(probs)}: {len(evals)} tokens, {time.time() - t0:.0f} s", flush=True)
    truth = [r["true_fork"] for r in rows]
    rnd_rows = [r for r in rows if r["random"]]
    out["forks"] = {
        "problems": len(probs), "tokens": len(rows), "true_forks": int(sum(truth)),
        "fork_auroc": auroc([r["sage_fork"] for r in rows], truth),
        "fork_spearman": spearman([r["sage_fork"] for r in rows], [r["gt_fork"] for r in rows]),
        "random_tokens": len(rnd_rows), "random_true_forks": int(sum(r["true_fork"] for r in rnd_rows)),
        "proposal_auroc_random": auroc([r["proposal"] for r in rnd_rows], [r["true_fork"] for r in rnd_rows]),
        "entropy_auroc_random": auroc([r["entropy"] for r in rnd_rows], [r["true_fork"] for r in rnd_rows]),
        "recall_of_true_forks": (sum(r["confirmed_by_sage"] for r in rows if r["true_fork"]) / max(1, sum(truth))),
        "precision_of_decisions": (sum(r["true_fork"] for r in rows if r["confirmed_by_sage"])
                                   / max(1, sum(r["confirmed_by_sage"] for r in rows))),
        "decisions": int(sum(r["confirmed_by_sage"] for r in rows)),
        "default_tokens_per_problem": float(np.mean(spent_default)) if spent_default else 0.0,
        "default_analysis_s_per_problem": float(np.mean(wall_default)) if wall_default else 0.0,
        "rows": rows,
    }
    print(json.dumps({k: v for k, v in out["forks"].items() if k != "rows"}), flush=True)

    # --- confidence ---------------------------------------------------------------------
    _, cprobs = problem_set("gsm8k", args.n_conf, seed=12)
    crow = []
    for pi, p in enumerate(cprobs):
        run = ReasonRun(eng, p.text, max_tokens=args.max_tokens, analysis=cfg)
        for _ in run:
            pass
        trace = run.trace
        s = BranchSampler(eng, trace, run.prompt_tokens, SamplingSettings(t, tk, tp, seed=0), run.stops,
                          parallel=cfg.parallel, round_size=cfg.round_size, budget=10**9)
        req = s.request(0, None, cfg.samples)
        req.first_round = cfg.start_samples
        s.run([req])
        o = req.outcome()
        v = trace.answer.value if trace.answer else None
        crow.append({"problem": pi, "answer": v, "gold": p.gold, "right": score(v, p),
                     "confidence": o.share_of(v) if v is not None else 0.0,
                     "token_prob": trace.answer.confidence if trace.answer and trace.answer.confidence else 0.0,
                     "vote": vote_of(o), "vote_right": score(vote_of(o) or v, p), "samples": o.n, "tokens": s.spent})
        if (pi + 1) % 10 == 0:
            print(f"confidence: {pi + 1}/{len(cprobs)}, {time.time() - t0:.0f} s", flush=True)
    right = [r["right"] for r in crow]
    out["confidence"] = {
        "problems": len(crow), "right": int(sum(right)),
        "ece": ece([r["confidence"] for r in crow], right),
        "auroc": auroc([r["confidence"] for r in crow], right),
        "token_prob_ece": ece([r["token_prob"] for r in crow], right),
        "token_prob_auroc": auroc([r["token_prob"] for r in crow], right),
        "greedy_accuracy": float(np.mean(right)) if right else None,
        "vote_accuracy": float(np.mean([r["vote_right"] for r in crow])) if crow else None,
        "samples_per_problem": float(np.mean([r["samples"] for r in crow])) if crow else 0.0,
        "tokens_per_problem": float(np.mean([r["tokens"] for r in crow])) if crow else 0.0,
        "rows": crow,
    }
    out["wall_s"] = time.time() - t0
    print(json.dumps({k: v for k, v in out["confidence"].items() if k != "rows"}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    eng.close()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

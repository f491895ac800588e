"""Which candidate rule puts the true forks among the tokens `sage ask` measures, out of
fold on the TRAINING fork problems of a `sage heads train` run (the held-out ones are
not read).

`sage ask` measures, per anchor step, the heads' best `per_anchor` tokens at or above
their threshold plus the most uncertain one (sage.inverse.forks.candidates_in). Here the
training fork problems are split into folds; for each fold the tracking heads are chosen
and the inverse layer is trained on the other folds exactly as `sage heads train` does
(sage.reference.train), and the fold's chains are scored with them. Every rule "the
heads' best a (at or above the fold's threshold, or not) plus entropy's best b" is then
counted on the forks among the random-token labels (the unbiased sample) and on all the
labelled forks.

    .venv/bin/python scripts/candidate_rule.py --labels LABELS.jsonl --model smollm2-135m \\
        -N 100 --holdout 0.4 --fork-problems 100 [--folds 5] [--seed 1]

Takes about 30 minutes for the 73 training fork problems of the shipped SmolLM2 heads
on one thread (one training of the inverse layer per fold).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sage.engine import Engine
from sage.inverse import AnalysisConfig
from sage.inverse.config import is_choice
from sage.inverse.observe import step_of_tokens
from sage.labels import is_fork, plan, read_labels
from sage.presets import resolve_model
from sage.reference.exact import load_model
from sage.reference.train import (chain_features, fork_targets, head_rows, head_scores, labelled,
                                  select_heads, train_inverse)


def oof_scores(model_path: Path, examples, folds: int, seed: int) -> list[tuple[int, np.ndarray, float]]:
    """(example index, proposal over its chain, the fold's threshold), each chain scored by
    heads chosen and a layer trained without its fold."""
    eng = Engine(model_path, n_ctx=256)
    try:
        full = eng.full_attention_layers()
    finally:
        eng.close()
    model = load_model(model_path)
    rows = [head_rows(model, e, full) for e in examples]
    targets = [fork_targets(e) for e in examples]
    idx = np.random.default_rng(seed).permutation(len(examples))
    out = []
    for f in range(folds):
        va = sorted(idx[f::folds].tolist())
        tr = [i for i in range(len(examples)) if i not in va]
        hs = head_scores([rows[i] for i in tr], [examples[i] for i in tr])
        layers, weights = select_heads(hs, full, 8, 4)
        li = [full.index(x) for x in layers]
        feats = [chain_features(r, e, li, weights) for r, e in zip(rows, examples)]
        layer, fit = train_inverse([feats[i] for i in tr], [targets[i] for i in tr], depth=6, width=16, epochs=300,
                                   seed=0)
        out += [(i, np.asarray(layer(feats[i]), np.float64), fit["threshold"]) for i in va]
        print(f"fold {f}: {fit['epoch']} epochs, threshold {fit['threshold']:.2f}, inner out-of-fold AUROC "
              f"{fit['cv_auroc']:.3f}", flush=True)
    return out


def count_rules(examples, scored, kinds: tuple[str, ...], total: int) -> None:
    cfg = AnalysisConfig()
    forks = [(examples[i].get_trace(), lab["token"], prop, thr) for i, prop, thr in scored
             for lab in labelled(examples[i], kinds) if is_fork(lab)]
    print(f"\nforks among the {' and '.join(kinds)} labels: {len(forks)}")
    for a in range(total + 1):
        for use_thr in ((True, False) if a else (False,)):
            b = total - a
            hit, size = 0, []
            for tr, k, prop, thr in forks:
                st = tr.steps[int(step_of_tokens(tr)[k])]
                ks = [j for j in range(st.token_start, st.token_end) if is_choice(tr.tokens[j], cfg.min_alt_prob)]
                h = sorted((j for j in ks if prop[j] >= thr or not use_thr), key=lambda j: (-prop[j], j))[:a]
                en = sorted(ks, key=lambda j: (-tr.tokens[j].entropy, j))[:b]
                cands = set(h) | set(en)
                size.append(len(cands))
                hit += k in cands
            name = f"heads' best {a}{' at/above threshold' if use_thr else ''} + entropy's best {b}"
            print(f"  {name:48} recall {hit:3d}/{len(forks)} = {hit / max(len(forks), 1):.2f}   "
                  f"candidates per step {np.mean(size):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("-N", type=int, required=True)
    ap.add_argument("--holdout", type=float, required=True)
    ap.add_argument("--fork-problems", type=int, default=None)
    ap.add_argument("--train-seed", type=int, default=0, help="the training run's --seed")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1, help="seed of the fold split")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    res = resolve_model(a.model)
    header = json.loads(a.labels.read_text().splitlines()[0])
    recs = read_labels(a.labels, header, None)
    items, n_train, _ = plan(a.N, a.train_seed, a.holdout, a.fork_problems)
    missing = [p.text for _, p, _ in items[:n_train] if p.text not in recs]
    if missing:
        raise SystemExit(f"{len(missing)} training problems have no labels in {a.labels}")
    examples = [e for e in (recs[p.text] for _, p, _ in items[:n_train]) if labelled(e)]
    print(f"{len(examples)} training fork problems", flush=True)
    scored = oof_scores(res.path, examples, a.folds, a.seed)
    total = AnalysisConfig().per_anchor + 1
    count_rules(examples, scored, ("random",), total)
    count_rules(examples, scored, ("random", "candidate"), total)
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

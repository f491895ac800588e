"""`sage heads train`: SAGE heads learned from outcome distributions the model samples.

1. collect (sage.labels, over worker processes or Ray actors: --workers, --ray): every
   problem answered greedily, as `sage ask` answers it; the answers sampled from the
   problem alone, as `sage ask` samples them; on the fork problems, at the analytic
   candidates and at a seeded random sample of all tokens with a plausible alternative,
   the outcome distributions of the chosen token and its alternatives, with a seed of
   their own. A token's label: it is a fork (fork score >= 0.3 with permutation p < 0.1,
   sage's own rule, on these samples). An answer's label: it is right.
2. tracking heads: the torch reference model of the same GGUF gives every (layer, head)
   attention row; each head is scored by the AUROC of the value-weighted attention the
   labelled tokens receive against the fork labels; the best few heads (in at most a few
   layers) are kept, weighted by their AUROC above chance.
3. inverse analysis layer: the transformer of sage.heads, started from its analytic
   initialization (the eq. 7 significance passed through), trained on the token features
   under the chosen heads (class-balanced cross-entropy on the fork labels) for the number
   of epochs whose out-of-fold AUROC (5 folds of the training chains) was best, the
   analytic start (0 epochs) included; its threshold is the one of best balanced accuracy
   (Youden's J) out of fold. The same training on feature subsets is the ablation.
4. meta-cognitive head: ridge logistic regression over the answer features: the share
   alone (recalibrated), the sampled answers' features, or those and the chain's
   uncertainty (never the number of samples: META_SETS); of the feature sets and ridge
   strengths whose out-of-fold predictions on the training answers beat the samples'
   share in ECE and in Brier score and rank right above wrong answers at least as well
   (AUROC within the folds), the simplest within one standard error of the lowest Brier
   score is used by `sage ask`; none: the share stays (fit_meta).
5. evaluation on held-out problems, as `sage ask` runs: chains regenerated through
   llama.cpp with the trained sidecar's tracker and with the analytic one, scored with the
   numpy heads, against the labels' independent samples: proposal AUROC on the random
   tokens (trained, analytic, entropy alone, each ablation), recall of the true forks
   among the candidates sage measures by default, answer-confidence ECE and AUROC
   (trained, samples' share, entropy alone, token probability).

Imports torch (training only; `sage ask` reads the result with numpy).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sage.engine import Engine
from sage.errors import SageError
from sage.heads import (CHAIN_FEATURES, FEATURE_GROUPS, FEATURES, META_FEATURES, InverseLayer, MetaHead, SageHeads,
                        fingerprint)
from sage.inverse import AnalysisConfig, token_features
from sage.inverse.explain import answer_features
from sage.inverse.forks import candidates_in
from sage.inverse.observe import Observation, PromptMap, step_of_tokens
from sage.labels import Example, LabelSettings, analytic_proposal, collect, is_fork, plan, training_problems
from sage.reason import ReasonRun

__all__ = ["training_problems"]  # re-exported: the CLI checks the data before the long part


# --- metrics ---------------------------------------------------------------------------------


def auroc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); nan without both classes."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    xs = s[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1], True])
    avg = (starts[:-1] + starts[1:] - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, np.diff(starts))
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def ece(probs, labels, bins: int = 10) -> float:
    """Expected calibration error over equal-width bins of predicted probability."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.float64)
    if len(p) == 0:
        return float("nan")
    idx = np.minimum((p * bins).astype(int), bins - 1)
    err = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            err += m.sum() / len(p) * abs(p[m].mean() - y[m].mean())
    return float(err)


def chance_ece(probs, draws: int = 2000, seed: int = 0, bins: int = 10) -> float:
    """The ECE a perfectly calibrated confidence would still show on these answers, by
    chance alone: the mean ECE over `draws` outcomes drawn right with probability p
    (seeded). An ECE near it is as good as this many answers can show."""
    p = np.asarray(probs, np.float64)
    if len(p) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    return float(np.mean([ece(p, rng.random(len(p)) < p, bins) for _ in range(draws)]))


# --- labels ----------------------------------------------------------------------------------


def labelled(ex: Example, kinds: tuple[str, ...] = ("candidate", "random")) -> list[dict]:
    """The example's token labels that have a fork score, of the given kinds."""
    return [lab for lab in ex.tokens or [] if lab["fork"] is not None and lab["kind"] in kinds]


# --- 2. tracking heads -----------------------------------------------------------------------


@dataclass
class HeadRows:
    """Every (layer, head)'s attention rows of one chain, in the tracker's layout."""

    probs: np.ndarray  # (L, nh, n_gen, T) row k = the query that produced token k
    vnorm: np.ndarray  # (L, nh, T) value-vector norms (kv head of each query head)
    layers: list[int]

    def rows(self, layer_idx: list[int], weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p, v = self.probs[layer_idx], self.vnorm[layer_idx]
        attn = np.einsum("lh,lhkt->kt", weights, p)
        vattn = np.einsum("lh,lhkt,lht->kt", weights, p, v)
        return attn, vattn


def head_rows(model: torch.nn.Module, ex: Example, layers: list[int]) -> HeadRows:
    tr = ex.get_trace()
    n_prompt, n_gen = len(ex.prompt_tokens), len(tr.tokens)
    ids = torch.tensor([list(ex.prompt_tokens) + [t.id for t in tr.tokens]])
    a = model.layers[0].self_attn
    nkv, hs, group = a.n_kv_heads, a.head_dim, a.n_heads // a.n_kv_heads
    vn: dict[int, torch.Tensor] = {}

    def keep(il):
        def hook(_m, _i, out):
            vn[il] = out.detach()[0].view(-1, nkv, hs).norm(dim=-1).T

        return hook

    hooks = [model.layers[il].self_attn.v_proj.register_forward_hook(keep(il)) for il in layers]
    try:
        with torch.no_grad():
            _, att = model(ids, output_attentions=layers)
    finally:
        for h in hooks:
            h.remove()
    q = torch.arange(n_prompt - 1, n_prompt + n_gen - 1)
    probs = torch.stack([att[il][0][:, q] for il in layers]).float().numpy()
    vnorm = torch.stack([vn[il] for il in layers]).repeat_interleave(group, dim=1).float().numpy()
    return HeadRows(probs, vnorm, list(layers))


def head_scores(rows: list[HeadRows], examples: list[Example]) -> np.ndarray:
    """(L, nh) AUROC of each head's value-weighted attention received by the labelled
    tokens (mean over the rows after the token's own query) against their fork labels."""
    per, ys = [], []
    for r, ex in zip(rows, examples):
        n_prompt = len(ex.prompt_tokens)
        for lab in labelled(ex):
            k = lab["token"]
            later = r.probs[:, :, k + 2 :, n_prompt + k] * r.vnorm[:, :, None, n_prompt + k]
            per.append(later.mean(axis=2) if later.shape[2] else np.zeros(r.probs.shape[:2]))
            ys.append(is_fork(lab))
    x = np.stack(per)  # (n_labels, L, nh)
    y = np.array(ys, bool)
    return np.array([[auroc(x[:, li, h], y) for h in range(x.shape[2])] for li in range(x.shape[1])])


def select_heads(scores: np.ndarray, layers: list[int], k: int, max_layers: int) -> tuple[list[int], np.ndarray]:
    """The k heads of highest AUROC above chance, in at most max_layers layers; weights
    proportional to AUROC - 0.5, summing to 1. Returns (tracked layers, (n_tracked, nh))."""
    order = np.dstack(np.unravel_index(np.argsort(-np.nan_to_num(scores, nan=0.0), axis=None), scores.shape))[0]
    picked: list[tuple[int, int]] = []
    used: list[int] = []
    for li, h in order:
        if len(picked) >= k or not scores[li, h] > 0.5:
            break
        if li not in used:
            if len(used) >= max_layers:
                continue
            used.append(int(li))
        picked.append((int(li), int(h)))
    if not picked:
        raise SageError("no attention head ranks forks better than chance on these labels; "
                        "collect more problems (--n-problems)")
    used.sort()
    w = np.zeros((len(used), scores.shape[1]), np.float32)
    for li, h in picked:
        w[used.index(li), h] = scores[li, h] - 0.5
    w /= w.sum()
    return [layers[li] for li in used], w


# --- 3. inverse analysis layer ---------------------------------------------------------------


class TorchInverse(torch.nn.Module):
    """sage.heads.InverseLayer in torch, on standardized features, batched with a key mask."""

    def __init__(self, depth: int, d: int, mu: np.ndarray, sd: np.ndarray, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        f = len(FEATURES)
        self.register_buffer("mu", torch.tensor(mu, dtype=torch.float32))
        self.register_buffer("sd", torch.tensor(sd, dtype=torch.float32))
        self.d = d

        def rnd(*shape, std=0.02):
            return torch.nn.Parameter(torch.randn(*shape, generator=g) * std)

        # analytic start: h_0[0] = significance, readout = h[0], the blocks' output
        # projections zero (they add nothing until trained; their gradients are not zero)
        si = FEATURES.index("significance")
        w_in = torch.randn(f, d, generator=g) * 0.1
        w_in[:, 0] = 0.0
        w_in[si, 0] = float(sd[si])
        b_in = torch.zeros(d)
        b_in[0] = float(mu[si])
        self.w_in, self.b_in = torch.nn.Parameter(w_in), torch.nn.Parameter(b_in)
        self.blocks = torch.nn.ModuleList()
        for _ in range(depth):
            b = torch.nn.ParameterDict({
                "ln1": torch.nn.Parameter(torch.ones(d)), "wq": rnd(d, d, std=0.2), "wk": rnd(d, d, std=0.2),
                "wv": rnd(d, d, std=0.2), "wo": torch.nn.Parameter(torch.zeros(d, d)),
                "ln2": torch.nn.Parameter(torch.ones(d)), "w1": rnd(d, 4 * d, std=0.2),
                "w2": torch.nn.Parameter(torch.zeros(4 * d, d)),
            })
            self.blocks.append(b)
        readout = torch.zeros(d)
        readout[0] = 1.0
        self.readout = torch.nn.Parameter(readout)
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, F), mask (B, T) bool of real tokens -> (B, T) logits."""
        h = ((x - self.mu) / self.sd) @ self.w_in + self.b_in
        neg = torch.where(mask[:, None, :], 0.0, float("-inf"))
        for b in self.blocks:
            a = h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-6) * b["ln1"]
            q, k, v = a @ b["wq"], a @ b["wk"], a @ b["wv"]
            att = torch.softmax(q @ k.transpose(1, 2) / self.d**0.5 + neg, dim=-1)
            h = h + (att @ v) @ b["wo"]
            m = h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-6) * b["ln2"]
            h = h + torch.nn.functional.gelu(m @ b["w1"], approximate="tanh") @ b["w2"]
        return h @ self.readout + self.bias

    def export(self) -> InverseLayer:
        """Fold the standardization into w_in / b_in: the numpy layer takes raw features."""
        with torch.no_grad():
            w = self.w_in / self.sd[:, None]
            b = self.b_in - (self.mu / self.sd) @ self.w_in
            blocks = [{k: p.detach().numpy().astype(np.float32).copy() for k, p in blk.items()} for blk in self.blocks]
            return InverseLayer(w.numpy().astype(np.float32), blocks, self.readout.detach().numpy().astype(np.float32),
                                float(self.bias), sigmoid=True, b_in=b.numpy().astype(np.float32))


def feature_mask(groups: tuple[str, ...] | None = None) -> np.ndarray:
    """(F,) bool: the features of these FEATURE_GROUPS (None: all)."""
    if groups is None:
        return np.ones(len(FEATURES), bool)
    names = {n for g in groups for n in FEATURE_GROUPS[g]}
    return np.array([n in names for n in FEATURES])


def _batch(feats: list[np.ndarray], labels: list[list[dict]]):
    """Padded (B, T, F) features, (B, T) real-token mask, (B, T) targets, (B, T) labelled
    mask; a label is {"token": k, "label": 0/1}."""
    n, t = len(feats), max(len(f) for f in feats)
    x = np.zeros((n, t, len(FEATURES)), np.float32)
    mask = np.zeros((n, t), bool)
    y = np.zeros((n, t), np.float32)
    lm = np.zeros((n, t), bool)
    for i, (f, labs) in enumerate(zip(feats, labels)):
        x[i, : len(f)] = f
        mask[i, : len(f)] = True
        for lab in labs:
            y[i, lab["token"]] = lab["label"]
            lm[i, lab["token"]] = True
    return torch.tensor(x), torch.tensor(mask), torch.tensor(y), torch.tensor(lm)


def _fit(feats, labels, *, depth, width, epochs, seed, lr, watch=None):
    """Train one TorchInverse on (feats, labels) for `epochs` epochs (full batch, AdamW,
    class-balanced cross-entropy); watch: (feats, labels) whose labelled tokens' logits
    are recorded after every epoch, (epochs + 1, n) with the start as row 0."""
    torch.manual_seed(seed)
    allx = np.concatenate([f for f in feats if len(f)])
    mu, sd = allx.mean(axis=0), allx.std(axis=0) + 1e-6
    net = TorchInverse(depth, width, mu, sd, seed)
    xt, mt, yt, lt = _batch(feats, labels)
    n_pos = float(yt[lt].sum())
    pos_weight = torch.tensor((float(lt.sum()) - n_pos) / max(n_pos, 1.0))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-3)
    seen = []
    if watch is not None:
        xv, mv, _, lv = _batch(*watch)
        with torch.no_grad():
            seen.append(net(xv, mv)[lv].numpy())
    for _ in range(epochs):
        opt.zero_grad()
        out = net(xt, mt)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out[lt], yt[lt], pos_weight=pos_weight)
        loss.backward()
        opt.step()
        if watch is not None:
            with torch.no_grad():
                seen.append(net(xv, mv)[lv].numpy())
    return net, (np.stack(seen) if seen else None)


def train_inverse(feats: list[np.ndarray], labels: list[list[dict]], *, depth: int, width: int, epochs: int,
                  seed: int, folds: int = 5, lr: float = 3e-3, keep: np.ndarray | None = None) -> tuple[InverseLayer, dict]:
    """The inverse layer trained on every chain for the number of epochs (0 = its analytic
    start .. epochs) whose out-of-fold AUROC was best: the chains are split into `folds`
    (seeded), each fold scored by a layer trained on the others after every epoch, and
    the folds' scores pooled. The threshold: best balanced accuracy (Youden's J) of the
    out-of-fold scores at that epoch. labels: per chain [{"token": k, "label": 0/1}].
    keep: (F,) bool, the features it may use (the others are held at 0: the ablation)."""
    if keep is not None:
        feats = [f * keep[None, :].astype(np.float32) for f in feats]
    args = dict(depth=depth, width=width, seed=seed, lr=lr)
    idx = np.random.default_rng(seed).permutation(len(feats))
    folds = max(2, min(folds, len(feats)))
    oof, ys = [], []
    for f in range(folds):
        va = set(idx[f::folds].tolist())
        tr = [i for i in range(len(feats)) if i not in va]
        vl = sorted(va)
        if not tr or not any(labels[i] for i in vl):
            continue
        _, seen = _fit([feats[i] for i in tr], [labels[i] for i in tr], epochs=epochs,
                       watch=([feats[i] for i in vl], [labels[i] for i in vl]), **args)
        oof.append(seen)  # (epochs + 1, n_val labels of this fold)
        ys += [lab["label"] for i in vl for lab in sorted(labels[i], key=lambda x: x["token"])]
    y = np.array(ys, bool)
    if oof:
        scores = np.concatenate(oof, axis=1)  # (epochs + 1, all out-of-fold labels)
        curve = np.array([auroc(sc, y) for sc in scores])
        curve = np.nan_to_num(curve, nan=-1.0)
        best = int(np.argmax(curve))  # the earliest of the best
        cv, thr = float(curve[best]), youden_threshold(1.0 / (1.0 + np.exp(-scores[best])), y)
        start = float(curve[0])
    else:
        best, cv, thr, start = 0, float("nan"), 0.5, float("nan")
    net, _ = _fit(feats, labels, epochs=best, **args)
    layer = net.export()
    if keep is not None:  # the held-at-0 features get no weight in the exported layer
        layer.w_in = layer.w_in * keep[:, None].astype(np.float32)
    n_lab = sum(len(x) for x in labels)
    n_pos = sum(lab["label"] for x in labels for lab in x)
    return layer, {"cv_auroc_start": start if start != -1.0 else float("nan"), "cv_auroc": cv if cv != -1.0 else float("nan"),
                   "epoch": best, "threshold": thr, "train_labels": int(n_lab), "train_positive": int(n_pos)}


def youden_threshold(p: np.ndarray, y: np.ndarray) -> float:
    """The threshold on p that maximizes TPR - FPR (ties: the highest), clipped to
    [0.05, 0.95]; 0.5 when one class is missing."""
    if y.all() or not y.any():
        return 0.5
    ths = np.unique(np.round(p, 3))
    pred = p[None, :] >= ths[:, None]
    j = pred[:, y].mean(axis=1) - pred[:, ~y].mean(axis=1)
    best = np.flatnonzero(j == j.max())[-1]
    return float(np.clip(ths[best], 0.05, 0.95))


# --- 4. meta-cognitive head ------------------------------------------------------------------


def train_meta(x: np.ndarray, y: np.ndarray, l2: float = 1.0) -> MetaHead:
    """Ridge logistic regression (Newton steps) on standardized features, folded back.
    Features constant over the data get weight 0."""
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = np.zeros(z.shape[1])
    reg = np.r_[np.full(z.shape[1] - 1, l2), 1e-2]  # a little on the bias too: finite when y is one class
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-z @ w))
        g = z.T @ (p - y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, g)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    wf = np.where(x.std(axis=0) > 1e-9, w[:-1] / sd, 0.0)
    return MetaHead(wf.astype(np.float32), float(w[-1] - (mu / sd * (x.std(axis=0) > 1e-9)) @ w[:-1]))


def only(x: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """x with every answer feature but `names` held at 0 (a baseline of fewer features)."""
    keep = np.array([n in names for n in META_FEATURES])
    return x * keep[None, :]


def answer_rows(examples: list[Example]) -> tuple[np.ndarray, np.ndarray, list[Example]]:
    """(X, y, examples) of the examples with an answer and samples from the start."""
    xs, ys, used = [], [], []
    for e in examples:
        x = answer_features(e.get_trace(), e.start_outcome()) if e.start["values"] else None
        if x is not None:
            xs.append(x)
            ys.append(float(e.correct))
            used.append(e)
    return (np.array(xs).reshape(-1, len(META_FEATURES)), np.array(ys), used)


META_L2 = (0.1, 1.0, 10.0, 100.0)  # the meta head's ridge strengths, chosen out of fold
# the meta head's feature sets, in order of simplicity, chosen out of fold with its ridge:
# the share alone, the answers sampled from the problem alone, or those and the chain's own
# uncertainty (fewer features are fewer to overfit on a few dozen answers). None reads the
# number of samples (log_samples): in the labels it follows the stopping rule at the default
# budget (more samples where they disagree: on Qwen's 84 training answers it correlates
# -0.48 with rightness), in `sage ask` also the user's --budget (3 samples at the demo's
# 1200 tokens), so its weight would not carry over (a head with it put an answer 3 of 3
# samples reached at 95 %)
META_SETS: dict[str, tuple[str, ...]] = {
    "share": ("logit_share",),  # the share recalibrated (Platt scaling): it cannot reorder the answers
    "samples": tuple(f for f in META_FEATURES if f not in CHAIN_FEATURES and f != "log_samples"),
    "all": tuple(f for f in META_FEATURES if f != "log_samples"),
}


def _folds(n: int, seed: int, folds: int) -> list[np.ndarray]:
    """The validation indices of each fold (seeded)."""
    idx = np.random.default_rng(seed).permutation(n)
    return [idx[f::folds] for f in range(folds)]


def _oof_meta(x: np.ndarray, y: np.ndarray, seed: int, folds: int, l2: float) -> np.ndarray:
    """Out-of-fold predictions of the meta head (`folds`-fold, seeded)."""
    pred = np.zeros(len(y))
    for va in _folds(len(y), seed, folds):
        tr = np.setdiff1d(np.arange(len(y)), va)
        head = train_meta(x[tr], y[tr], l2)
        pred[va] = [head(r) for r in x[va]]
    return pred


def _fold_auroc(pred: np.ndarray, y: np.ndarray, seed: int, folds: int) -> float:
    """The mean AUROC within the folds (nan where no fold has both classes). Within a
    fold, as each head is one fit: pooled out-of-fold predictions of five fits rank worse
    than any one of them (a monotone recalibration of the share, which ranks exactly as
    the share does, pooled: 0.874 against the share's 0.900 on Qwen's 84 training answers)."""
    vals = [auroc(pred[va], y[va]) for va in _folds(len(y), seed, folds)]
    vals = [v for v in vals if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def fit_meta(x: np.ndarray, y: np.ndarray, share: np.ndarray, seed: int, folds: int = 5,
             least: int = 30) -> tuple[MetaHead, bool, dict]:
    """The meta head on all training answers, and whether `sage ask` should use it.

    Every feature set of META_SETS at every ridge strength of META_L2 (on standardized
    features; seven features on a few dozen answers overfit at a weak ridge) is judged
    out of fold (`folds`-fold, seeded) against the samples' share (`share`, what sage ask
    shows otherwise): it must beat the share in calibration (ECE) and in Brier score (a
    proper score: it also counts how well right answers are told from wrong ones, which a
    head can lose while its ECE, on few answers, looks better by chance), and rank right
    above wrong answers at least as well (AUROC within the folds; the share's ties, 8 of 8
    and 12 of 12 both 1, broken by the smoothed share the logit_share feature reads). Of
    those that do, the simplest (fewest features, then strongest ridge) whose Brier score
    is within one standard error of the lowest is used (the one-standard-error rule: on a
    hundred or two answers, a difference smaller than its noise does not buy features;
    the error is that of the per-answer difference from the lowest); none: the share stays
    (the head of lowest Brier score is still fitted and reported). Fewer than `least`
    answers: the analytic head, unused."""
    info: dict = {"meta_cv_answers": int(len(y))}
    if len(y) < least:
        return MetaHead.analytic(), False, info
    share = np.asarray(share, float)
    smoothed = 1.0 / (1.0 + np.exp(-x[:, META_FEATURES.index("logit_share")]))
    base = {"meta_cv_ece_share": ece(share, y), "meta_cv_brier_share": float(np.mean((share - y) ** 2)),
            "meta_cv_auroc_share": _fold_auroc(share + 1e-6 * smoothed, y, seed, folds)}
    cands = []
    for name, feats in META_SETS.items():  # in order of simplicity: fewer features, then a stronger ridge
        for l2 in sorted(META_L2, reverse=True):
            pred = _oof_meta(only(x, feats), y, seed, folds, l2)
            loss = (pred - y) ** 2
            c = {"meta_features": name, "meta_l2": l2, "meta_cv_ece": ece(pred, y),
                 "meta_cv_brier": float(loss.mean()), "meta_cv_auroc": _fold_auroc(pred, y, seed, folds), "loss": loss}
            # it must also rank at least as well as the share: a head better calibrated on
            # average but ranking worse calls unanimous, right answers unsure (Qwen, 84
            # training answers: the head put one that 8 of 8 samples reached at 71 %)
            c["ok"] = (c["meta_cv_ece"] < base["meta_cv_ece_share"] and c["meta_cv_brier"] < base["meta_cv_brier_share"]
                       and not c["meta_cv_auroc"] < base["meta_cv_auroc_share"])  # (nan: one class, not judged)
            cands.append(c)
    good = [c for c in cands if c["ok"]]
    lowest = min(good or cands, key=lambda c: c["meta_cv_brier"])  # (ties: the first, the simplest)
    best = lowest
    if good:
        for c in good:  # the first (simplest) within one standard error of the lowest
            d = c["loss"] - lowest["loss"]
            if d.mean() <= d.std(ddof=1) / np.sqrt(len(d)):
                best = c
                break
    info.update(base, **{k: v for k, v in best.items() if k not in ("ok", "loss")},
                meta_cv_brier_lowest=lowest["meta_cv_brier"])
    return train_meta(only(x, META_SETS[best["meta_features"]]), y, best["meta_l2"]), bool(good), info


# --- the whole command -----------------------------------------------------------------------


@dataclass
class TrainSettings:
    model_path: Path
    base_name: str
    preset: str | None = None
    n: int = 64
    holdout: float = 0.25
    seed: int = 0
    max_tokens: int = 160
    n_sample: int = 3  # random tokens labelled per fork problem (of those with a plausible alternative)
    n_candidates: int = 1  # analytic candidates labelled per fork problem
    samples: int = 8  # per distribution at a labelled token
    alternatives: int = 2  # alternatives sampled at a labelled token
    fork_problems: int | None = None  # problems with token labels (None: all)
    depth: int = 6
    width: int = 16
    epochs: int = 300
    n_heads: int = 8
    max_layers: int = 4
    n_threads: int | None = None
    workers: int | None = 1  # label collection's worker processes (sage.workers)
    ray: str | None = None  # or Ray actors at this address
    labels: Path | None = None
    ablation: bool = True  # also train on feature subsets and report them

    def label_settings(self) -> LabelSettings:
        return LabelSettings.for_model(self.preset, max_tokens=self.max_tokens, n_random=self.n_sample,
                                       n_candidates=self.n_candidates, samples=self.samples,
                                       alternatives=self.alternatives, seed=self.seed)


@dataclass
class TrainResult:
    heads: SageHeads
    metrics: dict = field(default_factory=dict)


def _regenerate(eng: Engine, ex: Example, max_tokens: int):
    """The example's chain generated again on eng (as `sage ask` generates it): (trace,
    observation), or None where llama.cpp chose another token somewhere (counted)."""
    run = ReasonRun(eng, ex.problem.text, max_tokens=max_tokens)
    for _ in run:
        pass
    tr = run.trace
    if [t.id for t in tr.tokens] != [t["id"] for t in ex.trace["tokens"]]:
        return None
    return tr, Observation.from_engine(eng, tr, run.prompt_tokens)


def _recall(trace, scores: np.ndarray, threshold: float, cfg: AnalysisConfig, k: int) -> bool:
    """Whether token k is among the candidates sage measures when its step is an anchor
    (sage.inverse.forks.candidates_in: the heads' best per_anchor at or above the
    threshold, and the most uncertain token)."""
    step = int(step_of_tokens(trace)[k])
    return k in candidates_in(trace, range(step, step + 1), scores, cfg, threshold)


def _entropy_recall(trace, cfg: AnalysisConfig, k: int) -> bool:
    """The same number of candidates, by entropy alone."""
    from sage.inverse.config import is_choice

    step = int(step_of_tokens(trace)[k])
    st = trace.steps[step]
    ks = [j for j in range(st.token_start, st.token_end) if is_choice(trace.tokens[j], cfg.min_alt_prob)]
    top = sorted(ks, key=lambda j: (-trace.tokens[j].entropy, j))[: cfg.per_anchor + 1]
    return k in top


def _fork_rows(heads: SageHeads, s: TrainSettings, forks: list[Example], variants: dict[str, InverseLayer],
               cfg: AnalysisConfig, n_seq: int, rows: list[dict]) -> int:
    """The held-out fork problems' random tokens, scored as `sage ask` scores them (appended
    to rows); returns how many chains regenerated differently from their labels."""
    differ = 0
    trained_eng = Engine(s.model_path, n_ctx=8192, n_threads=s.n_threads, track=True, heads=heads, n_seq_max=n_seq)
    analytic_eng = Engine(s.model_path, n_ctx=8192, n_threads=s.n_threads, track=True, n_seq_max=n_seq)
    try:
        for ex in forks:
            got_t = _regenerate(trained_eng, ex, s.max_tokens)
            got_a = _regenerate(analytic_eng, ex, s.max_tokens)
            if got_t is None or got_a is None:
                differ += 1  # cannot happen with greedy decoding on one build; counted, never hidden
                continue
            (tr, obs_t), (_, obs_a) = got_t, got_a
            f_t = token_features(obs_t)
            trained = np.asarray(heads.inverse(f_t), np.float64)
            analytic = analytic_proposal(obs_a)
            var = {name: np.asarray(layer(f_t), np.float64) for name, layer in variants.items()}
            for lab in labelled(ex, ("random",)):
                k = lab["token"]
                rows.append({
                    "fork": is_fork(lab), "score": lab["fork"], "trained": trained[k], "analytic": analytic[k],
                    "entropy": tr.tokens[k].entropy, **{f"v:{n}": v[k] for n, v in var.items()},
                    "recall_trained": _recall(tr, trained, heads.threshold, cfg, k),
                    "recall_analytic": _recall(tr, analytic, cfg.threshold, cfg, k),
                    "recall_entropy": _entropy_recall(tr, cfg, k),
                })
    finally:
        trained_eng.close()
        analytic_eng.close()
    return differ


def evaluate(heads: SageHeads, s: TrainSettings, forks: list[Example], answers: list[Example],
             variants: dict[str, InverseLayer], entropy_meta: MetaHead) -> dict:
    """Held-out metrics as `sage ask` runs (module docstring, step 5)."""
    cfg = AnalysisConfig()
    n_seq = cfg.n_seq_max()
    rows = []  # per random token: fork label, fork score, scores, recalls
    differ = _fork_rows(heads, s, forks, variants, cfg, n_seq, rows) if forks else 0
    if differ:
        raise SageError(f"{differ} held-out chains regenerated differently from their labels; the labels "
                        "are for another build of the model or of llama.cpp: remove the labels file")
    y = np.array([r["fork"] for r in rows], bool)
    m: dict = {"test_fork_problems": len(forks), "test_random_tokens": len(rows), "test_random_forks": int(y.sum())}
    for name in ("trained", "analytic", "entropy"):
        m[f"auroc_{name}"] = auroc([r[name] for r in rows], y)
        m[f"recall_{name}"] = float(np.mean([r[f"recall_{name}"] for r in rows if r["fork"]])) if y.any() else None
    m["ablation"] = {n: auroc([r[f"v:{n}"] for r in rows], y) for n in variants}

    x, yc, used = answer_rows(answers)
    share = [e.start_outcome().share_of(e.answer) for e in used]  # what `sage ask` reports without a meta head
    tok = [1 / (1 + np.exp(-r[META_FEATURES.index("logit_token_prob")])) for r in x]
    pred = [heads.meta(r) for r in x]
    ent = [entropy_meta(r) for r in x]
    m.update({
        "test_answers": int(len(yc)), "test_correct": int(yc.sum()),
        "ece_trained": ece(pred, yc), "ece_share": ece(share, yc), "ece_entropy": ece(ent, yc),
        "ece_token_prob": ece(tok, yc),
        # what chance alone gives a perfectly calibrated confidence on this many answers
        "ece_chance_trained": chance_ece(pred), "ece_chance_share": chance_ece(share),
        "auroc_conf_trained": auroc(pred, yc), "auroc_conf_share": auroc(share, yc),
        "auroc_conf_entropy": auroc(ent, yc), "auroc_conf_token_prob": auroc(tok, yc),
    })
    return m


def _nan_to_none(v):
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    return v


def chain_features(rows: HeadRows, e: Example, layer_idx: list[int], weights: np.ndarray) -> np.ndarray:
    """The inverse layer's token features of e's chain under the chosen heads (layer_idx:
    their layers' positions among the full-attention layers; weights: theirs)."""
    attn, vattn = rows.rows(layer_idx, weights)
    # the labels file keeps which prompt tokens are the problem's, not their texts (the
    # features do not read them)
    prompt = PromptMap([""] * len(e.in_problem), np.array(e.in_problem, bool))
    return token_features(Observation(e.get_trace(), len(e.prompt_tokens), prompt, attn, vattn))


def fork_targets(e: Example) -> list[dict]:
    """The inverse layer's targets of e: its labelled tokens, 1 where a fork."""
    return [{"token": lab["token"], "label": int(is_fork(lab))} for lab in labelled(e)]


def _fork_heads(s: TrainSettings, tr_ex: list[Example], full: list[int], emit) -> dict:
    """Steps 2 and 3 (module docstring): the tracking heads and the inverse layer, trained
    on the token labels of the training fork problems, and the ablation's variants."""
    from sage.reference.exact import load_model

    n_lab = sum(len(labelled(e)) for e in tr_ex)
    n_pos = sum(is_fork(lab) for e in tr_ex for lab in labelled(e))
    if n_pos == 0 or n_pos == n_lab:
        raise SageError(f"the {n_lab} training labels are all of one class; collect more problems (--n-problems)")

    # 2. tracking heads, on the torch reference model of the same GGUF
    emit("heads", {})
    model = load_model(s.model_path)
    rows = [head_rows(model, e, full) for e in tr_ex]
    hs = head_scores(rows, tr_ex)
    layers, weights = select_heads(hs, full, s.n_heads, s.max_layers)
    li = [full.index(x) for x in layers]

    # 3. inverse layer on the features under the chosen heads
    emit("inverse", {})
    feats = [chain_features(r, e, li, weights) for r, e in zip(rows, tr_ex)]
    del rows
    targets = [fork_targets(e) for e in tr_ex]
    fit_args = dict(depth=s.depth, width=s.width, epochs=s.epochs, seed=s.seed)
    inverse, fit = train_inverse(feats, targets, **fit_args)
    variants: dict[str, InverseLayer] = {}
    if s.ablation:
        groups = [g for g in FEATURE_GROUPS if g != "base"]
        subsets = {"base": ("base",), **{f"base + {g}": ("base", g) for g in groups}}
        for name, gs in subsets.items():
            variants[name], _ = train_inverse(feats, targets, keep=feature_mask(gs), **fit_args)
    return {"layers": layers, "weights": weights, "inverse": inverse, "threshold": fit["threshold"], "variants": variants,
            "metrics": {"train_labels": n_lab, "train_forks": int(n_pos), "cv_auroc_start": fit["cv_auroc_start"],
                        "cv_auroc": fit["cv_auroc"], "epoch": fit["epoch"], "threshold": fit["threshold"],
                        "tracked_heads": int((weights > 0).sum()), "tracked_layers": layers,
                        "best_head_auroc": float(np.nanmax(hs))}}


def train(s: TrainSettings, on_event: Callable[[str, dict], None] | None = None) -> TrainResult:
    """Collect labels, select heads, train both heads, evaluate on held-out problems. With
    `fork_problems` 0 only answers are collected and only the meta-cognitive head is
    trained: the fork heads stay the analytic ones (trained = False, info "inverse" =
    "analytic"), and `sage ask` uses the meta head where its training kept it."""
    from sage.engine import default_threads
    from sage.kernels.tracker import default_layers

    emit = on_event or (lambda kind, info: None)
    torch.set_num_threads(s.n_threads or default_threads())
    t_start = time.time()
    items, n_train, order = plan(s.n, s.seed, s.holdout, s.fork_problems)
    if s.labels is None:
        raise SageError("no labels file given")
    emit("collect", {"n": s.n, "path": str(s.labels)})
    examples = collect(s.model_path, items, s.labels, s.label_settings(), order=order, n_threads=s.n_threads,
                       workers=s.workers, ray=s.ray,
                       on_problem=lambda ex: emit("problem", {"correct": ex.correct,
                                                              "labels": len(ex.tokens or [])}))
    t_collect = time.time()
    tr_all, te_all = examples[:n_train], examples[n_train:]
    # (answers only: token labels a file holds for some of these problems are not used)
    with_forks = s.fork_problems != 0
    tr_ex = [e for e in tr_all if labelled(e)] if with_forks else []
    te_forks = [e for e in te_all if labelled(e, ("random",))] if with_forks else []
    eng = Engine(s.model_path, n_ctx=256)
    try:
        full = eng.full_attention_layers()
        fp, n_head, base_arch = fingerprint(eng), eng.n_head, eng.architecture
    finally:
        eng.close()
    if not with_forks:  # answers only: the analytic fork heads `sage ask` has without a sidecar
        base = SageHeads.analytic(fp, s.base_name, [full[i] for i in default_layers(len(full))], n_head, s.depth)
        fork = {"layers": base.tracked_layers, "weights": base.head_weights, "inverse": base.inverse,
                "threshold": base.threshold, "variants": {},
                "metrics": {"train_labels": 0, "train_forks": 0, "tracked_heads": int((base.head_weights > 0).sum()),
                            "tracked_layers": base.tracked_layers}}
    else:
        fork = _fork_heads(s, tr_ex, full, emit)

    # 4. meta head
    emit("meta", {})
    x, y, used = answer_rows(tr_all)
    meta, use_meta, meta_info = fit_meta(x, y, np.array([e.start_outcome().share_of(e.answer) for e in used]), s.seed)
    entropy_meta = train_meta(only(x, ("mean_entropy",)), y) if len(y) else MetaHead.analytic()

    heads = SageHeads(fp, s.base_name, fork["layers"], fork["weights"], fork["threshold"], fork["inverse"], meta,
                      trained=with_forks)
    heads.info = {"meta": "trained" if use_meta else "samples", "inverse": "trained" if heads.trained else "analytic"}

    # 5. held-out evaluation through llama.cpp, as sage ask runs
    emit("evaluate", {"n": len(te_forks)})
    m = evaluate(heads, s, te_forks, te_all, fork["variants"], entropy_meta)
    metrics = {
        "train_problems": len(tr_all), "test_problems": len(te_all), "train_fork_problems": len(tr_ex),
        **m, **fork["metrics"],
        "train_answers": int(len(y)), "train_correct": int(y.sum()), "meta_used": use_meta, **meta_info,
        "labels": {"samples": s.samples, "alternatives": s.alternatives, "random": s.n_sample,
                   "candidates": s.n_candidates, "max_tokens": s.max_tokens},
        "collect_s": t_collect - t_start, "train_s": time.time() - t_collect,
    }
    # undefined numbers (a class missing from a small held-out set) are null, never NaN, in JSON
    metrics = {k: _nan_to_none(v) for k, v in metrics.items()}
    heads.info.update({
        "data": f"{s.n} problems (GSM8K train + arithmetic), seed {s.seed}",
        "seed": str(s.seed),
        "base_architecture": base_arch,
        "metrics": json.dumps(metrics),
    })
    emit("done", metrics)
    return TrainResult(heads, metrics)

"""`sage heads train`: SAGE heads learned from the model's own counterfactual rollouts.

1. collect: every problem is answered greedily with tracking on (the default tracked
   layers, all heads). Candidate tokens are those with a plausible alternative; the
   analytic pipeline's decision points (their 2 strongest alternatives) and a seeded
   random sample of the other candidates (their strongest alternative) are rolled out
   on KV branches. Decision label of a token: the answer changes under the alternative.
   Confidence label of a chain: the answer is right. Labels are saved as JSON lines and
   reused (sage.labels, over worker processes or Ray actors: --workers, --ray).
2. tracking heads: the torch reference model of the same GGUF gives every (layer, head)
   attention row; each head is scored by the AUROC of the value-weighted attention the
   labelled tokens receive; the best few heads (in at most a few layers) are kept,
   weighted by their AUROC above chance.
3. inverse analysis layer: the transformer of model/heads.py, started from its analytic
   initialization (the eq. 7 significance passed through), trained on the token features
   under the chosen heads, with early stopping on a validation split.
4. meta-cognitive head: ridge logistic regression over the answer features.
5. evaluation on held-out problems, as `sage ask` runs: regenerated through llama.cpp
   with the trained sidecar's tracker, scored with the numpy heads: decision AUROC
   (analytic vs trained) and confidence ECE (analytic vs trained).

Imports torch (training only; `sage ask` reads the result with numpy).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sage.problems import Problem, arithmetic_problems, data_file, load_problems
from sage.engine import Engine
from sage.errors import SageError
from sage.heads import FEATURES, InverseLayer, MetaHead, SageHeads, fingerprint
from sage.inverse import token_features
from sage.inverse.observe import Observation, PromptMap
from sage.labels import Example, collect
from sage.reason import ReasonRun


# --- problems --------------------------------------------------------------------------------


def training_problems(n: int, seed: int, holdout: float) -> tuple[list[tuple[str, Problem]], list[tuple[str, Problem]]]:
    """(train, held-out): half GSM8K-train problems (a seeded sample of the file
    sage.problems.data_file finds: $SAGE_DATA, ../shared/data or the shipped sample),
    half generated arithmetic problems, split by a seeded shuffle; each item is
    (source, problem)."""
    if n < 4:
        raise SageError("training needs at least 4 problems (some to train on, some held out)")
    if not 0.0 < holdout < 1.0:
        raise SageError("the held-out share must be between 0 and 1")
    path, where = data_file("gsm8k")
    gsm = load_problems(path)
    rng = random.Random(seed)
    n_gsm = n // 2
    if n_gsm > len(gsm):
        raise SageError(f"{n} problems need {n_gsm} GSM8K problems, and {path} ({where}) holds {len(gsm)}; "
                        "ask for fewer, or set $SAGE_DATA to a folder with the full gsm8k_train.jsonl")
    # a seed of its own for the sample, far from the bench's default sample (seed 0)
    picks = rng.sample(range(len(gsm)), n_gsm)
    items = [("gsm8k", gsm[i]) for i in picks]
    items += [("arithmetic", p) for p in arithmetic_problems(n - n_gsm, seed=1000 + seed)]
    rng.shuffle(items)
    n_test = max(1, round(n * holdout))
    return items[n_test:], items[:n_test]


# --- 1. labels: sage.labels (torch-free, so label workers never import torch) ------------


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
    tokens (mean over the rows after the token's own query) against the decision labels."""
    per, ys = [], []
    for r, ex in zip(rows, examples):
        n_prompt = len(ex.prompt_tokens)
        for lab in ex.labels:
            k = lab["token"]
            later = r.probs[:, :, k + 2 :, n_prompt + k] * r.vnorm[:, :, None, n_prompt + k]
            per.append(later.mean(axis=2) if later.shape[2] else np.zeros(r.probs.shape[:2]))
            ys.append(lab["label"])
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
        raise SageError("no attention head ranks decision points better than chance on these labels; "
                        "collect more problems (--n)")
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


def _batch(feats: list[np.ndarray], labels: list[list[dict]]):
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


def train_inverse(feats: list[np.ndarray], labels: list[list[dict]], val: int, *, depth: int, width: int,
                  epochs: int, seed: int, lr: float = 3e-3) -> tuple[InverseLayer, dict]:
    """Train on all but the last `val` chains, keep the epoch of best validation AUROC."""
    torch.manual_seed(seed)
    allx = np.concatenate([f for f in feats[: len(feats) - val] if len(f)])
    mu, sd = allx.mean(axis=0), allx.std(axis=0) + 1e-6
    net = TorchInverse(depth, width, mu, sd, seed)
    xt, mt, yt, lt = _batch(feats[: len(feats) - val], labels[: len(feats) - val])
    xv, mv, yv, lv = _batch(feats[len(feats) - val :], labels[len(feats) - val :])
    n_pos = float(yt[lt].sum())
    pos_weight = torch.tensor((float(lt.sum()) - n_pos) / max(n_pos, 1.0))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-3)
    with torch.no_grad():
        start = auroc(net(xv, mv)[lv].numpy(), yv[lv].numpy().astype(bool))
    # epoch 0 (the analytic start) is a candidate too: training must beat it on validation
    best = (start if start == start else -1.0, 0, {k: v.detach().clone() for k, v in net.state_dict().items()})
    for ep in range(epochs):
        net.train()
        opt.zero_grad()
        out = net(xt, mt)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out[lt], yt[lt], pos_weight=pos_weight)
        loss.backward()
        opt.step()
        with torch.no_grad():
            a = auroc(net(xv, mv)[lv].numpy(), yv[lv].numpy().astype(bool))
        if a > best[0]:
            best = (a, ep + 1, {k: v.detach().clone() for k, v in net.state_dict().items()})
    net.load_state_dict(best[2])
    with torch.no_grad():
        pv = torch.sigmoid(net(xv, mv)[lv]).numpy()
    layer = net.export()
    # threshold: best balanced accuracy (Youden's J = TPR - FPR) on validation; F1 would
    # pick "everything is a decision point" whenever most labels are positive (they are)
    thr = youden_threshold(pv, yv[lv].numpy().astype(bool))
    return layer, {"val_auroc_start": start, "val_auroc": best[0], "epoch": best[1], "threshold": thr,
                   "train_labels": int(lt.sum()), "train_positive": int(n_pos), "val_labels": int(lv.sum())}


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
    wf = w[:-1] / sd
    return MetaHead(wf.astype(np.float32), float(w[-1] - (mu / sd) @ w[:-1]))


# --- the whole command -----------------------------------------------------------------------


@dataclass
class TrainSettings:
    model_path: Path
    base_name: str
    n: int = 64
    holdout: float = 0.25
    seed: int = 0
    max_tokens: int = 160
    n_sample: int = 4  # random candidate tokens rolled out per chain, beside the analytic decisions
    depth: int = 6
    width: int = 16
    epochs: int = 300
    n_heads: int = 8
    max_layers: int = 4
    n_threads: int | None = None
    workers: int | None = 1  # label collection's worker processes (sage.workers)
    ray: str | None = None  # or Ray actors at this address
    labels: Path | None = None


@dataclass
class TrainResult:
    heads: SageHeads
    metrics: dict = field(default_factory=dict)


def held_out_scores(heads: SageHeads, s: TrainSettings, examples: list[Example]) -> tuple[list, list, list, int]:
    """Regenerate held-out chains through llama.cpp tracking with the trained heads (as
    `sage ask` does) and score their labelled tokens and answers with the numpy heads."""
    eng = Engine(s.model_path, n_ctx=2048, n_threads=s.n_threads, track=True, heads=heads)
    scores, ys, meta, differ = [], [], [], 0
    try:
        for ex in examples:
            run = ReasonRun(eng, ex.problem.text, max_tokens=s.max_tokens)
            for _ in run:
                pass
            tr = run.trace
            old = ex.get_trace()
            if [t.id for t in tr.tokens] != [t.id for t in old.tokens]:
                differ += 1  # cannot happen with greedy decoding; counted, never hidden
                continue
            sc = heads.inverse(token_features(Observation.from_engine(eng, tr, run.prompt_tokens)))
            for lab in ex.labels:
                scores.append(float(sc[lab["token"]]))
                ys.append((lab["label"], lab["sampled"]))
            if ex.confidence is not None:
                meta.append((heads.meta(np.array(ex.meta, np.float32)), ex.confidence, ex.correct))
    finally:
        eng.close()
    return scores, ys, meta, differ


def train(s: TrainSettings, on_event: Callable[[str, dict], None] | None = None) -> TrainResult:
    """Collect labels, select heads, train both heads, evaluate on held-out problems."""
    from sage.reference.exact import load_model

    from sage.engine import default_threads

    emit = on_event or (lambda kind, info: None)
    torch.set_num_threads(s.n_threads or default_threads())
    t_start = time.time()
    train_items, test_items = training_problems(s.n, s.seed, s.holdout)
    if s.labels is None:
        raise SageError("no labels file given")
    labels_path = s.labels
    emit("collect", {"n": s.n, "path": str(labels_path)})
    examples = collect(s.model_path, train_items + test_items, labels_path, max_tokens=s.max_tokens,
                       n_sample=s.n_sample, seed=s.seed, n_threads=s.n_threads, workers=s.workers, ray=s.ray,
                       on_problem=lambda ex: emit("problem", {"correct": ex.correct, "labels": len(ex.labels)}))
    t_collect = time.time()
    tr_ex = [e for e in examples[: len(train_items)] if e.trace["tokens"]]
    te_ex = [e for e in examples[len(train_items) :] if e.trace["tokens"]]
    n_lab = sum(len(e.labels) for e in tr_ex)
    n_pos = sum(lab["label"] for e in tr_ex for lab in e.labels)
    if n_pos == 0 or n_pos == n_lab:
        raise SageError(f"the {n_lab} training labels are all of one class; collect more problems (--n)")

    # 2. tracking heads, on the torch reference model of the same GGUF
    emit("heads", {})
    eng = Engine(s.model_path, n_ctx=256)
    try:
        full = eng.full_attention_layers()
        fp, n_head, base_arch = fingerprint(eng), eng.n_head, eng.architecture
    finally:
        eng.close()
    model = load_model(s.model_path)
    rows = [head_rows(model, e, full) for e in tr_ex]
    hs = head_scores(rows, tr_ex)
    layers, weights = select_heads(hs, full, s.n_heads, s.max_layers)
    li = [full.index(x) for x in layers]

    # 3. inverse layer on the features under the chosen heads
    emit("inverse", {})
    feats = []
    for r, e in zip(rows, tr_ex):
        attn, vattn = r.rows(li, weights)
        # the labels file keeps which prompt tokens are the problem's, not their texts (the
        # features do not read them)
        prompt = PromptMap([""] * len(e.in_problem), np.array(e.in_problem, bool))
        feats.append(token_features(Observation(e.get_trace(), len(e.prompt_tokens), prompt, attn, vattn)))
    del rows
    n_val = max(1, len(tr_ex) // 5)
    inverse, fit = train_inverse(feats, [e.labels for e in tr_ex], n_val, depth=s.depth, width=s.width,
                                 epochs=s.epochs, seed=s.seed)

    # 4. meta head
    with_conf = [e for e in tr_ex if e.confidence is not None]
    if not with_conf:
        raise SageError("no training chain reached an answer; raise --max-tokens or collect more problems (--n)")
    meta = train_meta(np.array([e.meta for e in with_conf]), np.array([float(e.correct) for e in with_conf]))

    heads = SageHeads(fp, s.base_name, layers, weights, fit["threshold"], inverse, meta, trained=True)

    # 5. held-out evaluation through llama.cpp, as sage ask runs
    emit("evaluate", {"n": len(te_ex)})
    sc, ys, mt, differ = held_out_scores(heads, s, te_ex)
    y_all = np.array([y for y, _ in ys], bool)
    samp = np.array([sm for _, sm in ys], bool)
    an_sig = [e.features[lab["token"]][FEATURES.index("significance")] for e in te_ex for lab in e.labels]
    an_rank = [e.features[lab["token"]][FEATURES.index("significance")] * (1 - e.features[lab["token"]][FEATURES.index("prob")])
               for e in te_ex for lab in e.labels]
    if differ:
        raise SageError(f"{differ} held-out chains regenerated differently from their labels; the labels "
                        "are for another build of the model or of llama.cpp: remove the labels file")
    sc = np.array(sc)
    metrics = {
        "train_problems": len(tr_ex), "test_problems": len(te_ex),
        "train_labels": fit["train_labels"], "train_positive": fit["train_positive"],
        "test_labels": int(len(y_all)), "test_positive": int(y_all.sum()),
        "test_sampled_labels": int(samp.sum()),
        "auroc_analytic": auroc(an_sig, y_all), "auroc_analytic_rank": auroc(an_rank, y_all),
        "auroc_trained": auroc(sc, y_all),
        "auroc_analytic_sampled": auroc(np.array(an_sig)[samp], y_all[samp]),
        "auroc_analytic_rank_sampled": auroc(np.array(an_rank)[samp], y_all[samp]),
        "auroc_trained_sampled": auroc(sc[samp], y_all[samp]),
        "val_auroc_start": fit["val_auroc_start"], "val_auroc": fit["val_auroc"], "epoch": fit["epoch"],
        "threshold": fit["threshold"],
        "ece_analytic": ece([c for _, c, _ in mt], [y for _, _, y in mt]),
        "ece_trained": ece([p for p, _, _ in mt], [y for _, _, y in mt]),
        "test_answers": len(mt), "test_correct": int(sum(y for _, _, y in mt)),
        "train_accuracy": float(np.mean([e.correct for e in tr_ex])),
        "tracked_heads": int((weights > 0).sum()), "tracked_layers": layers,
        "best_head_auroc": float(np.nanmax(hs)),
        "collect_s": t_collect - t_start, "train_s": time.time() - t_collect,
    }
    # undefined numbers (a class missing from a small held-out set) are null, never NaN, in JSON
    metrics = {k: (None if isinstance(v, float) and v != v else v) for k, v in metrics.items()}
    heads.info = {
        "data": f"{s.n} problems (GSM8K train + arithmetic), seed {s.seed}",
        "seed": str(s.seed),
        "base_architecture": base_arch,
        "metrics": json.dumps(metrics),
    }
    emit("done", metrics)
    return TrainResult(heads, metrics)

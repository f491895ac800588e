"""Numpy reference implementations of sage's numeric kernels.

Every faster path (native tracker, Metal shaders, vectorized variants) is tested
against these. They favour clarity over speed, but the per-token ones are also what the
engine runs by default, so they avoid needless copies.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class TokenStats(NamedTuple):
    """Uncertainty of one next-token distribution (natural log units)."""

    logprobs_top: np.ndarray  # (k,) log-probabilities of the top-k tokens, descending
    ids_top: np.ndarray  # (k,) their token ids
    entropy: float  # H = -sum p log p
    varentropy: float  # Var[-log p] = sum p (log p)^2 - H^2
    log_z: float  # log-sum-exp of the logits (so logprob(t) = logits[t] - log_z)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p for a (n_vocab,) or (..., n_vocab) array of logits."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def entropy(logits: np.ndarray) -> np.ndarray:
    """Predictive entropy H = -sum p log p (nats) of each row of logits."""
    lp = log_softmax(logits)
    return -(np.exp(lp) * lp).sum(axis=-1)


def varentropy(logits: np.ndarray) -> np.ndarray:
    """Variance of the surprisal -log p under p (nats^2) of each row of logits."""
    lp = log_softmax(logits)
    p = np.exp(lp)
    h = -(p * lp).sum(axis=-1)
    return (p * lp * lp).sum(axis=-1) - h * h


def token_stats(logits: np.ndarray, k: int = 5) -> TokenStats:
    """Entropy, varentropy, log-normalizer and top-k of one (n_vocab,) logit vector.

    The engine calls this for every generated token, so it makes one exp pass over the
    vocabulary and finds the top-k by k argmax passes (np.argpartition costs ~10x more
    on a 49k vocabulary).
    """
    x = np.asarray(logits, dtype=np.float32)
    m = float(x.max())
    z = x - m  # (V,) float32, <= 0; a fresh array we may overwrite below
    e = np.exp(z)
    s = float(e.sum(dtype=np.float64))
    log_s = float(np.log(s))
    # with p = e/s and log p = z - log s:
    #   H = log s - sum(e z)/s ;  E[(log p)^2] = sum(e z^2)/s - 2 log s sum(e z)/s + (log s)^2
    ez = e * z
    a = float(ez.sum(dtype=np.float64)) / s
    b = float(np.dot(ez, z)) / s
    h = log_s - a
    ev2 = b - 2.0 * log_s * a + log_s * log_s
    var = max(ev2 - h * h, 0.0)
    k = min(k, x.shape[0])
    top = np.empty(k, dtype=np.int64)
    vals = np.empty(k, dtype=np.float64)
    for j in range(k):
        i = int(np.argmax(z))  # first index of the max, as llama.cpp's greedy sampler
        top[j] = i
        vals[j] = z[i]
        z[i] = -np.inf
    return TokenStats(
        logprobs_top=vals - log_s,
        ids_top=top,
        entropy=h,
        varentropy=var,
        log_z=m + log_s,
    )


# --- inverse analysis (paper eq. 7) ---------------------------------------------------


def aggregate_rows(rows: np.ndarray) -> np.ndarray:
    """Mean attention of a step's queries: (T, C) rows -> (C,). Empty -> zeros."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.shape[0] == 0:
        return np.zeros(rows.shape[1])
    return rows.mean(axis=0)


def eq7_significance(w: np.ndarray, g: np.ndarray, h: float) -> np.ndarray:
    """Significance(t_j, i) = w_ij * |grad_{h_j} L_i| * H_i for every earlier token j.

    w: (C,) attention from step i to each token; g: (C,) gradient-norm factor (exact or
    proxy); h: the step's predictive entropy."""
    return np.asarray(w, dtype=np.float64) * np.asarray(g, dtype=np.float64) * float(h)


def value_norm_proxy(w: np.ndarray, wv: np.ndarray) -> np.ndarray:
    """The gradient factor's proxy in the llama.cpp path: the attention-weighted value norm
    of token j (wv = sum a*|v| over tracked heads, w = sum a), i.e. how much of token j's
    value actually flowed into the step. 0 where the step paid token j no attention."""
    w = np.asarray(w, dtype=np.float64)
    wv = np.asarray(wv, dtype=np.float64)
    out = np.zeros_like(w)
    np.divide(wv, w, out=out, where=w > 0)
    return out


def normalize_max(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """x / max(x[mask]) on the masked entries, 0 elsewhere; all zeros if nothing is
    masked in or the maximum is 0. Per-step normalization to [0, 1]."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    if not mask.any():
        return out
    m = x[mask].max()
    if m > 0:
        out[mask] = x[mask] / m
    return out


# --- exact eq. 7 reductions (model/exact.py; Metal twins in kernels/metal) -------------


def grad_norm(g: np.ndarray) -> np.ndarray:
    """|grad_{h_j} L_i|: the L2 norm over the last (hidden) axis, (..., d) -> (...)."""
    g = np.asarray(g, dtype=np.float64)
    return np.sqrt(np.einsum("...d,...d->...", g, g))


def weighted_rows(probs: np.ndarray, weights: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """Attention aggregated over tracked layers and heads into tracker-layout rows:
    rows[k, t] = sum_{l,h} weights[l, h] * probs[l, h, k, t] (* values[l, h, t] when given,
    the value-norm weighted rows). probs: (L, H, K, T); weights: (L, H); values: (L, H, T)."""
    p = np.asarray(probs, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if values is None:
        return np.einsum("lh,lhkt->kt", w, p)
    return np.einsum("lh,lhkt,lht->kt", w, p, np.asarray(values, dtype=np.float64))


def eq7_normalized(w: np.ndarray, g: np.ndarray, h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Eq. 7 for several steps, each normalized over its candidates: row i is
    normalize_max(eq7_significance(w[i], g[i], h[i]), mask[i]). w, g: (S, T) attention and
    gradient factor; h: (S,) step entropies; mask: (S, T) bool candidates."""
    w, g = np.asarray(w, dtype=np.float64), np.asarray(g, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(w.shape)
    for i in range(w.shape[0]):
        out[i] = normalize_max(eq7_significance(w[i], g[i], h[i]), mask[i])
    return out

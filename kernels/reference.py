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

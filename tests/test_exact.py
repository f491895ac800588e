"""Exact eq. 7 (model/exact.py): gradient norms against finite differences and causality
on tiny random models of every architecture, Spearman on hand examples, and the proxy
comparison on the real SmolLM2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.exact import candidate_mask, compare_on_problem, exact_from_model, rankdata, spearman
from model.trace import ModelInfo, Settings, Step, TokenRecord, Trace
from test_arch import TINY, tiny_model

N_PROMPT = 6
GEN = [5, 17, 99, 3, 42, 8, 64, 21, 7]  # generated token ids
STEPS = [(0, 3), (3, 4), (5, 9)]  # token spans; token 4 lies between steps 1 and 2


def tiny_trace() -> Trace:
    tokens = [TokenRecord(id=t, text=f"t{t}", logprob=-1.0, entropy=1.0, varentropy=0.0, top=[]) for t in GEN]
    return Trace(
        problem="p",
        prompt="p",
        prompt_tokens=N_PROMPT,
        model=ModelInfo("tiny", "", "llama", "", 0, 0, 256, False),
        settings=Settings(0.0, 0, len(GEN), 64, 1),
        tokens=tokens,
        steps=[Step(i, "", 0, 0, a, b, "sentence", 1.0) for i, (a, b) in enumerate(STEPS)],
    )


PROMPT = [1, 30, 31, 32, 33, 2]
# prompt positions 1..4 are "the problem"; every generated token is content
CONTENT = np.array([False, True, True, True, True, False] + [True] * len(GEN))


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny64(request):
    """A tiny random model in float64, so that finite differences are accurate."""
    return tiny_model(request.param).double().requires_grad_(False)


def step_nll(model, i: int, grad_layer: int, j: int, deltas: torch.Tensor) -> np.ndarray:
    """L_i for each row of `deltas` (B, C) added to the residual stream entering layer
    grad_layer at position j: one batched forward pass."""

    def bump(_mod, args):
        h = args[0].clone()  # (B, T, C)
        h[:, j] += deltas
        return (h, *args[1:])

    ids = torch.tensor([PROMPT + GEN]).expand(len(deltas), -1)
    hook = model.layers[grad_layer].register_forward_pre_hook(bump)
    try:
        with torch.no_grad():
            logp = model(ids).log_softmax(-1)  # (B, T, V)
    finally:
        hook.remove()
    a, b = STEPS[i]
    return -sum(logp[:, N_PROMPT + k - 1, GEN[k]] for k in range(a, b)).numpy()


@pytest.mark.parametrize("grad_layer", [0, 1])
def test_gradient_norms_match_finite_differences(tiny64, grad_layer):
    model = tiny64
    res = exact_from_model(model, tiny_trace(), PROMPT, CONTENT, layers=[1, 2], grad_layer=grad_layer)
    assert res.grad_layer == grad_layer
    C, eps = model.args.hidden_size, 1e-5
    i = 2
    steps = torch.cat([torch.eye(C), -torch.eye(C)]).double() * eps  # (2C, C): +-eps along each axis
    for j in (2, N_PROMPT + 5):  # a prompt token, and a token of the step itself
        lp = step_nll(model, i, grad_layer, j, steps)
        fd = (lp[:C] - lp[C:]) / (2 * eps)  # (C,) central differences
        assert res.grad_norm[i, j] == pytest.approx(np.linalg.norm(fd), rel=1e-6)
    assert res.nll[i] == pytest.approx(step_nll(model, i, grad_layer, 0, torch.zeros(1, C).double())[0])


def test_gradients_respect_causality_and_significance_stays_on_candidates(tiny64):
    res = exact_from_model(tiny64, tiny_trace(), PROMPT, CONTENT, layers=[1, 2])
    n_pos = N_PROMPT + len(GEN)
    assert res.significance.shape == res.grad_norm.shape == res.proxy.shape == (len(STEPS), n_pos)
    assert res.attn.shape == res.vattn.shape == (len(GEN), n_pos)
    for i, (a, b) in enumerate(STEPS):
        last_query = N_PROMPT + b - 2  # the query that produced the step's last token
        # L_i is decided by positions up to its last query: nothing later gets a gradient
        assert (res.grad_norm[i, last_query + 1 :] == 0).all()
        assert (res.grad_norm[i, : last_query + 1] > 0).all()
        m = res.candidates[i]
        assert (m == candidate_mask(CONTENT, N_PROMPT, a)).all()
        assert not m[N_PROMPT + a - 1 :].any()
        sig = res.significance[i]
        assert (sig[~m] == 0).all() and sig[m].max() == pytest.approx(1.0) and (sig >= 0).all()
    # tracker layout: row k is a distribution over the positions up to the query of token k
    for k in range(len(GEN)):
        q = N_PROMPT + k - 1
        assert res.attn[k, : q + 1].sum() == pytest.approx(1.0) and (res.attn[k, q + 1 :] == 0).all()


def test_steps_batched_backward_equals_one_at_a_time(tiny64, monkeypatch):
    import model.exact as exact

    batched = exact_from_model(tiny64, tiny_trace(), PROMPT, CONTENT, layers=[1, 2])
    monkeypatch.setattr(exact, "BACKWARD_CHUNK", 1)
    single = exact_from_model(tiny64, tiny_trace(), PROMPT, CONTENT, layers=[1, 2])
    np.testing.assert_allclose(batched.grad_norm, single.grad_norm, rtol=1e-12)


def test_rankdata_and_spearman_by_hand():
    assert rankdata([3, 1, 4, 1, 5]).tolist() == [3, 1.5, 4, 1.5, 5]
    assert rankdata([2, 2, 2]).tolist() == [2, 2, 2]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # monotone transforms do not change ranks
    assert spearman([0.1, 5, 2, 9], np.exp([0.1, 5, 2, 9])) == pytest.approx(1.0)
    # ties: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4) -> 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    # scipy.stats.spearmanr([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) = 0.8207826816681233
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1], [2]))


@pytest.mark.slow
def test_proxy_against_exact_on_smollm2(smollm2_path):
    cmp = compare_on_problem("Tom has 3 boxes of 12 eggs and uses 7. How many eggs are left?", smollm2_path, 60)
    n_steps = len(cmp.trace.steps)
    assert n_steps >= 1
    for rho in (cmp.spearman, cmp.factor_spearman, cmp.attention_spearman, cmp.torch_proxy_spearman):
        assert rho.shape == (n_steps,)
        assert np.isfinite(rho).all() and (np.abs(rho) <= 1 + 1e-12).all()
    assert -1 <= cmp.mean <= 1
    # the torch model's attention and values reproduce what llama.cpp's tracker saw
    assert np.nanmin(cmp.parity_spearman) > 0.95
    assert cmp.exact.layers == cmp.trace.analysis.tracked_layers
    assert cmp.exact.timings["exact_s"] > 0

"""Exact eq. 7 (model/exact.py): gradient norms against finite differences and causality
on tiny random models of every architecture, Spearman on hand examples, and the proxy
comparison on the real SmolLM2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sage.reference.exact import (
    candidate_mask,
    exact_from_model,
    proxy_agreement,
    rankdata,
    spearman,
)
from sage.reference.compare import compare_on_problem
from sage.trace import ModelInfo, Settings, Step, TokenRecord, Trace
from test_arch import TINY, tiny_model

PROMPT = [1, 30, 31, 32, 33, 2]
N_PROMPT = len(PROMPT)
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


# prompt positions 1..4 are "the problem"; every generated token is content
CONTENT = np.array([False, True, True, True, True, False] + [True] * len(GEN))


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny64(request):
    """A tiny random model in float64, so that finite differences are accurate."""
    return tiny_model(request.param).double().requires_grad_(False)


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models on one torch thread: on a shared CPU, waking and spinning a thread pool
    for every small op costs more than it saves."""
    if "tiny64" not in request.fixturenames:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def step_nll(model, i: int, grad_layer: int, j: int, deltas: torch.Tensor) -> np.ndarray:
    """L_i for each row of `deltas` (B, C) added to the residual stream entering layer
    grad_layer (the final norm for the last) at position j: one batched forward pass."""

    def bump(_mod, args):
        h = args[0].clone()  # (B, T, C)
        h[:, j] += deltas
        return (h, *args[1:])

    ids = torch.tensor([PROMPT + GEN]).expand(len(deltas), -1)
    entering = model.layers[grad_layer] if grad_layer < len(model.layers) else model.model.norm
    hook = entering.register_forward_pre_hook(bump)
    try:
        with torch.no_grad():
            logp = model(ids).log_softmax(-1)  # (B, T, V)
    finally:
        hook.remove()
    a, b = STEPS[i]
    return -sum(logp[:, N_PROMPT + k - 1, GEN[k]] for k in range(a, b)).numpy()


@pytest.mark.parametrize("grad_layer", [0, 1, 3])  # embeddings, a middle layer, after the last
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
        assert res.grad_norm[i, j] == pytest.approx(np.linalg.norm(fd), rel=1e-6, abs=1e-6)
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
    import sage.reference.exact as exact

    batched = exact_from_model(tiny64, tiny_trace(), PROMPT, CONTENT, layers=[1, 2])
    monkeypatch.setattr(exact, "BACKWARD_CHUNK", 1)
    single = exact_from_model(tiny64, tiny_trace(), PROMPT, CONTENT, layers=[1, 2])
    np.testing.assert_allclose(batched.grad_norm, single.grad_norm, rtol=1e-12)


def test_attention_rows_follow_the_head_weights(tiny64):
    model = tiny64
    n_head = model.args.num_attention_heads
    uniform = exact_from_model(model, tiny_trace(), PROMPT, CONTENT, layers=[2, 1])
    w = np.zeros((2, n_head))
    w[1, 3] = 1.0  # all weight on head 3 of layer 1
    one = exact_from_model(model, tiny_trace(), PROMPT, CONTENT, layers=[2, 1], head_weights=w)
    with torch.no_grad():
        _, att = model(torch.tensor([PROMPT + GEN]), output_attentions=[1, 2])
    q = np.arange(N_PROMPT - 1, N_PROMPT + len(GEN) - 1)  # queries that produced the generated tokens
    np.testing.assert_allclose(one.attn, att[1][0, 3][q].numpy(), rtol=1e-10, atol=1e-12)
    mean = (att[1][0] + att[2][0]).mean(0)[q].numpy() / 2
    np.testing.assert_allclose(uniform.attn, mean, rtol=1e-10, atol=1e-12)
    assert uniform.grad_layer == one.grad_layer == 1  # the first tracked layer, whatever the order


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
    # one llama.cpp thread: on a CPU shared with other jobs, two spinning threads decode far slower
    problem = "Tom has 3 boxes of 12 eggs and uses 7. How many eggs are left?"
    cmp = compare_on_problem(problem, smollm2_path, 60, n_threads=1)
    n_steps = len(cmp.trace.steps)
    assert n_steps >= 1
    for rho in (cmp.spearman, cmp.factor_spearman, cmp.attention_spearman, cmp.torch_proxy_spearman):
        assert rho.shape == (n_steps,)
        assert np.isfinite(rho).all() and (np.abs(rho) <= 1 + 1e-12).all()
    assert -1 <= cmp.mean <= 1
    assert proxy_agreement(cmp.trace, cmp.exact, cmp.proxy) == pytest.approx(cmp.mean)
    assert -1 <= proxy_agreement(cmp.trace, cmp.exact) <= 1  # the proxy formula on torch tensors
    # the torch model's attention and values reproduce what llama.cpp's tracker saw
    assert np.nanmin(cmp.parity_spearman) > 0.95
    assert cmp.exact.layers == cmp.trace.analysis.tracked_layers
    assert cmp.exact.timings["exact_s"] > 0

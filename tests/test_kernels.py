"""The per-token kernel against the plain numpy reference definitions."""

import numpy as np
import pytest

from sage.kernels.reference import entropy, log_softmax, token_stats, varentropy


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_token_stats_matches_reference(scale):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(49152) * scale).astype(np.float32)
    keep = x.copy()
    st = token_stats(x, k=5)
    assert np.array_equal(x, keep), "input logits are not modified"
    lp = log_softmax(x)
    assert st.entropy == pytest.approx(float(entropy(x)), rel=1e-5, abs=1e-6)
    assert st.varentropy == pytest.approx(float(varentropy(x)), rel=1e-4, abs=1e-6)
    assert list(st.ids_top) == list(np.argsort(-lp, kind="stable")[:5])
    assert np.allclose(st.logprobs_top, lp[st.ids_top], atol=1e-5)
    assert st.log_z == pytest.approx(float(np.log(np.exp(x.astype(np.float64)).sum())), rel=1e-6)


def test_ties_pick_lowest_index_first():
    x = np.zeros(10, dtype=np.float32)
    x[[7, 2, 5]] = 1.0
    st = token_stats(x, k=4)
    assert list(st.ids_top) == [2, 5, 7, 0]


def test_uniform_and_one_hot():
    u = np.zeros(1000, dtype=np.float32)
    st = token_stats(u)
    assert st.entropy == pytest.approx(np.log(1000), rel=1e-6)
    assert st.varentropy == pytest.approx(0.0, abs=1e-6)
    oh = np.full(1000, -1e4, dtype=np.float32)
    oh[3] = 0
    st = token_stats(oh)
    assert st.entropy == pytest.approx(0.0, abs=1e-6) and st.ids_top[0] == 3

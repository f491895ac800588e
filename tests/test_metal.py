"""The exact path's Metal kernels (kernels/metal) against their numpy twins
(kernels/reference.py).

Three layers: the dispatch functions on CPU (they take the twins) and the twins against
plain definitions; the Python side's calls against the .metal source, statically and
through a software stand-in for the compiled library that follows the kernels' index
arithmetic (so argument order, layouts and thread counts are checked without an Apple
GPU); and the real kernels on an Apple GPU, skipped with the reason where there is none.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sage.kernels import metal, reference
from sage.kernels.reference import eq7_significance, normalize_max

ROOT = Path(__file__).resolve().parents[1]
METAL_OK, METAL_WHY = metal.available()
needs_metal = pytest.mark.skipif(not METAL_OK, reason=f"Metal kernels not testable here: {METAL_WHY}")


def eq7_inputs(rng, S=5, T=37):
    """Random eq. 7 inputs with the edge cases in fixed rows: row 1 has no candidates,
    row 2 all-zero attention, row 3 zero entropy."""
    w = rng.random((S, T))
    g = rng.random((S, T)) * 3
    h = rng.random(S) + 0.1
    mask = rng.random((S, T)) < 0.6
    mask[1] = False
    w[2] = 0.0
    h[3] = 0.0
    return w, g, h, mask


def attention_inputs(rng, L=3, H=4, K=6, T=11):
    probs = rng.random((L, H, K, T))
    probs /= probs.sum(-1, keepdims=True)
    return probs, rng.random((L, H)), rng.random((L, H, T)) * 2


# --- the twins and the CPU dispatch ------------------------------------------------------


def test_twins_match_plain_definitions():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 7, 16))
    np.testing.assert_allclose(reference.grad_norm(g), np.linalg.norm(g, axis=-1), rtol=1e-14)
    probs, w, v = attention_inputs(rng)
    L, H, K, T = probs.shape
    rows = sum(w[l, h] * probs[l, h] for l in range(L) for h in range(H))
    vrows = sum(w[l, h] * probs[l, h] * v[l, h][None, :] for l in range(L) for h in range(H))
    np.testing.assert_allclose(reference.weighted_rows(probs, w), rows, rtol=1e-13)
    np.testing.assert_allclose(reference.weighted_rows(probs, w, v), vrows, rtol=1e-13)
    wq, gq, hq, mq = eq7_inputs(rng)
    out = reference.eq7_normalized(wq, gq, hq, mq)
    for i in range(len(hq)):
        assert np.array_equal(out[i], normalize_max(eq7_significance(wq[i], gq[i], hq[i]), mq[i]))
    assert (out[1] == 0).all() and (out[2] == 0).all() and (out[3] == 0).all()
    for i in (0, 4):
        assert out[i][mq[i]].max() == 1.0 and (out[i][~mq[i]] == 0).all()


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "cpu-tensor"])
def test_dispatch_on_cpu_takes_the_twins(as_tensor):
    rng = np.random.default_rng(1)
    cast = (lambda a: torch.from_numpy(np.asarray(a))) if as_tensor else (lambda a: a)
    g = rng.standard_normal((4, 9, 32)).astype(np.float32)
    probs, w, v = attention_inputs(rng)
    wq, gq, hq, mq = eq7_inputs(rng)
    cases = [
        (metal.grad_norm(cast(g)), reference.grad_norm(g)),
        (metal.weighted_rows(cast(probs), w), reference.weighted_rows(probs, w)),
        (metal.weighted_rows(cast(probs), w, cast(v)), reference.weighted_rows(probs, w, v)),
        (metal.eq7_normalized(cast(wq), cast(gq), cast(hq), cast(mq)), reference.eq7_normalized(wq, gq, hq, mq)),
    ]
    for got, want in cases:
        assert isinstance(got, np.ndarray) and got.dtype == np.float64
        assert np.array_equal(got, want)


def test_dispatch_edge_shapes_and_checks():
    assert metal.grad_norm(np.zeros((0, 5, 8))).shape == (0, 5)
    assert (metal.grad_norm(np.zeros((2, 3, 0))) == 0).all()
    assert metal.weighted_rows(np.zeros((2, 3, 0, 4)), np.ones((2, 3))).shape == (0, 4)
    assert (metal.weighted_rows(np.zeros((0, 3, 2, 4)), np.ones((0, 3))) == 0).all()
    assert metal.eq7_normalized(np.zeros((0, 4)), np.zeros((0, 4)), np.zeros(0), np.zeros((0, 4), bool)).shape == (0, 4)
    with pytest.raises(ValueError):
        metal.weighted_rows(np.zeros((2, 3, 2, 4)), np.ones((3, 2)))
    with pytest.raises(ValueError):
        metal.weighted_rows(np.zeros((2, 3, 2, 4)), np.ones((2, 3)), np.ones((2, 3, 5)))
    with pytest.raises(ValueError):
        metal.eq7_normalized(np.zeros((2, 4)), np.zeros((2, 4)), np.zeros(3), np.zeros((2, 4), bool))


def test_place_and_host_leave_cpu_data_alone():
    x = np.arange(3.0)
    assert metal.place(x, "cpu") is x and metal.place(x, torch.device("cpu")) is x
    assert metal.host(torch.arange(3, dtype=torch.float32)).dtype == np.float64
    assert not metal.on_mps(x) and not metal.on_mps(torch.zeros(1))


def test_mps_inputs_without_compile_shader_take_the_twin(monkeypatch):
    class OnMps:  # stands for an mps tensor: dispatch reads .device, the host copy .detach()
        device = SimpleNamespace(type="mps")

        def __init__(self, t):
            self.t, self.shape = t, t.shape

        def detach(self):
            return self.t

    monkeypatch.setattr(metal, "available", lambda: (False, "no compile_shader"))
    g = np.random.default_rng(2).standard_normal((2, 3, 4))
    assert metal.on_mps(OnMps(torch.from_numpy(g)))
    assert np.array_equal(metal.grad_norm(OnMps(torch.from_numpy(g))), reference.grad_norm(g))


# --- the Python side against the .metal source -------------------------------------------


def kernel_signatures(src: str) -> dict[str, list[str]]:
    """kernel name -> its bound arguments' kinds in buffer order: 'float*', 'uchar*', 'long'."""
    sigs = {}
    for name, params in re.findall(r"kernel\s+void\s+(\w+)\s*\((.*?)\)\s*\{", src, re.S):
        kinds = []
        for p in (p.strip() for p in params.split(",")):
            if "thread_position_in_grid" in p:
                continue
            idx = int(re.search(r"\[\[buffer\((\d+)\)\]\]", p).group(1))
            assert idx == len(kinds), f"{name}: buffer indices must follow the argument order"
            if p.startswith("constant long&"):
                kinds.append("long")
            else:
                m = re.match(r"device\s+(?:const\s+)?(float|uchar)\s*\*", p)
                assert m, f"{name}: unexpected parameter {p!r}"
                kinds.append(m.group(1) + "*")
        sigs[name] = kinds
    return sigs


def test_metal_source_ships_as_package_data_and_defines_every_kernel():
    res = resources.files("sage.kernels.metal").joinpath(metal.SOURCE)
    assert res.is_file()
    src = metal.source()
    sigs = kernel_signatures(src)
    assert set(sigs) == set(metal.KERNELS)
    # the kernels the Python side calls (lib.NAME(...) or library().NAME(...)) are exactly these
    py = (ROOT / "kernels" / "metal" / "__init__.py").read_text()
    assert set(re.findall(r"\b(?:lib|library\(\))\.(\w+)\(", py)) == set(metal.KERNELS)
    # and setuptools ships it: pyproject's package-data for `sage.kernels.metal` covers the file
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch(metal.SOURCE, pat) for pat in data["sage.kernels.metal"])


class SoftwareLibrary:
    """Stands in for the compiled library on CPU tensors: checks each call against the
    kernel's signature in the .metal source and runs the kernel's own index arithmetic
    (every thread of the grid, written as numpy over the flat buffers)."""

    def __init__(self):
        self.sigs = kernel_signatures(metal.source())
        self.calls = []

    def __getattr__(self, name):
        kinds = self.sigs[name]

        def call(*args, threads):
            assert len(args) == len(kinds), f"{name}: {len(args)} arguments, the kernel binds {len(kinds)}"
            for a, k in zip(args, kinds):
                if k == "long":
                    assert type(a) is int, f"{name}: {a!r} should be a Python int"
                else:
                    assert isinstance(a, torch.Tensor) and a.is_contiguous(), name
                    assert a.dtype == {"float*": torch.float32, "uchar*": torch.uint8}[k], (name, a.dtype)
            self.calls.append(name)
            flat = [a.view(-1).numpy() if isinstance(a, torch.Tensor) else a for a in args]
            getattr(self, "_" + name)(threads, *flat)

        return call

    @staticmethod
    def _grad_norm(n, out, g, rows, d):
        r = np.arange(min(n, rows))
        out[r] = np.sqrt((g[r[:, None] * d + np.arange(d)] ** 2).sum(-1))

    @staticmethod
    def _weighted_rows(n, out, p, w, lh, kt):
        i = np.arange(min(n, kt))
        out[i] = sum(w[j] * p[j * kt + i] for j in range(lh))

    @staticmethod
    def _weighted_value_rows(n, out, p, w, v, lh, k, t):
        i = np.arange(min(n, k * t))
        out[i] = sum(w[j] * p[j * k * t + i] * v[j * t + i % t] for j in range(lh))

    @staticmethod
    def _eq7_row_max(n, row_max, w, g, h, mask, s, t):
        for r in range(min(n, s)):
            j = np.arange(r * t, (r + 1) * t)
            x = w[j] * g[j] * h[r]
            row_max[r] = x[mask[j] != 0].max(initial=0.0)

    @staticmethod
    def _eq7_normalize(n, out, w, g, h, mask, row_max, s, t):
        i = np.arange(min(n, s * t))
        r = i // t
        m = row_max[r]
        ok = (mask[i] != 0) & (m > 0)
        out[i] = np.where(ok, w[i] * g[i] * h[r] / np.where(ok, m, 1), 0)


def test_python_side_drives_the_kernels_as_the_source_defines_them(monkeypatch):
    lib = SoftwareLibrary()
    monkeypatch.setattr(metal, "_metal", lambda x: True)
    monkeypatch.setattr(metal, "library", lambda: lib)
    rng = np.random.default_rng(3)
    g = rng.standard_normal((3, 8, 24))
    probs, w, v = attention_inputs(rng)
    wq, gq, hq, mq = eq7_inputs(rng)
    t = torch.from_numpy
    cases = [
        (metal.grad_norm(t(g)[:, ::2]), reference.grad_norm(g[:, ::2])),  # a strided view
        (metal.weighted_rows(t(probs), w), reference.weighted_rows(probs, w)),
        (metal.weighted_rows(t(probs), w, t(v)), reference.weighted_rows(probs, w, v)),
        (metal.eq7_normalized(t(wq), t(gq), t(hq), t(mq)), reference.eq7_normalized(wq, gq, hq, mq)),
    ]
    for got, want in cases:
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == want.shape
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert sorted(set(lib.calls)) == sorted(metal.KERNELS)
    # empty outputs dispatch nothing
    lib.calls.clear()
    assert metal.grad_norm(torch.zeros(0, 4, 8)).shape == (0, 4)
    empty = torch.zeros(0, 4)
    assert metal.eq7_normalized(empty, empty, torch.zeros(0), empty.bool()).shape == (0, 4)
    assert lib.calls == []


# --- the kernels on an Apple GPU ---------------------------------------------------------


@needs_metal
def test_library_compiles_with_every_kernel():
    lib = metal.library()
    assert set(metal.KERNELS) <= set(dir(lib))


@needs_metal
def test_kernels_match_twins_on_mps():
    rng = np.random.default_rng(4)
    mps = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32)).to("mps")  # noqa: E731
    g = rng.standard_normal((4, 33, 96))
    probs, w, v = attention_inputs(rng, L=2, H=9, K=40, T=57)
    wq, gq, hq, mq = eq7_inputs(rng, S=6, T=129)
    cases = [
        (metal.grad_norm(mps(g)), reference.grad_norm(g)),
        (metal.weighted_rows(mps(probs), w), reference.weighted_rows(probs, w)),
        (metal.weighted_rows(mps(probs), w, mps(v)), reference.weighted_rows(probs, w, v)),
        (
            metal.eq7_normalized(mps(wq), mps(gq), mps(hq), torch.from_numpy(mq).to("mps")),
            reference.eq7_normalized(wq, gq, hq, mq),
        ),
    ]
    for got, want in cases:
        assert got.device.type == "mps" and got.shape == want.shape
        np.testing.assert_allclose(metal.host(got), want, rtol=2e-5, atol=1e-6)
    sig = metal.host(cases[-1][0])
    assert (sig[1] == 0).all() and (sig[2] == 0).all() and (sig[3] == 0).all()


@needs_metal
def test_exact_path_on_mps_matches_cpu():
    from test_arch import tiny_model
    from test_exact import CONTENT, PROMPT, tiny_trace

    from sage.reference.exact import exact_from_model

    cpu_model = tiny_model("llama").float().requires_grad_(False)
    cpu = exact_from_model(cpu_model, tiny_trace(), PROMPT, CONTENT, layers=[1, 2])
    gpu = exact_from_model(cpu_model.to("mps"), tiny_trace(), PROMPT, CONTENT, layers=[1, 2])
    for name in ("grad_norm", "attn", "vattn", "significance", "entropy", "nll"):
        np.testing.assert_allclose(getattr(gpu, name), getattr(cpu, name), rtol=1e-4, atol=1e-5, err_msg=name)

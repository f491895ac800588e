"""Metal fast paths of the exact eq. 7 path's reductions (model/exact.py) on Apple GPUs.

The kernels live in `reductions.metal` (package data) and are compiled once, on first
use, with `torch.mps.compile_shader`. Each function here runs its kernel when its input
is a tensor on the `mps` device and Metal is available, and otherwise the numpy twin of
the same name in kernels/reference.py, which is also what the tests check the kernels
against:

    function        Metal kernel(s)                    numpy twin
    grad_norm       grad_norm                          reference.grad_norm
    weighted_rows   weighted_rows, weighted_value_rows reference.weighted_rows
    eq7_normalized  eq7_row_max, eq7_normalize         reference.eq7_normalized

The Metal path computes in float32 and returns a float32 tensor on mps; the reference
path returns a float64 numpy array. `host` brings either back as float64 numpy.
torch is imported only when a Metal path is taken or asked about.
"""

from __future__ import annotations

import math
from functools import cache
from importlib import resources

import numpy as np

from sage.kernels import reference

SOURCE = "reductions.metal"
# every kernel the functions below call, in the order the source defines them
KERNELS = ("grad_norm", "weighted_rows", "weighted_value_rows", "eq7_row_max", "eq7_normalize")


def source() -> str:
    """The Metal Shading Language source of the kernels (package data)."""
    return resources.files(__name__).joinpath(SOURCE).read_text(encoding="utf-8")


def available() -> tuple[bool, str]:
    """Whether the Metal kernels can run here, and why (not)."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.backends.mps.is_available():
        return False, "no Apple GPU: torch.backends.mps.is_available() is False"
    if not hasattr(torch.mps, "compile_shader"):
        return False, f"torch {torch.__version__} has no torch.mps.compile_shader"
    return True, "MPS with torch.mps.compile_shader"


@cache
def library():
    """The compiled shader library (compiled once per process). Its kernels are attributes:
    lib.<kernel>(*tensors_and_ints, threads=n), arguments bound to [[buffer(i)]] in order."""
    ok, why = available()
    if not ok:
        raise RuntimeError(f"the Metal kernels cannot run: {why}")
    import torch

    return torch.mps.compile_shader(source())


def on_mps(x) -> bool:
    """Whether x is a torch tensor on the mps device (checked without importing torch)."""
    return getattr(getattr(x, "device", None), "type", None) == "mps"


def _metal(x) -> bool:
    return on_mps(x) and available()[0]


def _np(x, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def host(x) -> np.ndarray:
    """A result of these functions (numpy, or a tensor on any device) as float64 numpy."""
    return _np(x)


def place(x, device):
    """x as the kernels take it on `device`: a float32 tensor (bool stays bool) on mps when
    `device` is mps, x unchanged anywhere else (where the reference path takes it)."""
    if getattr(device, "type", device) != "mps":
        return x
    import torch

    boolean = x.dtype == torch.bool if hasattr(x, "detach") else np.asarray(x).dtype == bool
    return _buf(x, device, torch.bool if boolean else None)


def _buf(x, device, dtype=None):
    """x as a contiguous tensor on the mps `device`, float32 unless dtype says otherwise
    (converted where it lies first: mps has no float64)."""
    import torch

    t = x.detach() if hasattr(x, "detach") else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(dtype=dtype or torch.float32).to(device=device).contiguous()


def grad_norm(g):
    """|grad_{h_j} L_i|: the L2 norm over the last axis, (..., d) -> (...)."""
    if not _metal(g):
        return reference.grad_norm(_np(g))
    import torch

    rows, d = math.prod(g.shape[:-1]), g.shape[-1]
    x = _buf(g, g.device).reshape(rows, d)
    out = torch.zeros(rows, device=g.device, dtype=torch.float32)
    if rows and d:
        library().grad_norm(out, x, rows, d, threads=rows)
    return out.reshape(g.shape[:-1])


def weighted_rows(probs, weights, values=None):
    """Tracker-layout rows: sum over layers l and heads h of weights[l, h] * probs[l, h]
    (times values[l, h] along the positions when given). probs: (L, H, K, T) attention
    of the K queries over T positions; weights: (L, H); values: (L, H, T). -> (K, T)."""
    L, H, K, T = probs.shape
    if np.shape(weights) != (L, H) or (values is not None and tuple(values.shape) != (L, H, T)):
        raise ValueError(
            f"weights {np.shape(weights)} / values {None if values is None else tuple(values.shape)} "
            f"do not fit attention of shape {tuple(probs.shape)}"
        )
    if not _metal(probs):
        return reference.weighted_rows(_np(probs), _np(weights), None if values is None else _np(values))
    import torch

    dev = probs.device
    p = _buf(probs, dev)
    w = _buf(weights, dev).reshape(-1)
    out = torch.zeros(K * T, device=dev, dtype=torch.float32)
    if K * T and L * H:
        lib = library()
        if values is None:
            lib.weighted_rows(out, p, w, L * H, K * T, threads=K * T)
        else:
            lib.weighted_value_rows(out, p, w, _buf(values, dev), L * H, K, T, threads=K * T)
    return out.reshape(K, T)


def eq7_normalized(w, g, h, mask):
    """Paper eq. 7, w * g * H, for S steps, each row divided by its maximum over the
    step's candidates (0 off them, all 0 where that maximum is not positive). w, g: (S, T);
    h: (S,); mask: (S, T) bool. -> (S, T)."""
    S, T = w.shape
    if tuple(g.shape) != (S, T) or tuple(mask.shape) != (S, T) or tuple(np.shape(h)) != (S,):
        raise ValueError(
            f"eq. 7 inputs do not fit: w {(S, T)}, g {tuple(g.shape)}, h {np.shape(h)}, mask {tuple(mask.shape)}"
        )
    if not _metal(w):
        return reference.eq7_normalized(_np(w), _np(g), _np(h), _np(mask, bool))
    import torch

    dev = w.device
    out = torch.zeros(S * T, device=dev, dtype=torch.float32)
    if S * T:
        args = (_buf(w, dev), _buf(g, dev), _buf(h, dev), _buf(mask, dev, torch.uint8))
        row_max = torch.zeros(S, device=dev, dtype=torch.float32)
        lib = library()
        lib.eq7_row_max(row_max, *args, S, T, threads=S)
        lib.eq7_normalize(out, *args, row_max, S, T, threads=S * T)
    return out.reshape(S, T)

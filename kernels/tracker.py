"""Attention tracking through llama.cpp's scheduler eval callback.

`Tracker` owns the numpy buffers and the C struct `sage_tracker` (kernels/tracker.c).
Two interchangeable callbacks fill them:
  - native: `sage_tracker_eval` from the compiled `kernels/_tracker*.so` (default);
  - python: `PythonCallback`, the same algorithm in Python, the reference twin (and the
    fallback where the native library is missing). Tests check they give equal numbers.
Both read tensors only through ggml functions resolved from the libggml that
llama-cpp-python loaded, so nothing links against a particular libggml.
"""

from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path

import numpy as np

MAX_LAYERS = 512
_HERE = Path(__file__).resolve().parent

_tensor_get_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t)
_str_fn_t = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)
EVAL_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)


class SageTracker(ctypes.Structure):
    _fields_ = [
        ("tensor_get", ctypes.c_void_p),
        ("get_name", ctypes.c_void_p),
        ("op_desc", ctypes.c_void_p),
        ("n_head", ctypes.c_int32),
        ("n_head_kv", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("n_slots", ctypes.c_int32),
        ("layer_slot", ctypes.c_int32 * MAX_LAYERS),
        ("head_w", ctypes.c_void_p),
        ("vnorm", ctypes.c_void_p),
        ("attn", ctypes.c_void_p),
        ("vattn", ctypes.c_void_p),
        ("scratch", ctypes.c_void_p),
        ("n_scratch", ctypes.c_int64),
        ("n_cells", ctypes.c_int32),
        ("n_rows", ctypes.c_int32),
        ("capture_v", ctypes.c_int32),
        ("capture_attn", ctypes.c_int32),
        ("row", ctypes.c_int32),
        ("pos0", ctypes.c_int32),
        ("n_valid", ctypes.c_int32),
        ("n_attn_seen", ctypes.c_int32),
        ("n_v_seen", ctypes.c_int32),
        ("error", ctypes.c_int32),
    ]


class _TensorHead(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int32),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
    ]


def _ggml_lib() -> ctypes.CDLL:
    """The libggml-base that llama-cpp-python itself loaded (same process, same copy)."""
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    for pattern in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll", "libggml-base*.so*"):
        found = sorted(glob.glob(str(libdir / pattern)))
        if found:
            return ctypes.CDLL(found[0])
    # older wheels fold ggml into libllama
    return llama_cpp.llama_cpp._lib


class GGML:
    """The three ggml functions the tracker uses, as callables and as raw addresses."""

    def __init__(self) -> None:
        lib = _ggml_lib()
        self.tensor_get = lib.ggml_backend_tensor_get
        self.tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.tensor_get.restype = None
        self.get_name = lib.ggml_get_name
        self.get_name.argtypes = [ctypes.c_void_p]
        self.get_name.restype = ctypes.c_char_p
        self.op_desc = lib.ggml_op_desc
        self.op_desc.argtypes = [ctypes.c_void_p]
        self.op_desc.restype = ctypes.c_char_p

    def addresses(self) -> tuple[int, int, int]:
        return tuple(ctypes.cast(f, ctypes.c_void_p).value for f in (self.tensor_get, self.get_name, self.op_desc))


def native_library_path() -> Path | None:
    for pattern in ("_tracker*.so", "_tracker*.dylib", "_tracker*.pyd"):
        found = sorted(_HERE.glob(pattern))
        if found:
            return found[0]
    return None


_native: ctypes.CDLL | None = None


def load_native() -> ctypes.CDLL | None:
    """The compiled tracker, or None where it was not built (then Python is used)."""
    global _native
    if _native is None:
        path = native_library_path()
        if path is None or os.environ.get("SAGE_TRACKER") == "python":
            return None
        lib = ctypes.CDLL(str(path))
        lib.sage_tracker_callback.restype = ctypes.c_void_p
        lib.sage_tracker_sizeof.restype = ctypes.c_int32
        if lib.sage_tracker_sizeof() != ctypes.sizeof(SageTracker):
            raise RuntimeError("kernels/_tracker library does not match kernels/tracker.py; reinstall sage")
        _native = lib
    return _native


class PythonCallback:
    """The tracker algorithm in Python: the reference twin of sage_tracker_eval."""

    def __init__(self, tracker: "Tracker", ggml: GGML) -> None:
        self.t = tracker
        self.g = ggml

    @staticmethod
    def _layer(name: str, prefix: str) -> int:
        if not name.startswith(prefix):
            return -1
        rest = name[len(prefix) :]
        return int(rest) if rest.isdigit() else -1

    def __call__(self, tensor: int, ask: bool, user_data: int) -> bool:
        t, st = self.t, self.t.state
        if not st.capture_v and not st.capture_attn:
            return not ask
        name = self.g.get_name(tensor).decode()
        il = self._layer(name, "kq_soft_max-")
        if il >= 0:
            slot = t.slot_of(il)
            if slot < 0 or not st.capture_attn:
                return not ask
            if not ask:
                self._attn(tensor, slot)
            return True
        il = self._layer(name, "Vcur-")
        if il >= 0:
            slot = t.slot_of(il)
            if slot < 0 or self.g.op_desc(tensor) != b"RESHAPE":
                return not ask
            if not ask:
                self._vcur(tensor, slot)
            return True
        return not ask

    def _vcur(self, tensor: int, slot: int) -> None:
        t, st = self.t, self.t.state
        head = _TensorHead.from_address(tensor)
        per_tok = t.n_head_kv * t.head_dim
        nel = int(np.prod(list(head.ne)))
        n_tok = nel // per_tok
        buf = np.empty(nel, dtype=np.float32)
        self.g.tensor_get(tensor, buf.ctypes.data, 0, nel * 4)
        v = buf.reshape(n_tok, t.n_head_kv, t.head_dim).astype(np.float64)
        norms = np.sqrt((v * v).sum(-1)).astype(np.float32)  # (n_tok, n_head_kv)
        pos = st.pos0 + np.arange(n_tok)
        ok = pos < t.n_cells
        t.vnorm[slot][:, pos[ok]] = norms[ok].T
        st.n_v_seen += 1

    def _attn(self, tensor: int, slot: int) -> None:
        t, st = self.t, self.t.state
        head = _TensorHead.from_address(tensor)
        n = st.n_valid
        n_tok = head.ne[1]
        group = t.n_head // t.n_head_kv
        a_row, v_row = t.attn[st.row], t.vattn[st.row]
        buf = np.empty(n, dtype=np.float32)
        for h in range(t.n_head):
            w = t.head_w[slot, h]
            if w == 0.0:
                continue
            off = (n_tok - 1) * head.nb[1] + h * head.nb[2]
            self.g.tensor_get(tensor, buf.ctypes.data, off, n * 4)
            # float32 arithmetic in the same order as the C loop
            a = w * buf
            a_row[:n] += a
            v_row[:n] += a * t.vnorm[slot, h // group, :n]
        st.n_attn_seen += 1


class Tracker:
    """Buffers and configuration for tracking one generation.

    layers: the model layers to observe; head_w: (len(layers), n_head) weights of each
    (layer, head) in the aggregate (1/count for a plain mean). Rows: row k holds the
    attention of the query that produced generated token k, over KV cells (= positions
    of the single tracked sequence).
    """

    def __init__(
        self,
        layers: list[int],
        head_w: np.ndarray,
        n_head: int,
        n_head_kv: int,
        head_dim: int,
        n_batch: int,
        native: bool = True,
    ) -> None:
        self.layers = list(layers)
        self.head_w = np.ascontiguousarray(head_w, dtype=np.float32).reshape(len(layers), n_head)
        self.n_head, self.n_head_kv, self.head_dim = n_head, n_head_kv, head_dim
        self.n_batch = n_batch
        self._slots = {il: i for i, il in enumerate(self.layers)}
        self.ggml = GGML()
        st = SageTracker()
        st.tensor_get, st.get_name, st.op_desc = self.ggml.addresses()
        st.n_head, st.n_head_kv, st.head_dim = n_head, n_head_kv, head_dim
        st.n_slots = len(layers)
        for i in range(MAX_LAYERS):
            st.layer_slot[i] = self._slots.get(i, -1)
        st.head_w = self.head_w.ctypes.data
        self.state = st
        self.allocate(1, 1)
        lib = load_native() if native else None
        self.native = lib is not None
        if lib is not None:
            self.callback_ptr = lib.sage_tracker_callback()
            self._py_cb = None
        else:
            self._py_cb = EVAL_CALLBACK(PythonCallback(self, self.ggml))
            self.callback_ptr = ctypes.cast(self._py_cb, ctypes.c_void_p).value
        self.user_data = ctypes.addressof(st)
        self.n_rows_used = 0

    def allocate(self, n_cells: int, n_rows: int) -> None:
        """(Re)allocate zeroed buffers for n_cells KV cells and n_rows generated tokens."""
        self.n_cells, self.n_rows = n_cells, n_rows
        self.vnorm = np.zeros((len(self.layers), self.n_head_kv, n_cells), dtype=np.float32)
        self.attn = np.zeros((n_rows, n_cells), dtype=np.float32)
        self.vattn = np.zeros((n_rows, n_cells), dtype=np.float32)
        self.scratch = np.zeros(max(self.n_batch * self.n_head_kv * self.head_dim, n_cells), dtype=np.float32)
        st = self.state
        st.vnorm = self.vnorm.ctypes.data
        st.attn = self.attn.ctypes.data
        st.vattn = self.vattn.ctypes.data
        st.scratch = self.scratch.ctypes.data
        st.n_scratch = self.scratch.size
        st.n_cells, st.n_rows = n_cells, n_rows
        st.capture_v = st.capture_attn = 0
        st.n_attn_seen = st.n_v_seen = st.error = 0
        self.n_rows_used = 0

    def slot_of(self, layer: int) -> int:
        return self._slots.get(layer, -1)

    def before_decode(self, pos0: int, n_tokens: int, row: int | None) -> None:
        """Arm the callback for one llama_decode of n_tokens at pos0; row: where the
        last token's attention goes (None: only record value norms)."""
        st = self.state
        st.capture_v = 1
        st.pos0 = pos0
        st.n_valid = pos0 + n_tokens
        if row is not None and row < self.n_rows and pos0 + n_tokens <= self.n_cells:
            st.capture_attn = 1
            st.row = row
            self.n_rows_used = max(self.n_rows_used, row + 1)
        else:
            st.capture_attn = 0

    def pause(self) -> None:
        self.state.capture_v = self.state.capture_attn = 0

    @property
    def error(self) -> int:
        return self.state.error


def default_layers(n_layer: int, count: int = 4) -> list[int]:
    """Evenly spaced layers over the upper half of the stack, where attention patterns
    are most semantic; the last layer always included."""
    count = max(1, min(count, n_layer))
    lo = n_layer // 2
    picks = np.linspace(lo, n_layer - 1, count).round().astype(int)
    return sorted(set(int(p) for p in picks))

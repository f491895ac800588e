"""llama.cpp's own quantizer (`llama_model_quantize`, through llama-cpp-python) on a GGUF.

It runs in a child process (CHILD below, which imports llama_cpp only): a call into C
cannot be interrupted, while a child can be killed on Ctrl-C before its half-written
output is removed. Its log lines ("[  12/ 272] blk.0.attn_q.weight ...") drive progress.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

import gguf

from sage.convert.base import TensorCallback
from sage.errors import SageError

# --qtype -> llama.cpp file type (F16 is written directly, never quantized)
FTYPES = {
    "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_PROGRESS = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
# argv: IN OUT FTYPE THREADS; exit 0 on success (llama.cpp logs to stderr)
CHILD = """
import ctypes, sys, llama_cpp
src, dst, ftype, threads = sys.argv[1:5]
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = int(ftype), int(threads)
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0)
"""


def quantize(src: Path, dst: Path, qtype: str, threads: int, on_tensor: TensorCallback | None = None) -> None:
    """Quantize the GGUF `src` into `dst` (which the caller removes on failure)."""
    cmd = [sys.executable, "-c", CHILD, str(src), str(dst), str(int(FTYPES[qtype])), str(threads)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, errors="replace")
    tail: collections.deque[str] = collections.deque(maxlen=6)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.strip())
            m = _PROGRESS.match(line)
            if m and on_tensor:
                on_tensor("quantize", int(m.group(1)), int(m.group(2)), m.group(3))
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        why = next((t for t in reversed(tail) if t), f"exit code {rc}")
        raise SageError(f"llama.cpp's quantizer failed on {src.name}: {why}")

"""Mutate a GGUF model and ask two judges: sage's check (sage.gguf_check.check_model) and
llama.cpp itself (a forked child loads the mutated file and tokenizes a text). Reports
how many mutations each refused and, the number that matters, how many the check let
through that then took the child down (a signal: abort or segfault). Goal: 0.

    .venv/bin/python scripts/fuzz_gguf.py --n 300 [--seed 0] [--model PATH]

Mutations: random bytes anywhere before the tensor data, a metadata value set to a
boundary value (0, 1, -1, 2**31, 2**32-1, 2**63...), an array or string length changed,
a tensor's shape, type or offset changed, the file truncated. One llama.cpp process at a
time (fork, wait): run it with SAGE_THREADS=1 beside other work.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path


def kv_value_offsets(buf: bytes):
    """(key, type, offset of the value) of each metadata KV, by walking the file."""
    pos = 24
    n_kv = struct.unpack_from("<Q", buf, 16)[0]
    out = []
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    for _ in range(n_kv):
        n = struct.unpack_from("<Q", buf, pos)[0]
        key = buf[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        t = struct.unpack_from("<I", buf, pos)[0]
        pos += 4
        out.append((key, t, pos))
        if t in sizes:
            pos += sizes[t]
        elif t == 8:
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        else:
            et, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if et == 8:
                for _ in range(count):
                    pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            else:
                pos += sizes[et] * count
    return out, pos


def tensor_infos(buf: bytes, pos: int, n: int):
    out = []
    for _ in range(n):
        ln = struct.unpack_from("<Q", buf, pos)[0]
        start = pos
        pos += 8 + ln
        nd = struct.unpack_from("<I", buf, pos)[0]
        dims_at = pos + 4
        pos += 4 + 8 * nd
        out.append((start, dims_at, nd, pos))  # pos: the type, then the offset
        pos += 12
    return out, pos


BOUNDARY = [0, 1, 2, 3, 255, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**64 - 1]


def mutate(orig: bytes, kvs, tinfos, meta_end: int, rng: random.Random) -> tuple[str, bytes | int]:
    """(what, the new bytes before the tensor data) or ("truncate", the new length)."""
    b = bytearray(orig[:meta_end])
    kind = rng.choice(["bytes", "bytes", "value", "value", "type", "length", "tensor", "tensor", "truncate"])
    if kind == "bytes":
        for _ in range(rng.choice([1, 1, 2, 4, 16])):
            b[rng.randrange(meta_end)] = rng.randrange(256)
        return kind, bytes(b[:meta_end])
    if kind == "value":
        key, t, off = rng.choice(kvs)
        size = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}.get(t, 8)
        v = rng.choice(BOUNDARY) % (1 << (8 * size))
        b[off : off + size] = v.to_bytes(size, "little")
        return f"value {key}", bytes(b[:meta_end])
    if kind == "type":  # a value's type code (the value's bytes stay)
        key, t, off = rng.choice(kvs)
        at = off - 4
        b[at : at + 4] = rng.choice([0, 4, 5, 6, 7, 8, 9, 10, 12, 13, 2**31]).to_bytes(4, "little")
        return f"type {key}", bytes(b)
    if kind == "length":  # a string length or an array count (the u64 after the element type)
        key, t, off = rng.choice([x for x in kvs if x[1] in (8, 9)])
        at = off if t == 8 else off + 4
        old = struct.unpack_from("<Q", b, at)[0]
        v = rng.choice([0, 1, old - 1, old + 1, old * 2, 2**32, 2**63])
        b[at : at + 8] = (v % 2**64).to_bytes(8, "little")
        return f"length {key}", bytes(b[:meta_end])
    if kind == "tensor":
        start, dims_at, nd, type_at = rng.choice(tinfos)
        what = rng.choice(["dim", "type", "offset", "ndims"])
        if what == "dim":
            at = dims_at + 8 * rng.randrange(nd)
            b[at : at + 8] = (rng.choice(BOUNDARY + [7, 33, 576, 49152]) % 2**64).to_bytes(8, "little")
        elif what == "type":
            b[type_at : type_at + 4] = rng.choice([0, 1, 2, 3, 4, 5, 8, 12, 14, 31, 36, 39, 40, 41, 42, 255, 2**31]).to_bytes(4, "little")
        elif what == "offset":
            at = type_at + 4
            old = struct.unpack_from("<Q", b, at)[0]
            b[at : at + 8] = (rng.choice([0, old + 32, old - 32, old + 1, 2**40, 2**64 - 32]) % 2**64).to_bytes(8, "little")
        else:
            b[dims_at - 4 : dims_at] = rng.choice([0, 1, 3, 4, 5, 2**31]).to_bytes(4, "little")
        return f"tensor {what}", bytes(b[:meta_end])
    cut = rng.choice([rng.randrange(meta_end), rng.randrange(meta_end, len(orig)), len(orig) - 1])
    return "truncate", cut


def child(path: str) -> None:
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def quiet(level, text, user):
        pass

    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    m = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
    if not m:
        os._exit(3)
    vocab = llama_cpp.llama_model_get_vocab(m)
    text = b"Tom has 3 boxes of 12 eggs.<|im_end|>"
    arr = (llama_cpp.llama_token * 256)()
    n = llama_cpp.llama_tokenize(vocab, text, len(text), arr, 256, True, True)
    buf = ctypes.create_string_buffer(64)
    for i in range(max(n, 0)):
        llama_cpp.llama_token_to_piece(vocab, arr[i], buf, 64, 0, True)
    os._exit(0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--all", action="store_true", help="also load the files the check refuses (how many llama.cpp survives)")
    args = ap.parse_args()
    from sage.gguf_check import check_model
    from sage.presets import resolve_model

    import llama_cpp  # noqa: F401  (imported once, before the forks)

    path = Path(args.model) if args.model else resolve_model(None).path
    orig = path.read_bytes()
    kvs, pos = kv_value_offsets(orig)
    tinfos, meta_end = tensor_infos(orig, pos, struct.unpack_from("<Q", orig, 8)[0])
    rng = random.Random(args.seed)
    counts = collections.Counter()
    bad = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "m.gguf"
        f.write_bytes(orig)  # mutated in place: only the metadata is rewritten per trial
        fd = os.open(f, os.O_RDWR)
        size = len(orig)
        for i in range(args.n):
            if os.fstat(fd).st_size != size:
                os.pwrite(fd, orig[os.fstat(fd).st_size :], os.fstat(fd).st_size)
            os.pwrite(fd, orig[:meta_end], 0)
            kind, data = mutate(orig, kvs, tinfos, meta_end, rng)
            if isinstance(data, int):
                os.ftruncate(fd, data)
            else:
                os.pwrite(fd, data, 0)
            try:
                check_model(f)
                verdict = "passed"
            except Exception as e:  # noqa: BLE001 - what else it raises is what we count
                verdict = "refused" if type(e).__name__ == "GGUFError" else f"check raised {type(e).__name__}"
            if verdict == "refused" and not args.all:
                counts[(verdict, "not loaded")] += 1
                continue
            pid = os.fork()
            if pid == 0:
                try:
                    child(str(f))
                finally:
                    os._exit(4)
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                outcome = f"llama.cpp {signal.Signals(os.WTERMSIG(status)).name}"
            else:
                outcome = {0: "llama.cpp loads it", 3: "llama.cpp refuses it"}.get(os.WEXITSTATUS(status), f"exit {os.WEXITSTATUS(status)}")
            counts[(verdict, outcome)] += 1
            if verdict == "passed" and "SIG" in outcome:
                bad.append((i, kind, outcome))
                Path(f"/tmp/fuzz_gguf_{i}.gguf").write_bytes(f.read_bytes()[: meta_end])
        os.close(fd)
    print(f"{args.n} mutations of {path.name} (seed {args.seed}) in {time.time() - t0:.0f} s")
    for (verdict, outcome), c in sorted(counts.items()):
        print(f"  {c:5d}  check {verdict:<10}  {outcome}")
    for i, kind, outcome in bad:
        print(f"  let through, then {outcome}: mutation {i} ({kind})")
    print(f"passed the check and crashed llama.cpp: {len(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

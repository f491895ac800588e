"""Read a GGUF's structure without trusting it, before llama.cpp (or the sidecar loader) sees it.

llama.cpp refuses most malformed files with an error, but some it meets with an assert
that takes the whole process down (SIGABRT), e.g. `id_to_token.size() ==
token_to_id.size()` when two vocabulary strings are the same. `parse` reads the header,
every metadata key/value and the tensor table through a memory map, with every count and
length checked against the bytes that are left before it is used (a file cannot make it
allocate or loop more than its own size allows), and never touches tensor data.
`check_model` adds what llama.cpp asserts on. Everything wrong is a `GGUFError` (a
SageError): one line, naming the file and what is wrong.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Container

from sage.errors import SageError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_KEY = 65535  # bytes of a key (the GGUF spec's limit)
MAX_NAME = 63  # bytes of a tensor name (GGML_MAX_NAME - 1)
MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF value types: code -> (struct format, size); 8 string and 9 array are variable
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
              8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}

# ggml tensor types: code -> (elements per block, bytes per block), as ggml and gguf-py
# define them (types are only ever appended; a code not here is left to llama.cpp)
GGML_TYPES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
    22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")


class GGUFError(SageError):
    """A file that is not a well-formed GGUF, or one llama.cpp would abort on. The
    message is `cannot load LABEL: REASON`; `reason` alone is kept for callers that
    say it in their own words."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(f"cannot load {label}: {reason}")
        self.label, self.reason = label, reason


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]  # ne[0] first, as ggml stores it
    type: int
    offset: int  # from the start of the data section
    nbytes: int | None  # None for a type this module does not know


@dataclass
class GGUFFile:
    path: Path
    size: int
    version: int
    kv: dict[str, tuple[int, Any]]  # key -> (type, value); arrays: (ARRAY, (element type, count, values or None))
    tensors: list[Tensor] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0  # where the data section starts in the file

    def value(self, key: str, default: Any = None) -> Any:
        """A scalar (int/float/bool/bytes for strings) or an array's values; default if absent."""
        tv = self.kv.get(key)
        if tv is None:
            return default
        t, v = tv
        return v[2] if t == ARRAY else v


class _Reader:
    def __init__(self, buf, size: int, label: str) -> None:
        self.buf, self.size, self.pos, self.label = buf, size, 0, label

    def fail(self, what: str) -> GGUFError:
        return GGUFError(self.label, f"corrupt GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file (offset {self.pos}, {self.size} bytes)")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def raw_string(self, what: str, limit: int | None = None) -> bytes:
        n = self.u64(f"the length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n} bytes long (at most {limit})")
        self.need(n, what)
        s = self.buf[self.pos : self.pos + n]
        self.pos += n
        return s

    def skip_strings(self, count: int, what: str) -> None:
        # the hot loop of a model check (~100 000 vocabulary and merge strings): nothing
        # but the unpack; a length past the end makes the next unpack (or the end check) fail
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        try:
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except struct.error:
            pos = self.size + 1
        self.pos = min(pos, self.size)
        if pos > self.size:
            raise self.fail(f"a string of {what} runs past the end of the file")

    def strings(self, count: int, what: str) -> list[bytes]:
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        out: list[bytes] = []
        append = out.append
        try:
            for _ in range(count):
                end = pos + 8 + unpack(buf, pos)[0]
                append(buf[pos + 8 : end])
                pos = end
        except struct.error:
            pos = self.size + 1
        self.pos = min(pos, self.size)
        if pos > self.size:
            raise self.fail(f"a string of {what} runs past the end of the file")
        return out


def _decode(raw: bytes, what: str, r: _Reader) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise r.fail(f"{what} is not UTF-8") from None


def parse(path: str | Path, keep: Container[str] | None = None, label: str | None = None) -> GGUFFile:
    """The header, metadata and tensor table of a GGUF, validated; tensor data unread.

    keep: the keys whose array values are read (others are only walked over); None: all.
    Scalars and strings are always read (strings as bytes)."""
    path = Path(path)
    label = label or str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                head = f.read(4)
                if head[:4] != MAGIC:
                    raise GGUFError(label, "not a GGUF file (no GGUF header)")
                raise GGUFError(label, f"corrupt GGUF file: {size} bytes is too short for a header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(mm, size, path, label, keep)
    except FileNotFoundError:
        raise GGUFError(label, "file not found") from None
    except IsADirectoryError:
        raise GGUFError(label, "it is a directory") from None
    except (OSError, ValueError, OverflowError) as e:  # mmap of something odd (a pipe, a device)
        raise GGUFError(label, f"cannot read it ({getattr(e, 'strerror', None) or e})") from None


def _parse(mm, size: int, path: Path, label: str, keep) -> GGUFFile:
    r = _Reader(mm, size, label)
    if mm[:4] != MAGIC:
        raise GGUFError(label, "not a GGUF file (no GGUF header)")
    r.pos = 4
    version = r.u32("the version")
    if version not in VERSIONS:
        raise r.fail(f"GGUF version {version} (readable: {', '.join(map(str, VERSIONS))})")
    n_tensors = r.u64("the tensor count")
    n_kv = r.u64("the key count")
    left = size - r.pos
    # the least a key/value takes: key length + 1 byte + type + a 1-byte value; a tensor
    # info: name length + 1 byte + n_dims + 1 dim + type + offset
    if n_kv > left // 14:
        raise r.fail(f"{n_kv} metadata keys cannot fit in {size} bytes")
    if n_tensors > left // 33:
        raise r.fail(f"{n_tensors} tensors cannot fit in {size} bytes")
    kv: dict[str, tuple[int, Any]] = {}
    for i in range(n_kv):
        key = _decode(r.raw_string(f"key {i}", MAX_KEY), f"key {i}", r)
        if not key:
            raise r.fail(f"key {i} is empty")
        if key in kv:
            raise r.fail(f"duplicate key {key!r}")
        t = r.u32(f"the type of {key!r}")
        if t in _SCALARS:
            fmt = _SCALARS[t]
            n = struct.calcsize(fmt)
            r.need(n, f"the value of {key!r}")
            (v,) = struct.unpack_from("<" + fmt, mm, r.pos)
            r.pos += n
        elif t == STRING:
            v = r.raw_string(f"the value of {key!r}")
        elif t == ARRAY:
            et = r.u32(f"the element type of {key!r}")
            count = r.u64(f"the length of {key!r}")
            want = keep is None or key in keep
            if et in _SCALARS:
                fmt = _SCALARS[et]
                n = struct.calcsize(fmt)
                if count > (size - r.pos) // n:
                    raise r.fail(f"array {key!r} of {count} {TYPE_NAMES[et]} runs past the end of the file")
                vals = None
                if want:
                    import numpy as np

                    dt = np.dtype("<" + {"?": "u1"}.get(fmt, fmt))
                    vals = np.frombuffer(mm, dtype=dt, count=count, offset=r.pos).copy()
                    if fmt == "?":
                        vals = vals.astype(bool)
                r.pos += count * n
            elif et == STRING:
                if count > (size - r.pos) // 8:
                    raise r.fail(f"array {key!r} of {count} strings runs past the end of the file")
                if want:
                    vals = r.strings(count, repr(key))
                else:
                    vals = None
                    r.skip_strings(count, repr(key))
            else:
                raise r.fail(f"array {key!r} has elements of type {et} ({TYPE_NAMES.get(et, 'unknown')})")
            v = (et, count, vals)
        else:
            raise r.fail(f"key {key!r} has the unknown type {t}")
        kv[key] = (t, v)

    align = kv.get("general.alignment")
    alignment = DEFAULT_ALIGNMENT
    if align is not None:
        at, av = align
        if at != 4 or av == 0 or av & (av - 1):
            raise r.fail("general.alignment is not a power of two (uint32)")
        alignment = av

    infos = []
    names = set()
    for i in range(n_tensors):
        name = _decode(r.raw_string(f"the name of tensor {i}", MAX_NAME), f"the name of tensor {i}", r)
        if name in names:
            raise r.fail(f"duplicate tensor {name!r}")
        names.add(name)
        n_dims = r.u32(f"the dimensions of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise r.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
        shape = []
        for _ in range(n_dims):
            r.need(8, f"the shape of {name!r}")
            (d,) = _I64.unpack_from(mm, r.pos)
            r.pos += 8
            if d < 0:
                raise r.fail(f"tensor {name!r} has a negative dimension")
            shape.append(d)
        t = r.u32(f"the type of {name!r}")
        off = r.u64(f"the offset of {name!r}")
        infos.append((name, tuple(shape), t, off))

    data_offset = -(-r.pos // alignment) * alignment
    if infos and data_offset > size:
        raise r.fail(f"the data section starts at {data_offset}, past the end of the file ({size} bytes)")
    data_size = size - data_offset
    tensors = []
    for name, shape, t, off in infos:
        n = 1
        for d in shape:
            n *= d
        if n >= 2**63:
            raise r.fail(f"tensor {name!r} has {n} elements")
        nbytes = None
        if t in GGML_TYPES:
            blck, tsize = GGML_TYPES[t]
            if shape[0] % blck:
                raise r.fail(f"tensor {name!r}: a row of {shape[0]} is not a whole number of blocks of {blck}")
            nbytes = n // blck * tsize
        elif t > 255:
            raise r.fail(f"tensor {name!r} has the unknown type {t}")
        if off % alignment:
            raise r.fail(f"tensor {name!r} is not aligned to {alignment} bytes")
        if off > data_size or (nbytes is not None and nbytes > data_size - off):
            raise r.fail(
                f"tensor {name!r} ({nbytes if nbytes is not None else '?'} bytes at data offset {off}) "
                f"lies past the end of the file ({data_size} bytes of data): the file is truncated or corrupt"
            )
        tensors.append(Tensor(name, shape, t, off, nbytes))
    return GGUFFile(path, size, version, kv, tensors, alignment, data_offset)


_INTS = (0, 1, 2, 3, 4, 5, 10, 11)
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS

# keys of the vocabulary llama.cpp reads by pointer, indexed by token id
_VOCAB_ARRAYS = {"tokenizer.ggml.scores": 6, "tokenizer.ggml.token_type": 5}
MODEL_KEYS = ("tokenizer.ggml.tokens",)


def check_model(path: str | Path, label: str | None = None) -> GGUFFile:
    """Refuse a model GGUF that is malformed or that llama.cpp would abort on; the parsed
    structure otherwise (the vocabulary read, other arrays walked over)."""
    g = parse(path, keep=MODEL_KEYS, label=label)
    label = label or str(path)

    def bad(what: str) -> GGUFError:
        return GGUFError(label, f"corrupt model file: {what}")

    arch = g.kv.get("general.architecture")
    if arch is None or arch[0] != STRING:
        raise bad("general.architecture is missing or not a string")
    if not g.tensors:
        raise bad("it holds no tensors")
    name = arch[1].decode("utf-8", "replace")
    layers = g.kv.get(f"{name}.block_count")
    # llama.cpp asserts 0 < n_layer <= LLAMA_MAX_LAYERS
    if layers is not None and (layers[0] not in _INTS or not 1 <= layers[1] <= MAX_LAYERS):
        raise bad(f"{name}.block_count is {layers[1]!r} (1 to {MAX_LAYERS} layers)")
    tokens = g.kv.get("tokenizer.ggml.tokens")
    if tokens is not None:
        if tokens[0] != ARRAY or tokens[1][0] != STRING:
            raise bad("tokenizer.ggml.tokens is not an array of strings")
        vocab = tokens[1][2]
        n = len(vocab)
        # llama.cpp reads each token as a C string: a NUL byte ends it there, and what is
        # left may repeat another token
        if b"\0" in b"".join(vocab):
            vocab = [s.split(b"\0", 1)[0] for s in vocab]
        if len(set(vocab)) != n:
            seen: dict[bytes, int] = {}
            for i, s in enumerate(vocab):
                if s in seen:
                    raise bad(f"vocabulary token {i} {s.decode('utf-8', 'replace')!r} repeats token {seen[s]}")
                seen[s] = i
        for key, etype in _VOCAB_ARRAYS.items():
            tv = g.kv.get(key)
            if tv is None:
                continue
            if tv[0] != ARRAY or tv[1][0] != etype or tv[1][1] != n:
                raise bad(f"{key} is not an array of {n} {TYPE_NAMES[etype]} (one per token)")
        merges = g.kv.get("tokenizer.ggml.merges")
        if merges is not None and (merges[0] != ARRAY or merges[1][0] != STRING):
            raise bad("tokenizer.ggml.merges is not an array of strings")
    return g

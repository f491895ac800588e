"""SAGE heads: the small components that ship beside a model in `NAME.sage.gguf`.

- tracking heads: which (layer, head) pairs the tracker records, with their weights;
- inverse analysis layer: a small transformer over per-token features that scores
  decision points. Its analytic initialization passes the eq. 7 significance feature
  straight through (zero-initialized blocks, identity readout), so untrained heads
  reproduce the plain eq. 7 pipeline exactly;
- meta-cognitive head: logistic regression over answer features (the answers sampled
  from the problem alone, the chain's own uncertainty) giving the probability that the
  answer is right; analytic: sigmoid(logit_share), the (smoothed) share of samples that
  reach the chain's answer.

Inference here is numpy only (the `sage ask` path never imports torch); training lives in
sage.reference.train. The sidecar is a GGUF with general.architecture = "sage-heads",
keys under "sage.", bound to its base model by a fingerprint of the model's
architecture, shape and vocabulary. Stock llama.cpp refuses a model GGUF with extra
tensors, so the heads live beside it, as multimodal projectors do.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sage.errors import SageError
from sage.paths import atomic_file

ARCH = "sage-heads"
FORMAT_VERSION = 2  # 2: the features of FEATURES and META_FEATURES above
SUFFIX = ".sage.gguf"

# per-token features of the inverse analysis layer, in this order (names are part of the
# file format: a sidecar lists the ones it was trained on)
FEATURES = (
    "significance",  # normalized eq. 7 significance, max over later steps
    "entropy",  # nats
    "varentropy",
    "prob",  # probability of the chosen token
    "margin",  # p(top-1) - p(top-2)
    "attention_received",  # mean attention later rows paid this token
    "value_received",  # mean value-weighted attention later rows paid this token
    "position",  # relative position in its step, 0..1
    # format 2
    "attention_peak",  # the most attention any later row paid it (receiver-head concentration)
    "entropy_delta",  # its entropy minus the mean of the 8 tokens before it
    "entropy_after",  # mean entropy of the 8 tokens after it
    "chain_position",  # relative position in the chain, 0..1
    "alt_prob",  # probability of its strongest alternative that reads differently
    "digit",  # 1 if it holds a digit
    "alt_digit",  # 1 if that alternative holds a digit
    "before_answer",  # 1 if it comes before the end of the stated answer (or there is none)
)
# the features by group, for the ablation `sage heads train` reports (format 1's are "base")
FEATURE_GROUPS = {
    "base": FEATURES[:8],
    "attention concentration": ("attention_peak",),
    "entropy along the chain": ("entropy_delta", "entropy_after"),
    "position and answer": ("chain_position", "before_answer"),
    "token and alternative": ("alt_prob", "digit", "alt_digit"),
}
# answer features of the meta-cognitive head: the distribution of answers sampled from the
# problem alone (the `start` of the sampled analysis) and the chain's own uncertainty
META_FEATURES = (
    "logit_share",  # logit of the share of samples reaching the chain's answer, (k + 1/2) / (n + 1)
    "leader_agrees",  # 1 if the samples' most frequent outcome is the chain's answer
    "none_share",  # share of samples without an answer
    "distinct",  # distinct answers among the samples, over the samples
    "log_samples",  # log of the number of samples
    "logit_token_prob",  # logit of the answer tokens' probability in the chain
    "mean_entropy",  # mean entropy of the chain's tokens
    "cut",  # 1 if the chain was cut at its token limit
)


# the meta features that read the chain itself rather than the samples
CHAIN_FEATURES = ("logit_token_prob", "mean_entropy", "cut")


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return float(np.log(p / (1 - p)))


@dataclass
class InverseLayer:
    """Pre-norm transformer blocks (one attention head, GELU MLP) over token features.
    score = readout . h_final + bias, h_0 = features @ w_in (no final norm, so the
    analytic weights pass a feature through untouched)."""

    w_in: np.ndarray  # (F, d)
    blocks: list[dict[str, np.ndarray]]  # per block: ln1 (d,), wq/wk/wv/wo (d, d), ln2 (d,), w1 (d, 4d), w2 (4d, d)
    readout: np.ndarray  # (d,)
    bias: float = 0.0
    sigmoid: bool = False  # trained layers output a logit
    b_in: np.ndarray | None = None  # (d,) added to h_0 (trained layers: folded standardization)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @staticmethod
    def analytic(depth: int = 6, d: int = 16) -> "InverseLayer":
        f = len(FEATURES)
        w_in = np.zeros((f, d), np.float32)
        w_in[FEATURES.index("significance"), 0] = 1.0
        blocks = []
        for _ in range(depth):
            blocks.append(
                {
                    "ln1": np.ones(d, np.float32),
                    "wq": np.zeros((d, d), np.float32),
                    "wk": np.zeros((d, d), np.float32),
                    "wv": np.zeros((d, d), np.float32),
                    "wo": np.zeros((d, d), np.float32),  # zero: the block adds nothing
                    "ln2": np.ones(d, np.float32),
                    "w1": np.zeros((d, 4 * d), np.float32),
                    "w2": np.zeros((4 * d, d), np.float32),
                }
            )
        readout = np.zeros(d, np.float32)
        readout[0] = 1.0
        return InverseLayer(w_in, blocks, readout, 0.0, False)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(T, F) features -> (T,) decision scores."""
        h = x.astype(np.float32) @ self.w_in  # (T, d)
        if self.b_in is not None:
            h = h + self.b_in
        for b in self.blocks:
            a = _rms(h, b["ln1"])
            q, k, v = a @ b["wq"], a @ b["wk"], a @ b["wv"]
            att = q @ k.T / np.sqrt(q.shape[1])  # (T, T), bidirectional: analysis is post hoc
            att = np.exp(att - att.max(axis=1, keepdims=True))
            att /= att.sum(axis=1, keepdims=True)
            h = h + (att @ v) @ b["wo"]
            m = _rms(h, b["ln2"])
            h = h + _gelu(m @ b["w1"]) @ b["w2"]
        s = h @ self.readout + self.bias
        return 1.0 / (1.0 + np.exp(-s)) if self.sigmoid else s


def _rms(x: np.ndarray, w: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))


@dataclass
class MetaHead:
    w: np.ndarray  # (len(META_FEATURES),)
    b: float = 0.0

    @staticmethod
    def analytic() -> "MetaHead":
        w = np.zeros(len(META_FEATURES), np.float32)
        w[0] = 1.0
        return MetaHead(w, 0.0)

    def __call__(self, x: np.ndarray) -> float:
        return float(1.0 / (1.0 + np.exp(-(float(np.dot(self.w, x)) + self.b))))


@dataclass
class SageHeads:
    fingerprint: str
    base_name: str
    tracked_layers: list[int]
    head_weights: np.ndarray  # (n_tracked, n_head), rows sum to 1 over all tracked heads
    threshold: float  # on the inverse layer's score
    inverse: InverseLayer
    meta: MetaHead
    trained: bool = False
    info: dict[str, str] = field(default_factory=dict)  # provenance: command, seed, data, metrics

    @staticmethod
    def analytic(fingerprint: str, base_name: str, layers: list[int], n_head: int, depth: int = 6) -> "SageHeads":
        w = np.full((len(layers), n_head), 1.0 / (len(layers) * n_head), np.float32)
        return SageHeads(fingerprint, base_name, list(layers), w, 0.3, InverseLayer.analytic(depth), MetaHead.analytic())

    @property
    def calibrated(self) -> bool:
        """Whether the analysis turns the samples into P(right) with the meta-cognitive
        head: a sidecar whose training kept it (info "meta" = "trained"; training keeps the
        samples' share where the fitted head did no better out of fold). It may sit beside
        analytic fork heads (`sage heads train --fork-problems 0`: answers only)."""
        return self.info.get("meta") == "trained"

    def calibration(self) -> dict[str, float | None]:
        """What the sidecar measured of its meta head on held-out answers (ece, answers, right),
        whether the head reads the chain's own uncertainty (chain: 1.0) or only the samples,
        and whether it reads the samples' share alone (share: 1.0, a recalibration of it)."""
        import json

        try:
            m = json.loads(self.info.get("metrics", "{}"))
        except ValueError:
            m = {}
        m = m if isinstance(m, dict) else {}

        def num(key: str) -> float | None:
            v = m.get(key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) else None

        # whether it reads the chain's own uncertainty, or only the samples (training may
        # choose the samples' features alone), from its weights
        chain = [META_FEATURES.index(n) for n in CHAIN_FEATURES]
        others = np.delete(self.meta.w, META_FEATURES.index("logit_share"))
        return {"ece": num("ece_trained"), "answers": num("test_answers"), "right": num("test_correct"),
                "chain": float(bool(np.any(self.meta.w[chain] != 0))), "share": float(not np.any(others != 0))}

    def describe(self) -> str:
        data = f" ({self.info['data']})" if "data" in self.info else ""
        if not self.trained and self.calibrated:  # answers only (sage heads train --fork-problems 0)
            return f"sidecar for {self.base_name}: analytic fork heads, trained answer head{data}"
        return f"{'trained' if self.trained else 'analytic'} sidecar for {self.base_name}{data}"

    # --- file -------------------------------------------------------------------------

    def save(self, path: Path, force: bool = False) -> None:
        """Write the sidecar atomically (temp file + rename)."""
        import gguf

        path = Path(path)
        if path.exists() and not force:
            raise SageError(f"{path} exists; pass --force to overwrite it")
        with atomic_file(path) as tmp:
            w = gguf.GGUFWriter(tmp, ARCH)
            w.add_name(f"SAGE heads for {self.base_name}")
            w.add_uint32("sage.version", FORMAT_VERSION)
            w.add_string("sage.base.fingerprint", self.fingerprint)
            w.add_string("sage.base.name", self.base_name)
            w.add_bool("sage.trained", self.trained)
            w.add_array("sage.tracking.layers", [int(x) for x in self.tracked_layers])
            w.add_float32("sage.inverse.threshold", float(self.threshold))
            w.add_uint32("sage.inverse.depth", self.inverse.depth)
            w.add_array("sage.inverse.features", list(FEATURES))
            w.add_float32("sage.inverse.bias", float(self.inverse.bias))
            w.add_bool("sage.inverse.sigmoid", self.inverse.sigmoid)
            w.add_array("sage.meta.features", list(META_FEATURES))
            w.add_float32("sage.meta.bias", float(self.meta.b))
            for k, v in sorted(self.info.items()):
                w.add_string(f"sage.info.{k}", str(v))
            w.add_tensor("sage.tracking.head_weights", self.head_weights.astype(np.float32))
            w.add_tensor("sage.inverse.w_in", self.inverse.w_in.astype(np.float32))
            w.add_tensor("sage.inverse.readout", self.inverse.readout.astype(np.float32))
            if self.inverse.b_in is not None:
                w.add_tensor("sage.inverse.b_in", self.inverse.b_in.astype(np.float32))
            for i, b in enumerate(self.inverse.blocks):
                for name, arr in b.items():
                    w.add_tensor(f"sage.inverse.blk.{i}.{name}", arr.astype(np.float32))
            w.add_tensor("sage.meta.w", self.meta.w.astype(np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()

    @staticmethod
    def load(path: Path) -> "SageHeads":
        """Read and validate a sidecar completely (every key, every tensor's type and shape,
        finite weights); anything wrong is a SageError naming the file."""
        from sage.gguf_check import GGUFError, parse

        path = Path(path)
        try:
            g = parse(path, keep=_ARRAY_KEYS)
        except GGUFError as e:
            raise SageError(f"{path} is not a SAGE heads file ({e.reason})") from None
        try:
            return _from_gguf(g, path)
        except _Bad as e:
            raise SageError(f"{path} is not a valid SAGE heads file: {e}") from None


_ARRAY_KEYS = frozenset({"sage.tracking.layers", "sage.inverse.features", "sage.meta.features"})
_BLOCK = ("ln1", "wq", "wk", "wv", "wo", "ln2", "w1", "w2")
MAX_DEPTH, MAX_WIDTH, MAX_LAYERS = 64, 4096, 4096


class _Bad(Exception):
    pass


def _from_gguf(g, path: Path) -> SageHeads:
    from sage.gguf_check import ARRAY, STRING

    def get(key: str, kinds: tuple[int, ...], what: str):
        tv = g.kv.get(key)
        if tv is None:
            raise _Bad(f"{key} is missing")
        t, v = tv
        if t not in kinds:
            raise _Bad(f"{key} is not {what}")
        return v

    def text(raw: bytes, key: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{key} is not UTF-8") from None

    def strings(key: str) -> tuple[str, ...]:
        et, _, vals = get(key, (ARRAY,), "an array of strings")
        if et != STRING:
            raise _Bad(f"{key} is not an array of strings")
        return tuple(text(x, key) for x in vals)

    ints = (0, 1, 2, 3, 4, 5, 10, 11)
    arch = g.kv.get("general.architecture")
    arch_name = arch[1].decode("utf-8", "replace") if arch and arch[0] == STRING else None
    if arch_name != ARCH:
        raise SageError(f"{path} is not a SAGE heads file (general.architecture is {arch_name!r})")
    version = get("sage.version", ints, "an integer")
    if version != FORMAT_VERSION:
        raise SageError(f"{path} is SAGE heads format {version}; this sage reads {FORMAT_VERSION}: train the "
                        "heads again with `sage heads train`, or pass --heads none")
    if strings("sage.inverse.features") != FEATURES or strings("sage.meta.features") != META_FEATURES:
        raise SageError(f"{path} was trained on other features than this sage computes")
    et, _, layers = get("sage.tracking.layers", (ARRAY,), "an array of layers")
    if et not in ints:
        raise _Bad("sage.tracking.layers is not an array of integers")
    layers = [int(x) for x in layers]
    if not layers or len(layers) > MAX_LAYERS or min(layers) < 0 or max(layers) >= MAX_LAYERS or len(set(layers)) != len(layers):
        raise _Bad("sage.tracking.layers must be distinct layer indices, at least one")
    depth = get("sage.inverse.depth", ints, "an integer")
    if not 0 <= depth <= MAX_DEPTH:
        raise _Bad(f"sage.inverse.depth is {depth} (0 to {MAX_DEPTH})")
    floats = (6, 12)

    def number(key: str) -> float:
        x = float(get(key, floats, "a number"))
        if not np.isfinite(x):
            raise _Bad(f"{key} is not finite")
        return x

    def flag(key: str) -> bool:
        return bool(get(key, (7,), "a bool"))

    tensors = {t.name: t for t in g.tensors}
    with open(path, "rb") as f:

        def tensor(name: str, shape: tuple[int | None, ...]) -> np.ndarray:
            t = tensors.get(name)
            if t is None:
                raise _Bad(f"tensor {name} is missing")
            np_shape = tuple(reversed(t.shape))
            if t.type != 0 or len(np_shape) != len(shape) or any(
                want is not None and want != got for want, got in zip(shape, np_shape)
            ):
                want = "x".join("?" if d is None else str(d) for d in shape)
                raise _Bad(f"tensor {name} is {'x'.join(map(str, np_shape))} (type {t.type}), not float32 {want}")
            f.seek(g.data_offset + t.offset)
            raw = f.read(t.nbytes)
            if len(raw) != t.nbytes:
                raise _Bad(f"tensor {name} is cut short")
            a = np.frombuffer(raw, dtype="<f4").reshape(np_shape).astype(np.float32)
            if not np.isfinite(a).all():
                raise _Bad(f"tensor {name} holds values that are not finite")
            return a

        hw = tensor("sage.tracking.head_weights", (len(layers), None))
        if not 1 <= hw.shape[1] <= MAX_WIDTH:
            raise _Bad("sage.tracking.head_weights has no heads")
        w_in = tensor("sage.inverse.w_in", (len(FEATURES), None))
        d = w_in.shape[1]
        if not 1 <= d <= MAX_WIDTH:
            raise _Bad(f"the inverse layer's width is {d}")
        shapes = {"ln1": (d,), "wq": (d, d), "wk": (d, d), "wv": (d, d), "wo": (d, d), "ln2": (d,),
                  "w1": (d, 4 * d), "w2": (4 * d, d)}
        blocks = [{k: tensor(f"sage.inverse.blk.{i}.{k}", shapes[k]) for k in _BLOCK} for i in range(depth)]
        readout = tensor("sage.inverse.readout", (d,))
        b_in = tensor("sage.inverse.b_in", (d,)) if "sage.inverse.b_in" in tensors else None
        meta_w = tensor("sage.meta.w", (len(META_FEATURES),))
    info = {}
    for k, (t, v) in g.kv.items():
        if k.startswith("sage.info."):
            if t != STRING:
                raise _Bad(f"{k} is not a string")
            info[k[len("sage.info."):]] = text(v, k)
    if "metrics" in info:
        import json

        try:
            ok = isinstance(json.loads(info["metrics"]), dict)
        except (ValueError, RecursionError):
            ok = False
        if not ok:
            raise _Bad("sage.info.metrics is not a JSON object")
    return SageHeads(
        fingerprint=text(get("sage.base.fingerprint", (STRING,), "a string"), "sage.base.fingerprint"),
        base_name=text(get("sage.base.name", (STRING,), "a string"), "sage.base.name"),
        tracked_layers=layers,
        head_weights=hw,
        threshold=number("sage.inverse.threshold"),
        inverse=InverseLayer(w_in, blocks, readout, number("sage.inverse.bias"), flag("sage.inverse.sigmoid"), b_in),
        meta=MetaHead(meta_w, number("sage.meta.bias")),
        trained=flag("sage.trained"),
        info=info,
    )


def fingerprint(engine) -> str:
    """Identity of a base model for its heads: architecture, shape and vocabulary (not the
    quantization: heads trained on a Q4 model serve its F16 original too)."""
    h = hashlib.sha256()
    for v in (engine.architecture, engine.n_layer, engine.n_embd, engine.n_head, engine.n_head_kv, engine.n_vocab):
        h.update(f"{v}|".encode())
    h.update(engine.vocab_bytes())
    return h.hexdigest()[:32]


def sidecar_path(model_path: Path) -> Path:
    """NAME.gguf -> NAME.sage.gguf beside it."""
    p = Path(model_path)
    return p.with_name(p.name[: -len(".gguf")] + SUFFIX if p.name.endswith(".gguf") else p.name + SUFFIX)


SHIPPED = Path(__file__).resolve().parent / "sidecars"  # heads sage ships for its presets


def model_stem(model_path: Path) -> str:
    """NAME of NAME-Q4_K_M.gguf (the quantization is not part of the heads' identity)."""
    name = Path(model_path).name
    name = name[: -len(".gguf")] if name.endswith(".gguf") else name
    return re.sub(r"[-.](?:Q\d\w*|F16|F32|BF16)$", "", name, flags=re.I)


def heads_name(model_path: Path, preset: str | None = None) -> str:
    """File name `sage heads train` gives a model's sidecar in the user's heads dir."""
    return f"{preset or model_stem(model_path)}{SUFFIX}"


def find_heads(model_path: Path, preset: str | None = None, user_dir: Path | None = None) -> Path | None:
    """The sidecar beside the model, else one `sage heads train` wrote to user_dir (named
    after the preset or the model file), else one sage ships for the preset."""
    beside = sidecar_path(model_path)
    if beside.is_file():
        return beside
    # `sage convert` writes NAME-Q4_K_M.gguf beside one NAME.sage.gguf for all its quant types
    stem = model_stem(model_path)
    shared = Path(model_path).with_name(stem + SUFFIX)
    if shared.is_file():
        return shared
    if user_dir is not None:
        mine = Path(user_dir) / heads_name(model_path, preset)
        if mine.is_file():
            return mine
    if preset:
        shipped = SHIPPED / f"{preset}{SUFFIX}"
        if shipped.is_file():
            return shipped
    return None


def resolve_heads(spec: str | Path | None, model_path: Path | None = None, preset: str | None = None) -> Path | None:
    """The sidecar a command uses: spec "none" -> None (the built-in analytic heads); a
    path -> that file (it must exist); None -> find_heads for `model_path`: beside the
    model, in the user's heads dir, else the one shipped for the preset (None if none)."""
    from sage.paths import heads_dir

    if spec is not None and str(spec) == "none":
        return None
    if spec is not None:
        if not Path(spec).is_file():
            raise SageError(f"no heads sidecar at {spec}")
        return Path(spec)
    if model_path is None:
        raise ValueError("resolve_heads needs the model path to look a sidecar up")
    return find_heads(model_path, preset, heads_dir())

"""Hugging Face checkpoint -> GGUF for llama.cpp, plus the SAGE heads sidecar.

    from sage.convert import convert
    result = convert("HuggingFaceTB/SmolLM2-135M-Instruct", out_dir=".", qtype="Q4_K_M")

writes `NAME-Q4_K_M.gguf` and `NAME.sage.gguf` and checks the model against the torch
reference on the source weights. The pieces: `base` (registered converter classes, one
per architecture family in `llama`, `qwen2`, `qwen3`; streaming GGUF writer), `vocab`
(tokenizer), `quantize` (llama.cpp's quantizer), `sidecar` (heads), `verify`.

Outputs are written to temp files in the output directory and renamed at the end: an
error or Ctrl-C leaves neither partial outputs nor temp files behind.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sage.convert import llama, qwen2, qwen3  # noqa: F401  (register the converters)
from sage.convert.base import REGISTRY, Checkpoint, Converter, TensorCallback
from sage.convert.quantize import FTYPES, quantize
from sage.convert.sidecar import make_heads
from sage.convert.verify import THRESHOLDS, Verification, verify as verify_model
from sage.convert.vocab import load_vocab, read_tokenizer
from sage.errors import SageError
from sage.heads import SUFFIX
from sage.paths import temp_beside

QTYPES = ("Q4_K_M", "Q4_0", "Q8_0", "F16")
# what the hub download takes: config, tokenizer, safetensors weights, SAGE heads
HUB_PATTERNS = [
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.json", "chat_template.jinja",
    "*.safetensors", "*.safetensors.index.json", f"*{SUFFIX}",
]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class VerificationError(SageError):
    """The converted model disagrees with the source beyond the threshold. The outputs are
    kept (complete files; the numbers say how far off they are); `result` has them."""

    def __init__(self, result: "ConvertResult") -> None:
        v = result.verification
        super().__init__(
            f"verification failed: top-1 agreement {v.top1:.3f} < {v.threshold:.3f} for {v.qtype} "
            f"(mean KL {v.kl_mean:.4f} nats over {v.n_tokens} tokens); the output is kept at {result.model_path}"
        )
        self.result = result


@dataclass
class ConvertResult:
    name: str
    source: str  # what was asked for: a directory or a hub repo id
    architecture: str  # Hugging Face architecture
    gguf_architecture: str
    qtype: str
    model_path: Path
    heads_path: Path
    heads: str  # where the heads came from: analytic, checkpoint, checkpoint, re-bound
    n_params: int
    n_tensors: int
    source_bytes: int
    model_bytes: int
    heads_bytes: int
    seconds: float  # the whole conversion, download excluded
    seconds_write: float  # reading the checkpoint and writing the (intermediate) GGUF
    seconds_quantize: float | None
    verification: Verification | None

    @property
    def bits_per_weight(self) -> float:
        return self.model_bytes * 8 / self.n_params

    @property
    def write_mb_per_s(self) -> float:
        """Checkpoint bytes read (and converted, written) per second."""
        return self.source_bytes / 1e6 / max(self.seconds_write, 1e-9)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "verification"}
        d.update(model_path=str(self.model_path), heads_path=str(self.heads_path),
                 bits_per_weight=self.bits_per_weight, write_mb_per_s=self.write_mb_per_s,
                 verification=self.verification.to_dict() if self.verification else None)
        return d


@dataclass
class Source:
    spec: str
    name: str  # NAME of the outputs: the directory's or the repo's name
    path: Path | None  # local directory (after download for hub ids)
    repo: str | None  # hub repo id


def parse_source(spec: str) -> Source:
    """A local checkpoint directory or a hub repo id; no network."""
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise SageError(f"{spec} is not a directory; give a Hugging Face checkpoint directory or a hub repo id ORG/NAME")
        return Source(spec, p.resolve().name, p, None)
    if _HUB_ID.fullmatch(spec):
        return Source(spec, spec.split("/")[1], None, spec)
    raise SageError(f"{spec}: no such directory, and not a hub repo id (ORG/NAME)")


def download(repo: str) -> Path:
    """The checkpoint's config, tokenizer, safetensors and heads from the hub (or its
    cache); offline and not cached is one line saying how to fetch it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    how = (f"connect to the internet and run `sage convert {repo}` again, or fetch it into the cache with "
           f"`hf download {repo} --include '*.json' '*.safetensors'`")
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise SageError(f"{repo} is neither a local directory nor in the Hugging Face cache, and the hub cannot be reached; {how}") from None
    except GatedRepoError:
        raise SageError(f"{repo} is gated on the hub: accept its terms there and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise SageError(f"{repo}: no such hub repository (or it is private: `hf auth login`)") from None
    except HfHubHTTPError as e:
        raise SageError(f"cannot download {repo} ({e.__class__.__name__}); {how}") from None
    except OSError as e:
        raise SageError(f"cannot download {repo}: {e}") from None


def read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise SageError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SageError(f"{f}: unreadable ({e})") from None


def converter_class(config: dict) -> type[Converter]:
    """The registered converter for the config's `architectures`, else a SageError naming
    the supported ones (and why LoopCoder cannot be)."""
    archs = [str(a) for a in config.get("architectures") or []]
    for a in archs:
        if a in REGISTRY:
            return REGISTRY[a]
    supported = ", ".join(sorted(REGISTRY))
    model_type = str(config.get("model_type", ""))
    if not archs:
        by_type = [c for c in REGISTRY.values() if c.model_type == model_type]
        if by_type:
            return by_type[0]
    what = archs[0] if archs else model_type or "unknown"
    if any("loopcoder" in n.lower() for n in [*archs, model_type]):
        raise SageError(
            f"{what} (SAGE-OSS-40B) re-runs a window of its layers in a loop (loop attention); stock llama.cpp "
            f"has no loop attention, so it cannot run it and sage cannot convert it. Supported: {supported} "
            "(sage-reasoning-32b is Qwen2ForCausalLM)"
        )
    raise SageError(f"unsupported architecture {what!r}; sage convert supports {supported}")


def normalize_qtype(qtype: str) -> str:
    q = qtype.strip().upper()
    if q not in QTYPES:
        raise SageError(f"unknown quantization {qtype!r}; choose one of {', '.join(QTYPES)}")
    return q


def convert(
    src: str | Path,
    out_dir: str | Path = ".",
    qtype: str = "Q4_K_M",
    force: bool = False,
    verify: bool = True,
    on_tensor: TensorCallback | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Convert a Hugging Face checkpoint (directory or hub repo id) into
    `out_dir/NAME-QTYPE.gguf` and `out_dir/NAME.sage.gguf`.

    on_tensor(stage, done, total, name) reports tensors written ("write") and quantized
    ("quantize"); on_stage(stage) the stages: download, write, quantize, heads, verify.
    A failed verification raises VerificationError after the outputs are in place."""
    from sage.engine import Engine, default_threads

    stage = on_stage or (lambda s: None)
    qtype = normalize_qtype(qtype)
    source = parse_source(str(src))
    out = Path(out_dir).expanduser()
    model_path, heads_path = out / f"{source.name}-{qtype}.gguf", out / f"{source.name}{SUFFIX}"
    for target in (model_path, heads_path):  # before any work
        if target.is_dir():
            raise SageError(f"{target} is a directory")
    if model_path.exists() and not force:
        raise SageError(f"{model_path} exists; pass --force to overwrite it")
    # one NAME.sage.gguf serves every quantization of NAME: another type converted into the
    # same directory keeps it (if it belongs to this model), unless --force
    keep_heads = heads_path.exists() and not force
    if keep_heads:
        from sage.heads import SageHeads

        try:
            SageHeads.load(heads_path)
        except SageError:
            raise SageError(f"{heads_path} exists; pass --force to overwrite it") from None
    if out.exists() and not out.is_dir():
        raise SageError(f"{out} is not a directory")
    if source.path is None:
        stage("download")
        source.path = download(source.repo)

    t0 = time.perf_counter()
    config = read_config(source.path)
    cls = converter_class(config)
    if source.repo and not any(source.path.glob("*.safetensors")):  # pickles were not downloaded
        raise SageError(f"{source.repo} has no *.safetensors weights on the hub; sage reads safetensors only")
    checkpoint = Checkpoint(source.path)
    conv = cls(config, checkpoint)
    tokenizer = read_tokenizer(source.path)
    vocab = load_vocab(source.path, tokenizer, conv.args.vocab_size, conv.vocab_pre(tokenizer))

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp_model, tmp_heads = temp_beside(model_path), temp_beside(heads_path)
    tmp_input = temp_beside(out / f"{source.name}-lossless.gguf")
    t_quant = None
    try:
        stage("write")
        t = time.perf_counter()
        if qtype == "F16":
            conv.write(tmp_model, "F16", source.name, vocab, on_tensor)
            t_write = time.perf_counter() - t
        else:
            conv.write(tmp_input, "lossless", source.name, vocab, on_tensor)
            t_write = time.perf_counter() - t
            stage("quantize")
            t = time.perf_counter()
            quantize(tmp_input, tmp_model, qtype, default_threads(), on_tensor)
            t_quant = time.perf_counter() - t
            tmp_input.unlink()
        stage("heads")
        engine = Engine(tmp_model, n_ctx=256)
        try:
            if keep_heads:
                from sage.heads import fingerprint

                if SageHeads.load(heads_path).fingerprint != fingerprint(engine):
                    raise SageError(f"{heads_path} exists and belongs to another model; pass --force to replace it")
                heads_from = "existing sidecar kept"
            else:
                heads_from = make_heads(source.path, source.name, engine, tmp_heads)
            verification = None
            if verify:
                stage("verify")
                verification = verify_model(conv, engine, qtype)
        finally:
            engine.close()
        os.replace(tmp_model, model_path)
        if not keep_heads:
            os.replace(tmp_heads, heads_path)
    except BaseException:
        for f in (tmp_input, tmp_model, tmp_heads):
            f.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    result = ConvertResult(
        name=source.name,
        source=source.spec,
        architecture=next((a for a in config.get("architectures") or [] if a in REGISTRY), cls.__name__),
        gguf_architecture=conv.arch_name,
        qtype=qtype,
        model_path=model_path,
        heads_path=heads_path,
        heads=heads_from,
        n_params=conv.n_params,
        n_tensors=len(conv.plan),
        source_bytes=checkpoint.nbytes,
        model_bytes=model_path.stat().st_size,
        heads_bytes=heads_path.stat().st_size,
        seconds=time.perf_counter() - t0,
        seconds_write=t_write,
        seconds_quantize=t_quant,
        verification=verification,
    )
    if verification is not None and not verification.passed:
        raise VerificationError(result)
    return result


__all__ = ["convert", "ConvertResult", "VerificationError", "QTYPES", "THRESHOLDS", "FTYPES"]

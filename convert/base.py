"""The converter base class, its registry, and the checkpoint reader.

One registered subclass per Hugging Face architecture (convert/llama.py, qwen2.py,
qwen3.py) overrides only what differs: the GGUF architecture, tensor fix-ups (llama's
q/k permutation), the tokenizer's pre-tokenizer, rope scaling. Tensor names and metadata
keys come from gguf-py (`get_tensor_name_map`, the `GGUFWriter.add_*` helpers); names and
shapes are checked against the torch reference (model/arch) built on the meta device, so
one place knows what an architecture's checkpoint holds.

Streaming: tensor infos are written first, then each tensor is read from its safetensors
file, fixed up, cast and written before the next is read, so peak memory follows the
largest tensor, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import gguf
import numpy as np
import torch

from sage.reference.arch import get_arch, load_weights, safetensors_files
from sage.errors import SageError

# Hugging Face `architectures` name -> converter class, filled by @register
REGISTRY: dict[str, type["Converter"]] = {}

# safetensors dtypes a checkpoint may hold (quantized or fp8 checkpoints are not read)
SOURCE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# lossless GGUF type of each, for the intermediate file the quantizer reads
LOSSLESS = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "BF16": gguf.GGMLQuantizationType.BF16,
}
# GGUF types written from numpy arrays; BF16 travels as raw 16-bit words (numpy has no bfloat16)
NUMPY_TYPES = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
FILE_TYPES = {
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
}

# on_tensor(stage, done, total, tensor name)
TensorCallback = Callable[[str, int, int, str], None]


def register(*hf_architectures: str):
    """Class decorator: the converter for these Hugging Face `architectures` names."""

    def deco(cls: type[Converter]) -> type[Converter]:
        for name in hf_architectures:
            REGISTRY[name] = cls
        return cls

    return deco


@dataclass(frozen=True)
class SourceTensor:
    file: Path
    dtype: str  # safetensors dtype name: F32, F16, BF16
    shape: tuple[int, ...]


class Checkpoint:
    """The *.safetensors files of a checkpoint directory, indexed by tensor name and read
    one tensor at a time. Pickle checkpoints are refused: loading them can run code."""

    def __init__(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = path
        self.files = files = safetensors_files(path)
        self.tensors: dict[str, SourceTensor] = {}
        for f in files:
            try:
                with safe_open(f, "pt") as st:
                    for k in st.keys():
                        sl = st.get_slice(k)
                        if k in self.tensors:
                            raise SageError(f"{path}: tensor {k} is in both {self.tensors[k].file.name} and {f.name}")
                        self.tensors[k] = SourceTensor(f, sl.get_dtype(), tuple(sl.get_shape()))
            except (SafetensorError, OSError) as e:
                raise SageError(f"{f}: unreadable safetensors file ({e})") from None
        self.nbytes = sum(f.stat().st_size for f in files)

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype."""
        from safetensors import safe_open

        # a fresh mapping per tensor: pages of a mapping kept open stay resident, so RSS
        # would grow to the whole file; reopening bounds it by one tensor
        with safe_open(self.tensors[name].file, "pt") as st:
            return st.get_tensor(name)


@dataclass
class TensorPlan:
    """One GGUF tensor: where it comes from and its shape (torch order, rows first)."""

    name: str  # GGUF name
    shape: tuple[int, ...]
    source: str | None  # checkpoint key; None for tensors the converter generates
    src_dtype: str = "F32"
    make: Callable[[], torch.Tensor] | None = None  # generated tensors

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    def out_type(self, target: str) -> gguf.GGMLQuantizationType:
        """target "F16": the F16 model; "lossless": the quantizer's input, in the source dtype.
        1-D tensors (norms, biases, rope factors) stay F32, as llama.cpp's converter keeps them."""
        if len(self.shape) <= 1:
            return gguf.GGMLQuantizationType.F32
        if target == "F16":
            return gguf.GGMLQuantizationType.F16
        return LOSSLESS[self.src_dtype]


def rope_kind(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


class Converter:
    """Hugging Face checkpoint -> GGUF for one architecture family. Subclasses set the
    class attributes and override only what differs."""

    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    model_type: ClassVar[str]  # the model/arch module of the torch reference
    tokenizer_pre: ClassVar[str] = "default"  # llama.cpp's pre-tokenizer name

    def __init__(self, config: dict, checkpoint: Checkpoint) -> None:
        self.config = config
        self.checkpoint = checkpoint
        arch = get_arch(self.model_type)
        self.args = arch.ModelArgs.from_dict(config)
        # the reference model on the meta device: costs nothing, knows names and shapes;
        # verification streams real weights through it (convert/verify.py)
        with torch.device("meta"):
            self.reference = arch.Model(self.args)
        self.check_rope_scaling()
        self.names = gguf.get_tensor_name_map(self.gguf_arch, self.args.num_hidden_layers)
        self.plan = self.make_plan()

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    @property
    def n_params(self) -> int:
        return sum(p.n_elements for p in self.plan)

    # --- what differs per family (override) -------------------------------------------

    def check_rope_scaling(self) -> None:
        kind = rope_kind(self.args.rope_scaling)
        if kind not in ("default", "linear"):
            raise SageError(f"rope scaling {kind!r} is not supported for {self.arch_name} (supported: linear)")

    def modify(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Fix-ups of a checkpoint tensor before it is written (permutes, folds)."""
        return tensor

    def extra_tensors(self) -> list[TensorPlan]:
        """Tensors the GGUF needs that the checkpoint does not hold."""
        return []

    def vocab_pre(self, tokenizer: dict) -> str:
        """llama.cpp's name for the tokenizer's pre-tokenizer (tokenizer.ggml.pre)."""
        return self.tokenizer_pre

    def set_params(self, w: gguf.GGUFWriter, name: str) -> None:
        """Hyperparameters as GGUF metadata, through gguf-py's helpers."""
        a = self.args
        w.add_name(name)
        w.add_context_length(a.max_position_embeddings)
        w.add_embedding_length(a.hidden_size)
        w.add_block_count(a.num_hidden_layers)
        w.add_feed_forward_length(a.intermediate_size)
        w.add_head_count(a.num_attention_heads)
        w.add_head_count_kv(a.num_key_value_heads)
        w.add_key_length(a.head_dim)
        w.add_value_length(a.head_dim)
        w.add_rope_dimension_count(a.head_dim)
        w.add_rope_freq_base(a.rope_theta)
        w.add_layer_norm_rms_eps(a.rms_norm_eps)
        w.add_vocab_size(a.vocab_size)
        if rope_kind(a.rope_scaling) == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(a.rope_scaling["factor"])

    # --- shared -----------------------------------------------------------------------

    def make_plan(self) -> list[TensorPlan]:
        """Every GGUF tensor in the reference model's order; names and shapes checked
        against the torch reference (sage.reference.arch.load_weights) before anything is read."""
        src = self.checkpoint.tensors
        bad = sorted({t.dtype for t in src.values()} - SOURCE_DTYPES.keys())
        if bad:
            raise SageError(
                f"{self.checkpoint.path}: tensors of dtype {', '.join(bad)}; "
                "sage converts F32, F16 and BF16 checkpoints only (not pre-quantized ones)"
            )
        meta = {k: torch.empty(t.shape, device="meta") for k, t in src.items()}
        # sanitize drops what the model recomputes or shares (rotary tables, a tied lm_head)
        load_weights(self.reference, self.reference.sanitize(meta), str(self.checkpoint.path), torch.float32)
        plan = []
        for key, param in self.reference.state_dict().items():
            name = self.names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise SageError(f"{key}: gguf-py has no {self.arch_name} tensor name for it")
            plan.append(TensorPlan(name, tuple(param.shape), key, src[key].dtype))
        return plan + self.extra_tensors()

    def read(self, p: TensorPlan) -> torch.Tensor:
        """The tensor as it goes into the GGUF (before the cast)."""
        if p.source is None:
            return p.make()
        return self.modify(p.source, self.checkpoint.read(p.source))

    def write(
        self, path: Path, target: str, name: str, vocab, on_tensor: TensorCallback | None = None
    ) -> None:
        """Write the GGUF at `path`: target "F16" (the model) or "lossless" (the quantizer's
        input). Tensor infos first, then one tensor at a time (gguf-py enforces the order)."""
        w = gguf.GGUFWriter(path, self.arch_name)
        try:
            self.set_params(w, name)
            types = [p.out_type(target) for p in self.plan]
            two_d = [t for p, t in zip(self.plan, types) if len(p.shape) > 1]
            w.add_file_type(FILE_TYPES[max(set(two_d), key=two_d.count)])
            vocab.add_to_gguf(w)
            for p, t in zip(self.plan, types):
                itemsize = 4 if t == gguf.GGMLQuantizationType.F32 else 2
                w.add_tensor_info(p.name, p.shape, NUMPY_TYPES.get(t, np.uint16), p.n_elements * itemsize,
                                  raw_dtype=None if t in NUMPY_TYPES else t)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for i, (p, t) in enumerate(zip(self.plan, types)):
                w.write_tensor_data(to_numpy(self.read(p), t, p.name))
                if on_tensor:
                    on_tensor("write", i + 1, len(self.plan), p.name)
        finally:
            w.close()


def to_numpy(t: torch.Tensor, kind: gguf.GGMLQuantizationType, name: str) -> np.ndarray:
    """A tensor in the GGUF type `kind` as a contiguous numpy array."""
    if kind == gguf.GGMLQuantizationType.F32:
        return t.to(torch.float32).contiguous().numpy()
    if kind == gguf.GGMLQuantizationType.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if t.dtype != torch.float16:
        # on the source: a reduction allocates nothing, isfinite on the cast would allocate
        # more than the tensor; from 65520 up, float16 rounds to inf
        lo, hi = t.aminmax()
        if not (lo > -65520 and hi < 65520):
            raise SageError(f"{name} has values beyond float16's range; convert with --qtype Q8_0 or Q4_K_M instead")
    return t.to(torch.float16).contiguous().numpy()

"""LlamaForCausalLM (Llama 2/3, SmolLM2, DeepSeek-R1-Distill-Llama, ...).

What differs from the base: q/k rows are permuted so that ggml's interleaved-pair rope
computes Hugging Face's rotate-half rope (llama.cpp runs llama with NORM rope, qwen with
NEOX); llama3 rope scaling travels as per-frequency factors (`rope_freqs`); the BPE
pre-tokenizer differs between tokenizers that share the architecture.
"""

from __future__ import annotations

import gguf
import torch

from sage.convert.base import Converter, TensorPlan, register, rope_kind
from sage.reference.arch.llama import rope_inv_freq
from sage.errors import SageError


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute on (n_head * hs, ...) rows; undone by
    sage.reference.arch.llama.unpermute."""
    # rows (n_head, 2, hs/2) -> (n_head, hs/2, 2): the two rotate-half halves interleaved
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pre_tokenizer_parts(tokenizer: dict) -> list[dict]:
    """The pre-tokenizer steps of a tokenizer.json (a Sequence flattened)."""
    pre = tokenizer.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]


@register("LlamaForCausalLM")
class LlamaConverter(Converter):
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    model_type = "llama"

    def modify(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return permute(tensor, self.args.num_attention_heads)
        if key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return permute(tensor, self.args.num_key_value_heads)
        return tensor

    def check_rope_scaling(self) -> None:
        if rope_kind(self.args.rope_scaling) != "llama3":
            super().check_rope_scaling()

    def extra_tensors(self) -> list[TensorPlan]:
        a = self.args
        if rope_kind(a.rope_scaling) != "llama3":
            return []

        def factors() -> torch.Tensor:  # (hs/2,) divisors of the unscaled frequencies
            return rope_inv_freq(a.head_dim, a.rope_theta) / rope_inv_freq(a.head_dim, a.rope_theta, a.rope_scaling)

        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        return [TensorPlan(name, (a.head_dim // 2,), None, make=factors)]

    def vocab_pre(self, tokenizer: dict) -> str:
        """Llama 3's digit-triplet regex -> "llama-bpe"; single digits then byte-level
        (SmolLM, SmolLM2) -> "smollm"."""
        parts = pre_tokenizer_parts(tokenizer)
        kinds = [p.get("type") for p in parts]
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
            return "smollm"
        for p in parts:
            if p.get("type") == "Split" and r"\p{N}{1,3}" in str((p.get("pattern") or {}).get("Regex", "")):
                return "llama-bpe"
        raise SageError(
            f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one sage knows "
            "for llama models (Llama 3's, SmolLM's)"
        )

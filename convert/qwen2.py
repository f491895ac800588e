"""Qwen2ForCausalLM (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen, sage-reasoning-32b).

What differs from the base: the GGUF architecture and the pre-tokenizer. The q/k/v
biases map through gguf-py's table; llama.cpp runs qwen2 with NEOX (rotate-half) rope,
so nothing is permuted.
"""

from __future__ import annotations

import gguf

from sage.convert.base import Converter, register


@register("Qwen2ForCausalLM")
class Qwen2Converter(Converter):
    gguf_arch = gguf.MODEL_ARCH.QWEN2
    model_type = "qwen2"
    tokenizer_pre = "qwen2"

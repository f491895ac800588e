"""Qwen3ForCausalLM (dense Qwen3): Qwen2's tokenizer, its own GGUF architecture (the
per-head q/k norms map through gguf-py's table), an explicit head_dim (written as the
key/value length by the base)."""

from __future__ import annotations

import gguf

from sage.convert.base import register
from sage.convert.qwen2 import Qwen2Converter


@register("Qwen3ForCausalLM")
class Qwen3Converter(Qwen2Converter):
    gguf_arch = gguf.MODEL_ARCH.QWEN3
    model_type = "qwen3"

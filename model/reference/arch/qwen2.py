"""Qwen2 (and Qwen2.5, DeepSeek-R1-Distill-Qwen, sage-reasoning-32b): llama with biases on
the q/k/v projections (not on o_proj). Everything else is llama's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sage.reference.arch import llama
from sage.errors import SageError


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "qwen2"
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from an HF `config.json` dict."""
        # Qwen2's optional sliding window is off in every released checkpoint, and
        # llama.cpp ignores it; refuse rather than silently attend past the window.
        if config.get("use_sliding_window"):
            raise SageError("qwen2 checkpoints with use_sliding_window=true are not supported")
        return super().from_dict(config)


class Attention(llama.Attention):
    @staticmethod
    def biases(args: llama.ModelArgs) -> tuple[bool, bool]:
        return True, False


class TransformerBlock(llama.TransformerBlock):
    attention_cls = Attention


class Qwen2Model(llama.LlamaModel):
    block_cls = TransformerBlock


class Model(llama.Model):
    backbone_cls = Qwen2Model

    def sanitize_gguf(self, weights):
        """Nothing to undo: llama.cpp runs qwen2 with NEOX (rotate-half) rope, unpermuted."""
        return weights

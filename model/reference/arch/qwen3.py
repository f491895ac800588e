"""Qwen3 (dense): llama with a per-head RMSNorm on queries and keys before rope, an
explicit head_dim (not hidden/heads), and no biases."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sage.reference.arch import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "qwen3"
    rms_norm_eps: float = 1e-6


class Attention(llama.Attention):
    def __init__(self, args: llama.ModelArgs):
        super().__init__(args)
        self.q_norm = llama.RMSNorm(args.head_dim, args.rms_norm_eps)
        self.k_norm = llama.RMSNorm(args.head_dim, args.rms_norm_eps)

    def qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)  # over hs, per head: (B, nh, T, hs)


class TransformerBlock(llama.TransformerBlock):
    attention_cls = Attention


class Qwen3Model(llama.LlamaModel):
    block_cls = TransformerBlock


class Model(llama.Model):
    backbone_cls = Qwen3Model

    def sanitize_gguf(self, weights):
        """Nothing to undo: llama.cpp runs qwen3 with NEOX (rotate-half) rope, unpermuted."""
        return weights

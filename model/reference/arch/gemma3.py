"""Gemma 3 (text): llama's skeleton with Gemma's changes.

- embeddings scaled by sqrt(hidden_size); RMSNorm multiplies by (1 + weight);
- four norms per block: before and after attention, before and after the MLP;
- per-head RMSNorm on q and k, attention scaled by query_pre_attn_scalar**-0.5;
- most layers attend through a sliding window with a local rope base; every
  `sliding_window_pattern`-th layer is global with the (possibly scaled) global base;
- gelu-tanh gated MLP, optional final logit soft-capping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sage.reference.arch import llama
from sage.errors import SageError


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "gemma3"
    head_dim: int | None = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True
    # None: head_dim, which is what llama.cpp assumes for every size but 27B
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = 4096
    sliding_window_pattern: int = 6
    layer_types: list[str] | None = None
    rope_local_base_freq: float = 10_000.0
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = self.head_dim
        if self.attn_logit_softcapping is not None:
            raise SageError("gemma3 with attn_logit_softcapping is not supported (Gemma 2 style)")
        if self.layer_types is None:
            # HF and llama.cpp: layer i is global when (i + 1) is a multiple of the pattern
            n = self.sliding_window_pattern
            self.layer_types = [
                "sliding_attention" if self.sliding_window and n and (i + 1) % n else "full_attention"
                for i in range(self.num_hidden_layers)
            ]

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from an HF `config.json` dict (gemma3_text, or gemma3 with a text_config)."""
        config = {**config, **config.get("text_config", {})}
        rope = config.get("rope_parameters") or {}
        # transformers 5 keeps one rope dict per attention kind
        if "full_attention" in rope:
            full = rope["full_attention"]
            config.setdefault("rope_theta", full.get("rope_theta"))
            if full.get("rope_type", "default") != "default":
                config.setdefault("rope_scaling", full)
        if "sliding_attention" in rope:
            config.setdefault("rope_local_base_freq", rope["sliding_attention"].get("rope_theta"))
        config["model_type"] = "gemma3"
        return super().from_dict(config)


class RMSNorm(llama.RMSNorm):
    """Gemma's RMSNorm: weights stored as an offset from 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.to(h.dtype))).to(x.dtype)


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__(args)
        self.scale = args.query_pre_attn_scalar**-0.5
        self.is_sliding = args.layer_types[layer_idx] == "sliding_attention"
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)

    def qk_norm(self, q, k):
        return self.q_norm(q), self.k_norm(k)  # over hs, per head: (B, nh, T, hs)


class MLP(llama.MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args)
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps)
        self.post_feedforward_layernorm = RMSNorm(dim, eps)

    def forward(self, x, cos, sin, mask, past=None):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        h = x + self.post_attention_layernorm(a)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))), kv


class Gemma3Model(llama.LlamaModel):
    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = llama.RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling)
        # rope scaling (e.g. linear x8 on 4B+) applies to the global layers only
        self.rotary_emb_local = llama.RotaryEmbedding(args.head_dim, args.rope_local_base_freq)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # the scale is rounded to the weights' dtype first, as HF does
        scale = torch.tensor(math.sqrt(self.args.hidden_size), dtype=self.embed_tokens.weight.dtype)
        return self.embed_tokens(input_ids) * scale

    def forward(self, h: torch.Tensor, cache: llama.Cache | None = None):
        T, offset = h.shape[1], llama.cache_offset(cache)
        positions = torch.arange(offset, offset + T, device=h.device)
        ropes = {False: self.rotary_emb(positions), True: self.rotary_emb_local(positions)}
        # the cache keeps every position; the window is applied by the mask alone
        masks = {
            False: llama.causal_mask(T, offset, device=h.device),
            True: llama.causal_mask(T, offset, self.args.sliding_window, device=h.device),
        }
        hidden = [h]
        for i, layer in enumerate(self.layers):
            local = layer.self_attn.is_sliding
            h, kv = layer(h, *ropes[local], masks[local], cache[i] if cache is not None else None)
            if cache is not None:
                cache[i] = kv
            hidden.append(h)
        return self.norm(h), hidden


class Model(llama.Model):
    backbone_cls = Gemma3Model

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = super().lm_logits(h)
        if cap := self.args.final_logit_softcapping:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def sanitize(self, weights):
        """Also accept the multimodal Gemma3ForConditionalGeneration layout: keep the
        language model, drop the vision tower and projector."""
        drop = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
        # older and newer transformers nest the language model differently
        renames = (
            ("language_model.model.", "model."),
            ("model.language_model.", "model."),
            ("language_model.lm_head.", "lm_head."),
        )
        out = {}
        for k, v in weights.items():
            if k.startswith(drop):
                continue
            for prefix, repl in renames:
                if k.startswith(prefix):
                    k = repl + k[len(prefix) :]
                    break
            out[k] = v
        return super().sanitize(out)

    def sanitize_gguf(self, weights):
        """llama.cpp's converter stores Gemma norms as (1 + w); store them as w again.
        No rope permutation to undo: gemma3 runs with NEOX (rotate-half) rope."""
        return {k: (v - 1.0 if k.endswith("norm.weight") else v) for k, v in weights.items()}

"""Llama in torch: the reference that variants (qwen2, qwen3, gemma3) import and adapt.

Attribute names copy the Hugging Face checkpoint keys (`model.layers.0.self_attn.q_proj`),
so loading a checkpoint is a rename-free `load_state_dict`. Everything runs in the dtype
of the weights (float32 by default): this model exists for exact gradients and for
checking conversions, not for speed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sage.errors import SageError

# One (k, v) pair per layer, each (B, n_kv_heads, T_past, head_dim); None before the first call.
Cache = list


@dataclass
class ModelArgs:
    model_type: str = "llama"
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from an HF `config.json` dict; unknown keys are ignored."""
        config = flatten_config(config)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names and v is not None})


def flatten_config(config: dict[str, Any]) -> dict[str, Any]:
    """Lift `text_config` (multimodal wrappers) and transformers-5 `rope_parameters` into
    the flat `rope_theta` / `rope_scaling` form every ModelArgs reads."""
    config = {**config, **config.get("text_config", {})}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", rope)
    return config


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalize in float32 at least, whatever the weights' dtype, as HF and llama.cpp do
        # (float64 stays float64: finite-difference checks of gradients need it)
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(dim: int, base: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies (dim/2,) of rotary embeddings, with linear or llama3 scaling."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled)
    raise SageError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. Computed per call, not stored as buffers, so a
    model built on the meta device (no init cost) needs nothing recomputed after loading."""

    def __init__(self, dim: int, base: float, scaling: dict | None = None):
        super().__init__()
        self.dim, self.base, self.scaling = dim, base, scaling
        # llama.cpp GGUFs of llama3-scaled models carry the per-frequency divisors as a tensor
        self.freq_factors: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = rope_inv_freq(self.dim, self.base, self.scaling).to(positions.device)
        if self.freq_factors is not None:
            inv = inv / self.freq_factors.to(inv)
        freqs = positions.float()[:, None] * inv[None, :]  # (T, hs/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, hs): HF's rotate_half layout
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) by position; cos/sin are (T, hs)."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def causal_mask(T: int, offset: int, window: int | None = None, device=None) -> torch.Tensor:
    """(T, offset+T) bool, True where query offset+i may attend key j (j <= offset+i and,
    with a sliding window, offset+i - j < window)."""
    q = torch.arange(offset, offset + T, device=device)[:, None]
    k = torch.arange(offset + T, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= (q - k) < window
    return mask


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.scale = self.head_dim**-0.5
        qkv_bias, o_bias = self.biases(args)
        dim, hs = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(dim, self.n_heads * hs, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hs, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hs, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hs, dim, bias=o_bias)
        # set by Model.forward(output_attentions=...): compute the probabilities explicitly
        # (SDPA does not return them) and keep the last call's in `probs` (B, nh, T, T_past+T)
        self.keep_probs = False
        self.probs: torch.Tensor | None = None

    @staticmethod
    def biases(args: ModelArgs) -> tuple[bool, bool]:
        """(q/k/v bias, o bias): llama's `attention_bias` covers all four projections."""
        return args.attention_bias, args.attention_bias

    def qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook for variants that normalize q and k per head before rope (qwen3, gemma3)."""
        return q, k

    def forward(self, x, cos, sin, mask, past=None):
        """x (B, T, C) -> (out (B, T, C), (k, v) including `past`, for the cache)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = self.qk_norm(q, k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nkv, T_past+T, hs)
            v = torch.cat([past[1], v], dim=2)
        # query head h reads kv head h // (nh / nkv), as HF's repeat_kv and llama.cpp do
        if self.keep_probs:
            group = self.n_heads // self.n_kv_heads
            kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, nh, Tk, hs)
            scores = (q @ kr.transpose(-2, -1)) * self.scale  # (B, nh, T, Tk)
            self.probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = self.probs @ vr  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class TransformerBlock(nn.Module):
    attention_cls = Attention

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = self.attention_cls(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past=None):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv


class LlamaModel(nn.Module):
    """The backbone (HF's `model.` prefix): embeddings, blocks, final norm."""

    block_cls = TransformerBlock

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(self.block_cls(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> the residual stream entering layer 0 (B, T, C)."""
        return self.embed_tokens(input_ids)

    def forward(self, h: torch.Tensor, cache: Cache | None = None):
        """h (B, T, C) entering layer 0 -> (final-normed (B, T, C), residual stream per layer)."""
        T, offset = h.shape[1], cache_offset(cache)
        cos, sin = self.rotary_emb(torch.arange(offset, offset + T, device=h.device))
        mask = causal_mask(T, offset, device=h.device)
        hidden = [h]
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, cos, sin, mask, cache[i] if cache is not None else None)
            if cache is not None:
                cache[i] = kv
            hidden.append(h)
        return self.norm(h), hidden


def cache_offset(cache: Cache | None) -> int:
    """Number of positions already in the cache."""
    return 0 if not cache or cache[0] is None else cache[0][0].shape[2]


class Model(nn.Module):
    backbone_cls = LlamaModel

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = self.backbone_cls(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def make_cache(self) -> Cache:
        """An empty KV cache for incremental decoding: pass it to every forward call."""
        return [None] * len(self.layers)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The residual stream entering layer 0, (B, T, C): detach it, require grad, and
        pass it back as `inputs_embeds` to differentiate with respect to token inputs."""
        return self.model.embed(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_hidden_states: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | Sequence[int] = False,
    ):
        """Logits (B, T, V) for `input_ids` (B, T), or for `inputs_embeds` (B, T, C) as
        returned by `embed`. With `cache` (from `make_cache`) positions continue after what
        it holds, and it is extended in place. With `output_hidden_states`, returns
        (logits, hidden) where hidden[0] enters layer 0 and hidden[i + 1] is the residual
        stream after layer i (before the final norm); all are in the autograd graph, so
        `torch.autograd.grad(loss, hidden[i])` gives per-token gradients.

        `output_attentions` (True: every layer; or the layer indices wanted) appends a
        list with one (B, nh, T, T_past+T) tensor of attention probabilities per layer
        (None for layers not asked for) to what is returned. Those layers compute
        attention explicitly instead of through SDPA: same function, slower."""
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        n = len(self.layers)
        wanted = set(range(n)) if output_attentions is True else set(output_attentions or ())
        for i, layer in enumerate(self.layers):
            layer.self_attn.keep_probs = i in wanted
        try:
            out, hidden = self.model(h, cache)
            attentions = [self.layers[i].self_attn.probs if i in wanted else None for i in range(n)]
        finally:
            for layer in self.layers:
                layer.self_attn.keep_probs, layer.self_attn.probs = False, None
        logits = self.lm_logits(out)  # (B, T, V)
        asked = output_attentions is not False and output_attentions is not None
        extra = ((hidden,) if output_hidden_states else ()) + ((attentions,) if asked else ())
        return (logits, *extra) if extra else logits

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.args.tie_word_embeddings:
            return F.linear(h, self.model.embed_tokens.weight)
        return self.lm_head(h)

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF checkpoint tensors -> this model's state dict: drop what is recomputed
        (rotary tables) or shared (a tied lm_head some checkpoints still store)."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

    def sanitize_gguf(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Undo llama.cpp's converter: it permutes attn_q/attn_k rows so that ggml's
        interleaved-pair rope matches HF's rotate_half; we rotate halves, so permute back."""
        n_heads, n_kv = self.args.num_attention_heads, self.args.num_key_value_heads
        for k in list(weights):
            if k.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                weights[k] = unpermute(weights[k], n_heads)
            elif k.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                weights[k] = unpermute(weights[k], n_kv)
        return weights


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute on (n_head * hs, ...) rows."""
    # converter: rows (n_head, 2, hs/2) -> (n_head, hs/2, 2); so read (n_head, hs/2, 2) back
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

"""Verification of a conversion: next-token distributions of the GGUF in llama.cpp
against the torch reference on the source weights, teacher-forced over fixed texts.

The reference runs layer by layer, each layer's weights read from the safetensors files
just before it runs and dropped after, so verifying a 32B checkpoint needs one layer in
float32, not the whole model (sage.reference.arch.load_hf would hold all of it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from sage.reference.arch.llama import LlamaModel, causal_mask
from sage.reference.arch.parity import compare_logits
from sage.errors import SageError

# the probes, each teacher-forced from its first token (58 + 95 + 46 + 59 = 258 positions
# with SmolLM2's tokenizer): plain prose, step-by-step arithmetic, an explanation, code.
# One 58-token text alone moves top-1 in steps of 1.7 %, coarser than the margins below.
PROBE_TEXTS = (
    "The old lighthouse keeper climbed the narrow stairs every evening to light the lamp. "
    "Ships passing through the rocky channel depended on its steady beam, and in forty years "
    "he had never missed a single night, not even during the worst winter storms. "
    "When he retired, the town gave him a bell.",
    "Question: A farmer has 17 sheep and buys 5 more, then sells 8. How many sheep does the "
    "farmer have now? Let's think step by step. First, the farmer starts with 17 sheep. After "
    "buying 5 more, he has 17 + 5 = 22 sheep. Then he sells 8, so he has 22 - 8 = 14 sheep. "
    "The answer is 14.",
    "Water boils at a lower temperature on a mountain because the air pressure is lower there. "
    "The molecules need less energy to escape into the air, so cooking pasta takes longer at "
    "high altitude, even though the water looks just as hot.",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\nprint(fibonacci(10))\n",
)

# top-1 agreement a conversion must reach: F16/Q8_0 from the design; Q4 = what llama.cpp's own
# converter + quantizer reach on the SmolLM2 round trip over these probes, minus 2 points
# (measured with scripts/bench_convert.py: Q4_K_M 0.872 -> 0.852 would be stricter than the
# design's 0.842, which is kept; Q4_0 0.733 -> 0.713: the design's 0.828 came from another text)
THRESHOLDS = {"F16": 0.99, "Q8_0": 0.97, "Q4_K_M": 0.842, "Q4_0": 0.713}


@dataclass
class Verification:
    qtype: str
    n_tokens: int  # positions compared
    top1: float  # share of positions where both predict the same next token
    kl_mean: float  # mean KL(torch || llama.cpp), nats
    kl_max: float
    threshold: float  # top-1 needed
    # top-1 over the positions where the torch reference leads by a clear margin: near-ties
    # flip with the CPU's instruction set (sage.reference.arch.parity), these do not
    n_clear: int = 0
    top1_clear: float = float("nan")

    @property
    def passed(self) -> bool:
        return self.top1 >= self.threshold

    def to_dict(self) -> dict:
        d = dict(asdict(self), passed=self.passed)
        if self.n_clear == 0:
            d["top1_clear"] = None  # undefined; JSON has no NaN
        return d


def llama_logits(engine, tokens: list[int]) -> np.ndarray:
    """(T, V) logits of every position, one llama_decode of the whole sequence."""
    engine.reset()
    engine.decode_batch([(t, i, 0) for i, t in enumerate(tokens)])
    return np.stack([engine.logits(i).copy() for i in range(len(tokens))])


def reference_logits(converter, sequences: list[list[int]]) -> list[torch.Tensor]:
    """(T, V) float32 logits of the torch reference on the source weights for each token
    sequence; weights streamed one layer at a time through the converter's meta-device
    model, each layer read once for all sequences."""
    model = converter.reference
    if type(model.model).forward is not LlamaModel.forward:
        raise SageError(f"layer-streamed verification does not know the {model.model_type} backbone")
    ckpt = converter.checkpoint

    def load(module: torch.nn.Module, prefix: str) -> None:
        weights = {k: ckpt.read(prefix + k).float() for k in module.state_dict()}
        module.load_state_dict(weights, strict=True, assign=True)

    backbone = model.model
    try:
        with torch.no_grad():
            load(backbone.embed_tokens, "model.embed_tokens.")
            hs = [model.embed(torch.tensor([tokens])) for tokens in sequences]  # each (1, T, C)
            # what LlamaModel.forward does, one layer at a time
            ropes = [backbone.rotary_emb(torch.arange(len(t))) for t in sequences]
            masks = [causal_mask(len(t), 0) for t in sequences]
            for i, layer in enumerate(backbone.layers):
                load(layer, f"model.layers.{i}.")
                hs = [layer(h, cos, sin, mask)[0] for h, (cos, sin), mask in zip(hs, ropes, masks)]
                layer.to("meta")
            load(backbone.norm, "model.norm.")
            if not model.args.tie_word_embeddings:
                backbone.embed_tokens.to("meta")
                load(model.lm_head, "lm_head.")
            return [model.lm_logits(backbone.norm(h))[0] for h in hs]  # each (T, V)
    finally:
        model.to("meta")


def compare(reference: torch.Tensor, llama: np.ndarray, qtype: str) -> Verification:
    """Top-1 agreement and KL over the rows of (T, V) logits from both sides."""
    if tuple(reference.shape) != llama.shape:
        raise SageError(f"verification: torch gives {tuple(reference.shape)} logits, llama.cpp {llama.shape}")
    a = compare_logits(reference, llama)
    return Verification(qtype, a.n, a.top1, a.kl_mean, a.kl_max, THRESHOLDS[qtype], a.n_clear, a.top1_clear)


def verify(converter, engine, qtype: str, texts: tuple[str, ...] = PROBE_TEXTS) -> Verification:
    """Teacher-forced comparison over each of `texts`, tokenized by the converted model;
    the positions of all texts pooled."""
    sequences = [engine.tokenize(text) for text in texts]
    if max(map(len, sequences)) >= engine.n_ctx:
        raise SageError(f"verification: a probe is longer than the context of {engine.n_ctx} tokens")
    ours = np.concatenate([llama_logits(engine, tokens) for tokens in sequences])
    return compare(torch.cat(reference_logits(converter, sequences)), ours, qtype)

"""How closely two sets of next-token logits agree, in measures that hold on any CPU.

llama.cpp builds its CPU kernels with the host's native instructions (AVX2, AVX-512,
NEON) and rounds activations to 8 bits for quantized dot products, so the same GGUF gives
logits that differ by a few hundredths between machines. Where the top two logits are
nearly tied, that flips the argmax: plain top-1 agreement is then a property of the
machine. So the measures here are the mean KL divergence (smooth in those differences)
and top-1 agreement over the positions where the reference's top-1 leads by at least
`margin` nats ("clear" positions; the near-ties are excluded and counted).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# a lead of 0.5 nats is ~5x the mean logit difference llama.cpp's Q4/Q8 rounding makes on
# the embedded model (0.09), and every top-1 flip seen there was at a lead below 0.13
CLEAR_MARGIN = 0.5


@dataclass(frozen=True)
class Agreement:
    n: int  # positions compared
    top1: float  # share of all positions with the same argmax (near-ties included)
    n_clear: int  # positions whose reference top-1 leads by >= margin
    top1_clear: float  # share of those with the same argmax (nan if there are none)
    kl_mean: float  # mean KL(reference || other), nats
    kl_max: float
    margin: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"top-1 {self.top1:.4f} over {self.n} positions, {self.top1_clear:.4f} over the "
            f"{self.n_clear} whose lead is >= {self.margin} nats; mean KL {self.kl_mean:.5f} "
            f"(max {self.kl_max:.4f})"
        )


def compare_logits(reference, other, margin: float = CLEAR_MARGIN) -> Agreement:
    """Agreement of (T, V) logits `other` with `reference` (tensors or arrays), row by row."""
    ref = torch.as_tensor(reference).double()
    oth = torch.as_tensor(other).double()
    if ref.shape != oth.shape or ref.ndim != 2:
        raise ValueError(f"logits of shapes {tuple(ref.shape)} and {tuple(oth.shape)} cannot be compared")
    same = ref.argmax(-1) == oth.argmax(-1)  # (T,)
    top2 = ref.topk(2, dim=-1).values  # (T, 2)
    clear = (top2[:, 0] - top2[:, 1]) >= margin  # (T,)
    log_p, log_q = ref.log_softmax(-1), oth.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (T,)
    n_clear = int(clear.sum())
    return Agreement(
        n=len(ref),
        top1=same.double().mean().item(),
        n_clear=n_clear,
        top1_clear=same[clear].double().mean().item() if n_clear else float("nan"),
        kl_mean=kl.mean().item(),
        kl_max=kl.max().item(),
        margin=margin,
    )

"""Settings of the inverse analysis, shared by its stages."""

from __future__ import annotations

from dataclasses import dataclass

PROXY = "attention-weighted value norm (tracked heads) in place of |grad_h L|"
CONSISTENCY_TARGET = 0.8


@dataclass
class AnalysisConfig:
    threshold: float = 0.3  # the paper's decision threshold on normalized significance
    # trained heads: the least decision score of a candidate token (None: the
    # sidecar's own, chosen when it was trained); analytic heads use `threshold`
    score_threshold: float | None = None
    max_decisions: int = 3
    alternatives: int = 2  # rollouts per decision point (<= 5)
    min_alt_prob: float = 0.01  # alternatives below this are listed, never rolled out
    rollout_tokens: int | None = None  # per branch; default: 2x the rest of the chain + 32
    # instead: every branch ends where the chain's own token cap would (the chain's
    # max_tokens), so a branch is never judged on tokens its chain did not get
    rollout_total: int | None = None
    batch_rollouts: bool = False  # one llama_decode for all branches of a decision (faster, not bit-exact)

    def n_seq_max(self) -> int:
        """KV sequences an engine needs for this analysis: the chain, and the branches of
        one decision point (decision points are rolled out one after another)."""
        return 1 + max(0, self.alternatives)


def plausible_alternatives(tok, min_prob: float) -> list:
    """The candidate rule's second half: the token's top alternatives other than itself,
    or [] when the strongest is below min_prob (nothing else was plausible: not a choice)."""
    alts = [a for a in tok.top if a.id != tok.id]
    return alts if alts and alts[0].prob >= min_prob else []


def is_choice(tok, min_prob: float) -> bool:
    """A generated token that could have gone another way: visible text, and a plausible
    alternative."""
    return bool(tok.text.strip()) and bool(plausible_alternatives(tok, min_prob))

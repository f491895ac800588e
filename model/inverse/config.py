"""Settings of the inverse analysis, shared by its stages."""

from __future__ import annotations

from dataclasses import dataclass, field

from sage.inverse.sampler import SamplingSettings

PROXY = "attention-weighted value norm (tracked heads) in place of |grad_h L|"
CONSISTENCY_TARGET = 0.8
DEFAULT_BUDGET = 6000  # sampled tokens per `sage ask`; see README (about a minute on 2 cores)


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
    # "sampled": outcome distributions (sage.inverse.forks); "greedy": one greedy rollout
    # per alternative at the top-threshold tokens (schema 2; identity tests, bench_ask)
    method: str = "sampled"
    # --- sampled outcome distributions (sage.inverse.forks) ---
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    budget: int | None = None  # sampled tokens (None: DEFAULT_BUDGET; 0: no sampling)
    samples: int = 16  # most samples per distribution
    round_size: int = 4  # samples per round of the stopping rule
    start_samples: int = 8  # the first round of the distribution from the prompt alone
    parallel: int = 16  # sequences decoded together
    coarse_share: float = 0.5  # of the budget for the start and step distributions
    anchors: int = 2  # most anchor steps searched for forks
    anchor_min: float = 0.2  # least movement (total variation) of an anchor step
    per_anchor: int = 2  # candidates per anchor step from the heads (+ the most uncertain token)
    fork_threshold: float = 0.3  # fork score from which a candidate is a decision point
    alpha: float = 0.1  # a movement or fork counts only if chance alone gives it less often (permutation p)

    def budget_tokens(self) -> int:
        return DEFAULT_BUDGET if self.budget is None else max(0, self.budget)

    def n_seq_max(self) -> int:
        """KV sequences an engine needs for this analysis: the chain, and the samples
        decoded together (or the branches of one greedy rollout)."""
        return 1 + max(self.alternatives, self.parallel if self.budget_tokens() > 0 else 0, 0)


def plausible_alternatives(tok, min_prob: float) -> list:
    """The candidate rule's second half: the token's top alternatives other than itself,
    or [] when the strongest is below min_prob (nothing else was plausible: not a choice)."""
    alts = [a for a in tok.top if a.id != tok.id]
    return alts if alts and alts[0].prob >= min_prob else []


def is_choice(tok, min_prob: float) -> bool:
    """A generated token that could have gone another way: visible text, and a plausible
    alternative."""
    return bool(tok.text.strip()) and bool(plausible_alternatives(tok, min_prob))

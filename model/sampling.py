"""The one token sampler and the one stop-string matcher, used by the chain's generation
(sage.engine) and by the branches of the inverse analysis (sage.inverse.rollout)."""

from __future__ import annotations

import numpy as np


def pick_token(logits: np.ndarray, greedy_id: int, temperature: float, rng: np.random.Generator) -> int:
    """The next token: `greedy_id` (the first index of the maximum, as llama.cpp's greedy
    sampler) at temperature <= 0, else a draw from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(greedy_id)
    z = (logits.astype(np.float64) - float(logits.max())) / temperature
    p = np.exp(z)
    p /= p.sum()
    return int(rng.choice(len(logits), p=p))


class StopMatcher:
    """Finds the stop strings (e.g. a base model's next "\\nQuestion:") in growing text."""

    TAIL = 64  # a stop string is looked for where the newest piece could have completed it

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def hit(self, text: str) -> bool:
        """Whether a stop string ends within the text's last TAIL characters."""
        tail = text[-self.TAIL :]
        return any(s in tail for s in self.stops)

    def cut(self, text: str) -> str:
        """The text before its first stop string (unchanged if there is none)."""
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[: min(found)] if found else text

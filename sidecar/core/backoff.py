"""Jittered exponential backoff, as a value that computes delays (the caller does the waiting).

"Equal" jitter (a uniform draw between half the exponential bound and the bound) spreads the retries
of many sidecars that lost the same API server at the same moment, instead of having them return in
waves, while never retrying sooner than half the bound (full jitter may retry almost at once).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Owns the attempt count of one retry loop (a reflector, a publisher, a client's reconnects)."""

    initial: float = 0.2
    maximum: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random, repr=False)
    attempts: int = 0

    def next_delay(self) -> float:
        try:
            bound = min(self.maximum, self.initial * self.factor**self.attempts)
        except OverflowError:  # factor**attempts leaves the float range after ~1000 attempts
            bound = self.maximum
        self.attempts += 1
        return self.rng.uniform(bound / 2, bound)

    def reset(self) -> None:
        self.attempts = 0

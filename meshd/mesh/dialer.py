"""When to dial whom: jittered exponential backoff per target, reset on success."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    attempts: dict[object, int] = field(default_factory=dict)
    not_before: dict[object, float] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)

    def ready(self, target: object, now: float) -> bool:
        return now >= self.not_before.get(target, 0.0)

    def failed(self, target: object, now: float, floor_s: float = 0.0) -> float:
        attempt = self.attempts.get(target, 0) + 1
        self.attempts[target] = attempt
        delay = min(self.max_s, self.initial_s * 2 ** (attempt - 1))
        delay = max(floor_s, delay * self.rng.uniform(0.5, 1.0))  # jitter: peers do not dial in lockstep
        self.not_before[target] = now + delay
        return delay

    def succeeded(self, target: object) -> None:
        self.attempts.pop(target, None)
        self.not_before.pop(target, None)

    def reset(self, target: object) -> None:
        self.succeeded(target)


__all__ = ["Backoff"]

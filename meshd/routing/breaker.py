"""Circuit breakers: a peer that keeps failing is left alone for a cool-down, then probed."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _State:
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False


@dataclass
class CircuitBreakers:
    threshold: int = 3  # consecutive failures that open the circuit
    cooldown_s: float = 30.0
    _states: dict[str, _State] = field(default_factory=dict)

    def allows(self, target: str, now: float) -> bool:
        state = self._states.get(target)
        if state is None or state.failures < self.threshold:
            return True
        if now < state.open_until or state.probing:
            return False
        state.probing = True  # half-open: exactly one request goes through
        return True

    def state(self, target: str, now: float) -> str:
        state = self._states.get(target)
        if state is None or state.failures < self.threshold:
            return "closed"
        return "open" if now < state.open_until else "half-open"

    def success(self, target: str) -> None:
        self._states.pop(target, None)

    def failure(self, target: str, now: float) -> None:
        state = self._states.setdefault(target, _State())
        state.failures += 1
        state.probing = False
        if state.failures >= self.threshold:
            state.open_until = now + self.cooldown_s


__all__ = ["CircuitBreakers"]

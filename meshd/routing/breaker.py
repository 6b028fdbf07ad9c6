"""Circuit breakers: a peer that keeps failing is left alone for a cool-down, then probed.

States per target (a peer's node id):

* **closed** — fewer than ``threshold`` consecutive failures: the peer is a candidate.
* **open** — ``threshold`` consecutive failures, within ``cooldown_s`` of the last one: excluded.
* **half-open** — the cool-down is over: the peer is a candidate again, but only one request
  at a time may probe it. The probe starts when a stream is actually opened to the peer
  (:meth:`CircuitBreakers.begin`), not when the router looks at it, so a preview
  (``meshctl route``) or a decision that picks another node never takes the probe slot.
  The probe ends with :meth:`success`, :meth:`failure` or :meth:`release` (the attempt ended
  without telling anything about the peer's health, e.g. the client went away). A probe that
  is never ended (a bug, a lost task) expires after ``probe_timeout_s``.

:meth:`allows` and :meth:`state` never change anything. Besides the consecutive count that
drives the circuit, the breakers remember failure times for ``window_s`` so that scoring can
penalise a peer with *recent* failures even while its circuit is closed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class _State:
    failures: int = 0  # consecutive, reset by a success
    open_until: float = 0.0
    probe_started: float | None = None  # monotonic time the half-open probe began
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=64))  # failure times


@dataclass
class CircuitBreakers:
    threshold: int = 3  # consecutive failures that open the circuit
    cooldown_s: float = 30.0
    probe_timeout_s: float = 120.0  # an unfinished half-open probe stops blocking others after this
    window_s: float = 300.0  # failures younger than this count as "recent" for scoring
    _states: dict[str, _State] = field(default_factory=dict)

    def _probing(self, state: _State, now: float) -> bool:
        return state.probe_started is not None and now - state.probe_started < self.probe_timeout_s

    def state(self, target: str, now: float) -> str:
        """``closed``, ``open``, ``half-open`` or ``probing`` (half-open with a probe in flight)."""
        state = self._states.get(target)
        if state is None or state.failures < self.threshold:
            return "closed"
        if now < state.open_until:
            return "open"
        return "probing" if self._probing(state, now) else "half-open"

    def allows(self, target: str, now: float) -> bool:
        """Whether the target may be a candidate now. Pure: it never takes the probe slot."""
        return self.state(target, now) in ("closed", "half-open")

    def begin(self, target: str, now: float) -> bool:
        """A stream is being opened to ``target``; returns True if this attempt is the half-open probe."""
        state = self._states.get(target)
        if state is None or state.failures < self.threshold or now < state.open_until:
            return False
        state.probe_started = now
        return True

    def success(self, target: str) -> None:
        """The target served a request (or answered it with a well-formed client error)."""
        state = self._states.get(target)
        if state is None:
            return
        state.failures = 0
        state.open_until = 0.0
        state.probe_started = None
        if not state.recent:
            del self._states[target]

    def failure(self, target: str, now: float) -> None:
        state = self._states.setdefault(target, _State())
        state.failures += 1
        state.probe_started = None
        state.recent.append(now)
        if state.failures >= self.threshold:
            state.open_until = now + self.cooldown_s

    def release(self, target: str) -> None:
        """The attempt ended without a verdict on the peer's health: free the probe slot."""
        state = self._states.get(target)
        if state is not None:
            state.probe_started = None

    def recent_failures(self, target: str, now: float) -> int:
        """Failures of ``target`` within the last ``window_s`` (successes do not erase them)."""
        state = self._states.get(target)
        if state is None:
            return 0
        while state.recent and now - state.recent[0] > self.window_s:
            state.recent.popleft()
        count = len(state.recent)
        if not count and state.failures == 0:
            del self._states[target]
        return count

    def snapshot(self, now: float) -> dict[str, dict[str, object]]:
        return {target: {"state": self.state(target, now), "consecutive_failures": s.failures,
                         "recent_failures": sum(1 for t in s.recent if now - t <= self.window_s)}
                for target, s in self._states.items()}


__all__ = ["CircuitBreakers"]

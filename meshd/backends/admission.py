"""Bounded admission for backends: refuse at call time, count queued and in-flight work.

``generate`` admits (or raises ``QueueFull``) before returning its iterator;
the ``AdmittedStream`` it returns owns the request's ticket, so the counters
are released however the iterator ends — exhausted, failed, cancelled, or
closed before its first ``anext`` (when a generator's own ``finally`` would
never run).

``TokenRate`` and ``MeteredStream`` measure the other half of a backend's
load: completion tokens per second over the last minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Literal

from ..errors import QueueFull
from .base import GenerationEvent, GenerationFinished, TextGenerated

TOKEN_RATE_WINDOW_S = 60.0


class Admission:
    """At most ``max_in_flight`` running and ``max_queue`` waiting requests."""

    def __init__(self, max_in_flight: int, max_queue: int, retry_after_s: float) -> None:
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.queued = 0
        self._slots = asyncio.Semaphore(max_in_flight)

    def admit(self, what: str) -> Ticket:
        if self.queued + self.in_flight >= self.max_in_flight + self.max_queue:
            raise QueueFull(
                f"{what} has {self.in_flight} requests running and {self.queued} waiting; retry later",
                retry_after=self.retry_after_s,
            )
        return Ticket(self)

    @contextlib.asynccontextmanager
    async def slot(self, ticket: Ticket) -> AsyncIterator[None]:
        async with self._slots:
            ticket.started()
            yield


class Ticket:
    """One request's place in the counters: queued, then running, then gone."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._state: Literal["queued", "running", "done"] = "queued"
        admission.queued += 1

    def started(self) -> None:
        if self._state == "queued":
            self._admission.queued -= 1
            self._admission.in_flight += 1
            self._state = "running"

    def release(self) -> None:
        if self._state == "queued":
            self._admission.queued -= 1
        elif self._state == "running":
            self._admission.in_flight -= 1
        self._state = "done"


class AdmittedStream:
    """The async iterator ``generate`` returns; releases its ticket when it ends."""

    def __init__(self, inner: AsyncGenerator[GenerationEvent, None], ticket: Ticket) -> None:
        self._inner = inner
        self._ticket = ticket

    def __aiter__(self) -> AdmittedStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        try:
            return await self._inner.__anext__()
        except BaseException:  # StopAsyncIteration, errors, cancellation alike end the request
            self._ticket.release()
            raise

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._ticket.release()


class TokenRate:
    """Completion tokens per second over a sliding window, kept in one-second buckets."""

    def __init__(self, window_s: float = TOKEN_RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._buckets: deque[list[float]] = deque()  # [second, tokens]
        self._total = 0

    def add(self, tokens: int, now: float | None = None) -> None:
        if tokens <= 0:
            return
        second = float(int(self._clock() if now is None else now))
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += tokens
        else:
            self._buckets.append([second, tokens])
        self._total += tokens

    def per_second(self, now: float | None = None) -> float:
        now = self._clock() if now is None else now
        while self._buckets and self._buckets[0][0] <= now - self.window_s:
            self._total -= int(self._buckets.popleft()[1])
        return self._total / self.window_s


class PrefillRate:
    """Prompt tokens prefilled per second, from finished generations (an exponential average).

    ``prefilled / ttft``: the time to the first token is the prefill plus one
    decode step, so this slightly under-states the speed, erring toward moving
    a KV cache rather than recomputing it. Short prompts say little and are skipped.
    """

    def __init__(self, weight: float = 0.3, min_tokens: int = 32) -> None:
        self.weight = weight
        self.min_tokens = min_tokens
        self.value: float | None = None  # None until measured

    def add(self, finished: GenerationFinished) -> None:
        prefilled = finished.prompt_tokens - finished.cached_tokens
        if not finished.ttft_s or finished.ttft_s <= 0 or prefilled < self.min_tokens:
            return
        rate = prefilled / finished.ttft_s
        self.value = rate if self.value is None else self.value + self.weight * (rate - self.value)


class MeteredStream:
    """Counts the completion tokens a generation stream produces into a ``TokenRate``.

    Deltas count their ``token_ids``; a backend whose deltas carry no ids (an
    upstream's chunks) passes ``chunk_is_token``. The final event tops the
    count up to its ``completion_tokens`` (less the ``resumed`` tokens another
    node produced), so the total is exact whenever the backend's usage is.
    """

    def __init__(self, inner: AsyncIterator[GenerationEvent], rate: TokenRate, *, resumed: int = 0,
                 chunk_is_token: bool = False, prefill: PrefillRate | None = None) -> None:
        self._inner = inner
        self._rate = rate
        self._prefill = prefill
        self._resumed = resumed
        self._chunk_is_token = chunk_is_token
        self._counted = 0

    def __aiter__(self) -> MeteredStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        event = await self._inner.__anext__()
        if isinstance(event, TextGenerated):
            tokens = len(event.token_ids) or (1 if self._chunk_is_token and event.text else 0)
        elif isinstance(event, GenerationFinished):
            tokens = event.completion_tokens - self._resumed - self._counted
            if self._prefill is not None and not self._resumed:  # a resume replays, it does not prefill
                self._prefill.add(event)
        else:
            tokens = 0
        if tokens > 0:
            self._counted += tokens
            self._rate.add(tokens)
        return event

    async def aclose(self) -> None:
        close = getattr(self._inner, "aclose", None)
        if close is not None:
            await close()


__all__ = ["Admission", "AdmittedStream", "MeteredStream", "PrefillRate", "Ticket", "TokenRate"]

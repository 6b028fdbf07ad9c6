"""Bounded admission for backends: refuse at call time, count queued and in-flight work.

``generate`` admits (or raises ``QueueFull``) before returning its iterator;
the ``AdmittedStream`` it returns owns the request's ticket, so the counters
are released however the iterator ends — exhausted, failed, cancelled, or
closed before its first ``anext`` (when a generator's own ``finally`` would
never run).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Literal

from ..errors import QueueFull
from .base import GenerationEvent


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


__all__ = ["Admission", "AdmittedStream", "Ticket"]

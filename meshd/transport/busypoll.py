"""Busy polling: keep the event loop turning for a moment after traffic.

A process that sleeps in ``epoll_wait`` between a request and its answer pays
for being woken: the sender's ``sendmsg`` wakes it (on a virtual machine an
inter-processor interrupt to a halted vCPU, tens of microseconds inside the
sender's system call), and the woken process runs its Python code with cold
caches. On the 2-vCPU machine of docs/transport.md that was most of a control
round trip: ~40 µs per wake-up, each side's work ~2x slower cold than warm.

``BusyPoll`` is the event-loop form of Linux's ``SO_BUSY_POLL``: after a
datagram arrives or leaves, the endpoint asks it to keep the loop awake for a
window (``EngineSettings.busy_poll_us``). It does so with a callback that
re-schedules itself with ``call_soon`` until the window has passed, so the
loop polls its sockets without blocking (asyncio and uvloop both poll with a
zero timeout while a callback is ready) and runs every other callback and
timer as usual in between: polling never delays other work, it only stops the
process from sleeping. An answer that arrives inside the window is read at
once, by a warm process, and its sender's ``sendmsg`` has nobody to wake.

The price is CPU: at most one window of one core after each burst of traffic
(a ping, a streamed token, a request); a node without traffic never polls. A
window of 0 turns it off.
"""

from __future__ import annotations

import asyncio

from .timers import clock


class BusyPoll:
    def __init__(self, window_us: int) -> None:
        self.window_s = window_us / 1e6
        self._until = 0.0
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.turns = 0  # loop turns spent polling (tests, diagnostics)

    @property
    def running(self) -> bool:
        return self._running

    def touch(self) -> None:
        """Traffic now: keep the loop awake until one window from now."""
        if not self.window_s:
            return
        self._until = clock() + self.window_s
        if not self._running:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._running = True
            self._loop.call_soon(self._turn)

    def close(self) -> None:
        """For good: the pending turn sees the window over, and later touches do nothing."""
        self.window_s = 0.0
        self._until = 0.0

    def _turn(self) -> None:
        if clock() < self._until:
            self.turns += 1
            self._loop.call_soon(self._turn)  # type: ignore[union-attr]
        else:
            self._running = False


__all__ = ["BusyPoll"]

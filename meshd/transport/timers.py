"""The transport's clock and the one timer per connection, safe on coarse loop clocks.

QUIC deadlines are fine-grained: a pacing or loss deadline is often tens of
microseconds away. Event loops are not: uvloop's clock and timers count whole
milliseconds (libuv) and it rounds a delay to the *nearest* millisecond, so a
deadline less than 0.5 ms away runs at once, before it is due, and any timer
may run up to about a millisecond early; asyncio waits in whole milliseconds.

Glue that then asks the connection "is anything due?" with the wall clock
gets "not yet", is handed the same deadline again, and re-arms it: a timer
storm. aioquic's own asyncio glue does exactly that with uvloop's clock
(``now = loop.time()``), and meshd's first glue did it for half of the
work: it handled QUIC's timer as reached but then asked for datagrams with
the wall clock, so a pacing or acknowledgement deadline that fired early
produced nothing and came straight back (see docs/transport.md for the
measurements: tens of thousands of timer callbacks per few MiB under loss,
~40% of them before their deadline).

The rule here: **a timer that runs has reached its deadline.**
``LinkTimer`` calls back with the deadline, and the connection is given
``EngineClock.now(deadline)`` = max(wall clock, deadline, last time given)
for every call of that round (``handle_timer`` *and* ``datagrams_to_send``),
so whatever was due then happens now, exactly once. Acting up to a
millisecond early is within QUIC's own timer granularity (RFC 9002
kGranularity = 1 ms), and ``EngineClock`` keeps a connection's time
monotonic, so a later call never goes back before a deadline already given.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

# The coarsest loop timer granularity (libuv counts milliseconds).
LOOP_TICK_S = 0.001
# A timer that runs less than this before its deadline has reached it; one that
# runs earlier is armed again. Half a tick: uvloop runs a 1 ms timer anywhere
# from ~0 to 1 ms after it was armed (its clock counts whole milliseconds), so
# with a whole tick nearly every one ran early, and qh3's 1 ms delayed-ACK
# timer then sent a lone ACK that the next message would have carried, waking
# the peer once more per several round trips. A delay above half a tick is
# rounded to at least one whole tick, so the new handle waits for the clock
# to move on: at most one or two more runs per deadline, never a storm.
EARLY_RUN_S = LOOP_TICK_S / 2


def clock() -> float:
    """The transport's clock: CLOCK_MONOTONIC, nanosecond resolution, never the loop's.

    ``loop.time()`` is the same clock for asyncio but whole milliseconds
    under uvloop, too coarse to measure loopback round trips or to pace.
    """
    return time.monotonic()


def timer_delay(deadline: float, now: float) -> float:
    """The delay to arm for ``deadline``; the loop may round it (uvloop: to the nearest ms)."""
    return max(0.0, deadline - now)


class EngineClock:
    """Monotonic time for one connection: never behind a time it was already given."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = 0.0

    def now(self, at_least: float = 0.0) -> float:
        value = max(clock(), at_least, self._last)
        self._last = value
        return value


class LinkTimer:
    """One timer on the running loop; ``callback(deadline)`` runs once the deadline is reached.

    Re-arming is lazy: a connection's deadline moves on nearly every packet,
    mostly a little later (idle and loss timers), and cancelling and
    creating a loop timer each time costs more than the packet. A handle
    armed up to a tick before the deadline is kept; when it runs and the
    deadline has moved on by more than half a tick, it is re-armed for the new
    one instead of calling back. A deadline earlier than the armed one, or
    more than a tick later, re-arms at once: the latter is a short timer that
    went away (qh3's delayed ACK, sent with the next message), and keeping
    its handle would wake an otherwise idle process only to re-arm it, which
    costs far more than re-arming now (a wake-up per few round trips in a
    ping/pong, on each side).
    """

    __slots__ = ("_loop", "_callback", "_handle", "_armed_at", "deadline", "fired", "armed")

    def __init__(self, callback: Callable[[float], None], loop: Any = None) -> None:
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._callback = callback
        self._handle: Any = None
        self._armed_at = 0.0
        self.deadline: float | None = None
        self.fired = 0  # callbacks run (each handled a reached deadline)
        self.armed = 0  # loop timers created

    def arm(self, deadline: float | None) -> None:
        self.deadline = deadline
        if deadline is None or (self._handle is not None
                                and self._armed_at <= deadline <= self._armed_at + LOOP_TICK_S):
            return  # nothing to wait for, or the armed handle runs about then and re-arms
        if self._handle is not None:
            self._handle.cancel()
        self._start(deadline, clock())

    def cancel(self) -> None:
        self.deadline = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _start(self, deadline: float, now: float) -> None:
        self._armed_at = deadline
        self.armed += 1
        self._handle = self._loop.call_later(timer_delay(deadline, now), self._run)

    def _run(self) -> None:
        self._handle = None
        deadline = self.deadline
        if deadline is None:
            return
        now = clock()
        if deadline - now > EARLY_RUN_S:
            self._start(deadline, now)  # the deadline moved on since this handle was armed, or the loop ran it early
            return
        self.deadline = None
        self.fired += 1
        self._callback(deadline)


__all__ = ["EARLY_RUN_S", "LOOP_TICK_S", "EngineClock", "LinkTimer", "clock", "timer_delay"]

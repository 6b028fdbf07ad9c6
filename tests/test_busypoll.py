"""Busy polling (transport/busypoll.py): the loop stays awake for a window after traffic, then sleeps.

What matters to an operator: polling starts with traffic, never outlives its
window (an idle node does not spin), never holds up other callbacks or timers,
and a window of 0 schedules nothing at all.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

from meshd.transport import EngineSettings
from meshd.transport.busypoll import BusyPoll
from meshd.transport.loopback import connect_pair

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(main, loop: str):  # type: ignore[no-untyped-def]
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(main)


@pytest.mark.parametrize("loop", LOOPS)
def test_polling_lasts_one_window_after_the_last_touch(loop: str) -> None:
    async def main() -> tuple[int, int, bool, float]:
        poll = BusyPoll(20_000)  # 20 ms
        poll.touch()
        assert poll.running
        await asyncio.sleep(0.010)
        poll.touch()  # traffic again: the window restarts from here
        touched = time.monotonic()
        while poll.running and time.monotonic() - touched < 1.0:
            await asyncio.sleep(0.001)
        stopped = time.monotonic()
        turns = poll.turns
        await asyncio.sleep(0.030)
        return turns, poll.turns, poll.running, stopped - touched

    turns, later, running, lasted = run(main(), loop)
    assert turns > 10  # it really kept the loop turning
    assert later == turns and not running  # and stopped for good once the window had passed
    assert 0.020 <= lasted < 1.0


@pytest.mark.parametrize("loop", LOOPS)
def test_polling_never_delays_other_callbacks_or_timers(loop: str) -> None:
    async def main() -> tuple[int, bool, int]:
        poll = BusyPoll(50_000)
        poll.touch()
        turns = []
        for _ in range(100):  # each await needs a loop turn of its own, taken between polling turns
            await asyncio.sleep(0)
            turns.append(poll.turns)
        await asyncio.sleep(0.005)  # a timer fires while the loop polls (a blocking spin would end first)
        still_polling = poll.running
        poll.close()
        while poll.running:
            await asyncio.sleep(0)
        return len(set(turns)), still_polling, poll.turns

    distinct, still_polling, turns = run(main(), loop)
    assert distinct > 50  # polling turns interleave with the coroutine's turns
    assert still_polling and turns >= 100
def test_a_zero_window_schedules_nothing() -> None:
    async def main() -> tuple[bool, int]:
        poll = BusyPoll(0)
        poll.touch()
        await asyncio.sleep(0.005)
        return poll.running, poll.turns

    assert run(main(), "asyncio") == (False, 0)


@pytest.mark.parametrize("window_us", [0, 50_000])
def test_an_endpoint_polls_after_a_round_trip_and_then_sleeps(window_us: int) -> None:
    """Real endpoints on loopback: a ping makes both ends poll (when configured); idle, neither does."""
    settings = EngineSettings(busy_poll_us=window_us)

    async def main() -> list[tuple[bool, int]]:
        pair = await connect_pair(settings, settings)
        try:
            polls = [pair.client.endpoint.busy_poll, pair.server.endpoint.busy_poll]
            await asyncio.sleep(0.2)
            before = [p.turns for p in polls]
            await pair.ping()
            during = [p.running for p in polls]
            await asyncio.sleep(0.5)  # many windows without traffic (heartbeats are seconds apart)
            after = [(p.running, p.turns) for p in polls]
            return [(d, t - b) for d, b, (_, t) in zip(during, before, after, strict=True)] + after
        finally:
            await pair.close()

    (client_during, client_turns), (server_during, server_turns), *after = asyncio.run(main())
    if window_us:
        assert client_during and server_during
        assert client_turns > 0 and server_turns > 0
    else:
        assert (client_during, server_during, client_turns, server_turns) == (False, False, 0, 0)
    assert [running for running, _ in after] == [False, False]


def test_datagrams_nobody_owns_do_not_keep_the_loop_awake() -> None:
    """A stranger's junk at the mesh port costs a drop each, never polling; a peer's datagram polls."""
    settings = EngineSettings(busy_poll_us=50_000)

    async def main() -> tuple[int, bool, bool]:
        pair = await connect_pair(settings, settings)
        try:
            server = pair.server.endpoint
            server.busy_poll = BusyPoll(50_000)  # a fresh one: only what is handed in below touches it
            dropped = server.dropped
            junk = b"\x40" + bytes(60)  # a short header for a connection id nobody issued
            stranger = ("127.0.0.1", 9)
            server.datagrams_received([(junk, stranger)])  # the single-datagram path
            server.datagrams_received([(junk, stranger)] * 5)  # a read burst
            after_junk = server.busy_poll.running
            quiet = BusyPoll(50_000)
            server.busy_poll = quiet
            await pair.ping()  # a real datagram from the peer
            return server.dropped - dropped, after_junk, quiet.turns > 0 or quiet.running
        finally:
            await pair.close()

    assert asyncio.run(main()) == (6, False, True)


def test_a_closed_poller_stays_closed() -> None:
    async def main() -> tuple[bool, int]:
        poll = BusyPoll(50_000)
        poll.touch()
        poll.close()
        await asyncio.sleep(0.005)
        poll.touch()  # e.g. a connection's last timer sending after the endpoint closed
        await asyncio.sleep(0.005)
        return poll.running, poll.turns

    running, turns = asyncio.run(main())
    assert not running and turns <= 1

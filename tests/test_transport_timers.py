"""The aioquic + uvloop timer storm: reproduced without the fix, gone with it.

uvloop's timers count whole milliseconds and round a delay to the nearest one,
so a QUIC deadline a few microseconds away runs at once, before it is due.
meshd's first glue then handled QUIC's timer at the deadline but asked for
datagrams with the wall clock: a pacing or acknowledgement deadline that had
fired early produced nothing, came back unchanged, and was re-armed, again and
again, until the wall clock caught up (docs/transport.md). A timer run that
ends with the same deadline and nothing sent is *wasted*; a run of them is
the storm. The fix (timers.py): a timer that runs has reached its deadline,
and the connection is given that time for the whole round.

Three levels: a deterministic model of uvloop's clock driving two real aioquic
connections over a link that drops 1% of datagrams (exact, no wall-clock
timing), the LinkTimer on real uvloop, and a real aioquic transfer over
loopback sockets on uvloop (1% dropped at the sender) with the old glue and
the new. Loss matters: recovery is where sub-millisecond deadlines pile up.
Every transfer is bounded (virtual 120 s in the model, no progress for 20 s
on sockets).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import ssl
import time

import pytest

from meshd.transport import timers
from meshd.transport.engine import ephemeral_identity
from meshd.transport.timers import EngineClock, LinkTimer, timer_delay

uvloop = pytest.importorskip("uvloop")


# --- units ------------------------------------------------------------------------------------


def test_timer_delay_never_negative_and_engine_clock_never_goes_back() -> None:
    assert timer_delay(10.0, 10.5) == 0.0
    assert timer_delay(10.000004, 10.0) == pytest.approx(4e-6)
    engine_clock = EngineClock()
    ahead = timers.clock() + 0.0004  # a deadline reached early
    assert engine_clock.now(ahead) == ahead
    assert engine_clock.now() >= ahead  # a later call never returns an earlier time


def test_link_timer_runs_once_per_deadline_on_uvloop() -> None:
    """Deadlines from microseconds to milliseconds away: one callback each, never more than a tick early."""

    async def main() -> list[tuple[float, float, int]]:
        results = []
        for ahead in (5e-6, 50e-6, 300e-6, 700e-6, 1.2e-3, 2.5e-3):
            calls: list[tuple[float, float]] = []
            timer = LinkTimer(lambda deadline: calls.append((deadline, timers.clock())))
            deadline = timers.clock() + ahead
            timer.arm(deadline)
            timer.arm(deadline + 0.5)  # moved far later: re-armed at once
            timer.arm(deadline)  # and back
            await asyncio.sleep(ahead + 0.01)
            results.extend((d, at, len(calls)) for d, at in calls)
            assert len(calls) == 1, (ahead, calls)
        return results

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for deadline, ran_at, _ in runner.run(main()):
            assert ran_at >= deadline - timers.EARLY_RUN_S


# --- a deterministic model of uvloop's clock, driving real aioquic connections ------------------


class _Handle(list):
    def cancel(self) -> None:
        self[3] = True


class UvClockLoop:
    """uvloop's timer semantics on virtual time: a millisecond clock, delays rounded to the nearest ms.

    ``time()`` floors to the millisecond like libuv's; ``call_later`` rounds the
    delay, 0 ms meaning "run on the next iteration"; a due timer runs when the
    millisecond clock reaches it. Every callback costs ``cost`` of virtual time.
    """

    def __init__(self, cost: float = 20e-6) -> None:
        self.t = 1000.0
        self.cost = cost
        self.ready: list[_Handle] = []
        self.timers: list[_Handle] = []
        self.seq = itertools.count()
        self.callbacks = 0

    def monotonic(self) -> float:
        return self.t

    def time(self) -> float:
        return math.floor(self.t * 1000) / 1000

    def call_soon(self, callback) -> _Handle:  # type: ignore[no-untyped-def]
        handle = _Handle([self.t, next(self.seq), callback, False])
        self.ready.append(handle)
        return handle

    def call_later(self, delay: float, callback) -> _Handle:  # type: ignore[no-untyped-def]
        ms = round(max(delay, 0.0) * 1000)
        if ms == 0:
            return self.call_soon(callback)
        handle = _Handle([(math.floor(self.t * 1000) + ms) / 1000, next(self.seq), callback, False])
        heapq.heappush(self.timers, handle)
        return handle

    def call_at(self, when: float, callback) -> _Handle:  # type: ignore[no-untyped-def]
        return self.call_later(when - self.time(), callback)

    def run_until(self, done, limit_s: float) -> bool:  # type: ignore[no-untyped-def]
        end = self.t + limit_s
        while not done():
            if self.t > end:
                return False
            if not self.ready:
                while self.timers and self.timers[0][3]:
                    heapq.heappop(self.timers)
                if not self.timers:
                    return False
                self.t = max(self.t, self.timers[0][0] + 1e-6)  # sleep until the ms clock reaches it
            while self.timers and (self.timers[0][3] or self.timers[0][0] <= self.time() + 1e-12):
                handle = heapq.heappop(self.timers)
                if not handle[3]:
                    self.ready.append(handle)
            batch, self.ready = self.ready, []
            for handle in batch:
                if not handle[3]:
                    self.callbacks += 1
                    self.t += self.cost
                    handle[2]()
        return True


def _model_timer(monkeypatch: pytest.MonkeyPatch, start: float) -> tuple[UvClockLoop, LinkTimer, list[tuple[float, float]]]:
    loop = UvClockLoop(cost=1e-6)
    loop.t = start
    monkeypatch.setattr(timers, "clock", loop.monotonic)
    calls: list[tuple[float, float]] = []
    timer = LinkTimer(lambda deadline: calls.append((deadline, loop.monotonic())), loop=loop)
    return loop, timer, calls


def test_link_timer_run_early_by_the_ms_clock_waits_instead_of_calling_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """qh3's 1 ms delayed-ACK timer, armed 0.9 ms into a millisecond: the ms clock runs it 0.1 ms later.

    Calling back then would send the ACK 0.9 ms early, in a datagram of its own that the next
    message would have carried; the timer is armed again and calls back within half a tick.
    """
    loop, timer, calls = _model_timer(monkeypatch, 1000.0009)
    deadline = loop.monotonic() + 0.001
    timer.arm(deadline)
    assert loop.run_until(lambda: bool(calls), 1.0)
    assert len(calls) == 1 and calls[0][0] == deadline
    assert calls[0][1] >= deadline - timers.EARLY_RUN_S
    assert timer.armed == 2 and loop.callbacks == 2  # one early run re-armed, then the callback


def test_link_timer_re_arms_at_once_when_the_deadline_moves_far_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """A short timer that went away (the ACK left with a message): the old handle must not wake the loop."""
    loop, timer, calls = _model_timer(monkeypatch, 1000.0002)
    now = loop.monotonic()
    timer.arm(now + 0.001)  # delayed ACK
    timer.arm(now + 0.027)  # the ACK was sent; the loss timer is next
    assert timer.armed == 2
    assert loop.run_until(lambda: bool(calls), 1.0)
    assert calls == [(now + 0.027, calls[0][1])] and loop.callbacks == 1
    timer.arm(loop.monotonic() + 0.010)
    timer.arm(loop.monotonic() + 0.0105)  # a little later (idle and loss timers on every packet): kept
    assert timer.armed == 3


class ModelGlue:
    """One aioquic connection's glue on the model loop; ``legacy`` is meshd's first link.py logic."""

    def __init__(self, loop: UvClockLoop, quic, legacy: bool, lossy: random.Random) -> None:  # type: ignore[no-untyped-def]
        self.loop, self.quic, self.legacy, self.lossy = loop, quic, legacy, lossy
        self.peer: ModelGlue | None = None
        self.runs = self.wasted = self.longest_waste = self._streak = 0
        self._handle = None
        self._timer_at: float | None = None
        if not legacy:
            self.engine_clock = EngineClock()
            self.timer = LinkTimer(self._fixed_on_timer, loop=loop)

    def deliver(self, data: bytes) -> None:
        if self.lossy.random() < 0.01:
            return  # the link drops 1% of datagrams

        def receive() -> None:
            now = self.loop.monotonic() if self.legacy else self.engine_clock.now()
            self.quic.receive_datagram(data, ("10.0.0.1", 4433), now=now)
            self.transmit(None)

        self.loop.call_soon(receive)

    def transmit(self, now: float | None) -> int:
        if not self.legacy:
            now = self.engine_clock.now(now or 0.0)
        else:
            now = self.loop.monotonic()  # the first glue sent with the wall clock, always
        sent = 0
        for data, _ in self.quic.datagrams_to_send(now=now):
            self.peer.deliver(data)  # type: ignore[union-attr]
            sent += 1
        if self.legacy:
            deadline = self.quic.get_timer()
            if deadline != self._timer_at:
                if self._handle is not None:
                    self._handle.cancel()
                self._timer_at = deadline
                self._handle = None if deadline is None else self.loop.call_at(deadline, self._legacy_on_timer)
        else:
            self.timer.arm(self.quic.get_timer())
        return sent

    def _count(self, before: float | None, sent: int) -> None:
        self.runs += 1
        if sent == 0 and self.quic.get_timer() == before:
            self.wasted += 1
            self._streak += 1
            self.longest_waste = max(self.longest_waste, self._streak)
        else:
            self._streak = 0

    def _legacy_on_timer(self) -> None:
        deadline, self._handle, self._timer_at = self._timer_at, None, None
        now = max(self.loop.monotonic(), deadline or 0.0)
        quic_deadline = self.quic.get_timer()
        if quic_deadline is not None and quic_deadline <= now:
            self.quic.handle_timer(now)
        self._count(deadline, self.transmit(None))

    def _fixed_on_timer(self, deadline: float) -> None:
        now = self.engine_clock.now(deadline)
        quic_deadline = self.quic.get_timer()
        if quic_deadline is not None and quic_deadline <= now:
            self.quic.handle_timer(now)
        self._count(deadline, self.transmit(now))


def _model_transfer(legacy: bool, size: int, seed: int, monkeypatch: pytest.MonkeyPatch) -> dict:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.events import StreamDataReceived

    loop = UvClockLoop()
    monkeypatch.setattr(timers, "clock", loop.monotonic)  # LinkTimer and EngineClock read the model's time
    lossy = random.Random(seed)

    def config(is_client: bool):  # type: ignore[no-untyped-def]
        tls = ephemeral_identity()
        conf = QuicConfiguration(is_client=is_client, alpn_protocols=["meshd/1"], verify_mode=ssl.CERT_NONE,
                                 max_datagram_size=1200, max_data=16 << 20, max_stream_data=8 << 20)
        conf.certificate, conf.private_key = tls.certificate, tls.private_key
        return conf

    client = QuicConnection(configuration=config(True))
    client.connect(("10.0.0.1", 4433), now=loop.monotonic())
    first = client.datagrams_to_send(now=loop.monotonic())
    server = QuicConnection(configuration=config(False), original_destination_connection_id=client._peer_cid.cid)
    sender, receiver = ModelGlue(loop, client, legacy, lossy), ModelGlue(loop, server, legacy, lossy)
    sender.peer, receiver.peer = receiver, sender
    received = [0]
    original = receiver.transmit

    def receiver_transmit(now: float | None) -> int:
        while (event := server.next_event()) is not None:
            if isinstance(event, StreamDataReceived):
                received[0] += len(event.data)
        return original(now)

    receiver.transmit = receiver_transmit  # type: ignore[method-assign]
    for data, _ in first:
        receiver.deliver(data)
    assert loop.run_until(lambda: client._handshake_complete, 5)
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, bytes(size), end_stream=True)
    sender.transmit(None)
    finished = loop.run_until(lambda: received[0] >= size, 120)
    return {"finished": finished, "virtual_s": loop.t, "wasted": sender.wasted + receiver.wasted,
            "runs": sender.runs + receiver.runs, "longest": max(sender.longest_waste, receiver.longest_waste)}


@pytest.mark.parametrize("seed", [1, 2])
def test_model_reproduces_the_storm_and_the_fix_removes_it(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    size = 2 * 1024 * 1024
    legacy = _model_transfer(True, size, seed, monkeypatch)
    fixed = _model_transfer(False, size, seed, monkeypatch)
    # Without the fix: hundreds of timer runs that find nothing due and re-arm the same
    # deadline, back to back (each costs a loop iteration; on a busy CPU they starve the peer).
    assert legacy["wasted"] >= 100 and legacy["longest"] >= 10, legacy
    # With it: every timer run handles its deadline.
    assert fixed["finished"], fixed
    assert fixed["wasted"] == 0, fixed
    assert fixed["runs"] < legacy["runs"], (fixed, legacy)


# --- real sockets, real uvloop: aioquic on both sides, the old glue and the new ----------------


def _legacy_link_class():  # type: ignore[no-untyped-def]
    """meshd's first PeerLink timer logic (call_at on the deadline; datagrams asked with the wall clock)."""
    from meshd.transport.link import PeerLink

    class LegacyLink(PeerLink):
        wasted = 0

        def _arm_timer(self) -> None:
            if self.closed:
                return
            deadlines = [t for t in (self.quic.get_timer(), self.session.next_timer() if self.session else None)
                         if t is not None]
            deadline = min(deadlines) if deadlines else None
            if deadline == getattr(self, "_legacy_at", None):
                return
            handle = getattr(self, "_legacy_handle", None)
            if handle is not None:
                handle.cancel()
            self._legacy_at = deadline
            self._legacy_handle = None if deadline is None else asyncio.get_running_loop().call_at(
                deadline, self._legacy_on_timer)

        def _legacy_on_timer(self) -> None:
            deadline = self._legacy_at
            self._legacy_handle = self._legacy_at = None
            if self.closed:
                return
            now = max(timers.clock(), deadline or 0.0)
            quic_deadline = self.quic.get_timer()
            if quic_deadline is not None and quic_deadline <= now:
                self.quic.handle_timer(now)
            if self.session is not None and (session_deadline := self.session.next_timer()) is not None \
                    and session_deadline <= now:
                self.session.handle_timer(now)
            sent = self._send_at_wall_clock()
            if sent == 0 and self.quic.get_timer() == deadline:
                LegacyLink.wasted += 1
            self._arm_timer()

        def _send_at_wall_clock(self) -> int:
            datagrams = self.quic.datagrams_to_send(timers.clock())
            self.endpoint.send(datagrams)
            return len(datagrams)

    return LegacyLink


def _fixed_link_class():  # type: ignore[no-untyped-def]
    from meshd.transport.link import PeerLink

    class CountingLink(PeerLink):
        wasted = 0

        def _on_timer(self, deadline: float) -> None:
            sent_before = self.endpoint.socket.stats["sent_datagrams"]
            super()._on_timer(deadline)
            if self.endpoint.socket.stats["sent_datagrams"] == sent_before and self.quic.get_timer() == deadline:
                CountingLink.wasted += 1

    return CountingLink


def _real_transfer(link_class, monkeypatch: pytest.MonkeyPatch) -> object:  # type: ignore[no-untyped-def]
    from meshd.transport import EngineSettings, endpoint, udp
    from meshd.transport.loopback import connect_pair

    monkeypatch.setattr(endpoint, "PeerLink", link_class)
    lossy = random.Random(7)
    send = udp.UdpSocket.send

    def lossy_send(self, datagrams: list[bytes], addr) -> None:  # type: ignore[no-untyped-def]
        send(self, [d for d in datagrams if lossy.random() >= 0.01], addr)  # a link that drops 1%

    monkeypatch.setattr(udp.UdpSocket, "send", lossy_send)

    async def main() -> object:
        settings = EngineSettings(engine="aioquic", max_datagram_size=1200)
        pair = await connect_pair(settings, settings)
        try:
            return await pair.bulk(6 * 1024 * 1024, stall_s=20)
        finally:
            await pair.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def test_aioquic_on_uvloop_without_the_fix_wastes_timer_runs_and_with_it_does_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    legacy = _legacy_link_class()
    started = time.monotonic()
    _real_transfer(legacy, monkeypatch)
    # The old glue's early pacing/ack timers come back unchanged, over and over (28 to 98 times
    # in eight runs of this 6 MiB transfer; how many depends on scheduling, hence the low bar).
    assert legacy.wasted >= 5, legacy.wasted
    fixed = _fixed_link_class()
    transfer = _real_transfer(fixed, monkeypatch)
    assert transfer.ok and not transfer.stalled, transfer
    assert fixed.wasted == 0
    assert time.monotonic() - started < 240

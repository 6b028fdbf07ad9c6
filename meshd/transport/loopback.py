"""Two endpoints on real loopback sockets, each with a trusting PeerSession: the transport, end to end.

For tests and quick checks of an engine pairing (aioquic and qh3, either side)
without daemons: ``connect_pair`` dials one endpoint from the other and waits
for both sessions; ``Pair.bulk`` moves bytes over a tensor channel and
reports a transfer that makes no progress for ``stall_s`` as stalled;
``Pair.ping`` measures one control-channel round trip.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from identity import NodeId, TlsIdentity

from ..protocol import (
    ROLES,
    ChannelDataReceived,
    ChannelEnded,
    ChannelOpened,
    ChannelRequested,
    Event,
    HeartbeatMeasured,
    PeerSession,
    SessionConfig,
    StreamWritable,
    TensorOpen,
    trust_roles,
)
from .endpoint import QuicEndpoint
from .engine import ephemeral_identity
from .link import PeerLink
from .settings import EngineSettings
from .timers import clock

CHUNK = 256 * 1024


@dataclass
class Side:
    endpoint: QuicEndpoint
    tls: TlsIdentity
    link: PeerLink | None = None
    events: list[Event] = field(default_factory=list)
    waiters: dict[tuple[type, int], asyncio.Future] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)

    def expect(self, kind: type, stream_id: int = -1) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.waiters[(kind, stream_id)] = future
        return future


@dataclass
class Transfer:
    size: int
    seconds: float
    ok: bool
    stalled: bool

    @property
    def mbps(self) -> float:
        return self.size / self.seconds / 1e6 if self.ok and self.seconds > 0 else 0.0


class Pair:
    """A dialled connection between two endpoints in this process."""

    def __init__(self, client: Side, server: Side) -> None:
        self.client = client
        self.server = server

    async def close(self) -> None:
        for side in (self.client, self.server):
            side.endpoint.close()
        await asyncio.sleep(0)

    async def ping(self) -> float:
        """One control-channel round trip (ping, pong), measured by the dialler's session."""
        link = self._dialler_link()
        measured = self.client.expect(HeartbeatMeasured)
        link.session._send_ping(clock())  # the heartbeat's own ping, on demand
        link.flush()
        event = await asyncio.wait_for(measured, 5)
        return event.rtt

    async def bulk(self, size: int, *, stall_s: float = 10.0) -> Transfer:
        """Send ``size`` bytes client -> server on a tensor channel; the server answers with the count."""
        link = self._dialler_link()
        session = link.session
        sid = session.open_channel(TensorOpen(purpose="tunnel", tag="bulk"), clock())
        opened = self.client.expect(ChannelOpened, sid)
        link.flush()
        await asyncio.wait_for(opened, stall_s)
        ended = self.client.expect(ChannelEnded, sid)
        self.client.received[sid] = 0
        payload = bytes(CHUNK)  # written as it is: the send buffer keeps bytes without copying
        sent = 0
        start = time.perf_counter()
        while sent < size:
            if session.is_writable(sid):
                n = min(CHUNK, size - sent)
                session.send_channel_data(sid, payload if n == CHUNK else payload[:n], end_stream=sent + n >= size)
                sent += n
                link.flush()
                await asyncio.sleep(0)
                continue
            writable = self.client.expect(StreamWritable, sid)
            try:
                await asyncio.wait_for(writable, stall_s)
            except asyncio.TimeoutError:
                return Transfer(size, time.perf_counter() - start, ok=False, stalled=True)
        try:
            await _wait_progress(ended, lambda: self.server.received.get(sid, 0), stall_s)
        except asyncio.TimeoutError:
            return Transfer(size, time.perf_counter() - start, ok=False, stalled=True)
        seconds = time.perf_counter() - start
        return Transfer(size, seconds, ok=self.server_total(sid) == size, stalled=False)

    def _dialler_link(self) -> PeerLink:
        link = self.client.link
        if link is None or link.session is None or link.closed:
            raise ConnectionError("the dialled connection is not up")
        return link

    def server_total(self, stream_id: int) -> int:
        return self.server.received.get(stream_id, -1)


async def _wait_progress(future: asyncio.Future, progress: Any, stall_s: float) -> None:
    """Wait for ``future`` while ``progress()`` keeps changing at least every ``stall_s``."""
    last, last_change = progress(), time.monotonic()
    while True:
        try:
            await asyncio.wait_for(asyncio.shield(future), 0.5)
            return
        except asyncio.TimeoutError:
            value = progress()
            if value != last:
                last, last_change = value, time.monotonic()
            elif time.monotonic() - last_change > stall_s:
                raise


def trusting_endpoint(settings: EngineSettings, on_event: Callable[[PeerLink, Event], None], *,
                      tls: TlsIdentity | None = None, roles: Iterable[str] = ROLES,
                      session_config: SessionConfig | None = None,
                      on_session: Callable[[PeerLink], None] | None = None) -> QuicEndpoint:
    """An endpoint whose sessions grant every peer ``roles``: no trust store (tests, benchmarks).

    ``tls`` defaults to a throwaway identity (pass one to know the node id);
    ``on_session`` sees each link as its session is made.
    """
    tls = tls or ephemeral_identity()
    granted = trust_roles(frozenset(roles))
    config = session_config or SessionConfig()

    def make_session(link: PeerLink, node_id: NodeId, now: float) -> PeerSession:
        if on_session is not None:
            on_session(link)
        return PeerSession(local_node_id=str(tls.node_id), peer_node_id=str(node_id), is_client=link.is_client,
                           now=now, is_trusted=granted, verify_capabilities=lambda *_: {}, config=config)

    return QuicEndpoint(tls, settings, make_session=make_session, on_event=on_event,
                        on_link_closed=lambda link: None, on_link_created=lambda link: None)


def _make_side(settings: EngineSettings, tls: TlsIdentity, session_config: SessionConfig) -> Side:
    side: Side

    def on_event(link: PeerLink, event: Event) -> None:
        side.events.append(event)
        session = link.session
        if isinstance(event, ChannelRequested) and session is not None:
            session.accept_channel(event.stream_id)
            side.received[event.stream_id] = 0
            link.flush()
        elif isinstance(event, ChannelDataReceived):
            side.received[event.stream_id] = side.received.get(event.stream_id, 0) + len(event.data)
            return  # the hot path: nothing to answer
        elif isinstance(event, ChannelEnded) and session is not None and event.stream_id in side.received \
                and not session.is_client:
            session.send_channel_data(event.stream_id, str(side.received[event.stream_id]).encode(), end_stream=True)
            link.flush()
        future = side.waiters.pop((type(event), getattr(event, "stream_id", -1)), None)
        if future is not None and not future.done():
            future.set_result(event)

    def on_session(link: PeerLink) -> None:
        side.link = link

    endpoint = trusting_endpoint(settings, on_event, tls=tls, session_config=session_config, on_session=on_session)
    side = Side(endpoint, tls)
    return side


async def connect_pair(client_settings: EngineSettings, server_settings: EngineSettings, *,
                       host: str = "127.0.0.1", timeout: float = 10.0,
                       session_config: SessionConfig | None = None) -> Pair:
    """Bind two endpoints on ``host``, dial the second from the first, wait until both sessions are up."""
    session_config = session_config or SessionConfig()
    client = _make_side(client_settings, ephemeral_identity(), session_config)
    server = _make_side(server_settings, ephemeral_identity(), session_config)
    await client.endpoint.listen(host, 0)
    _, port = await server.endpoint.listen(host, 0)
    link = client.endpoint.dial(host, port, expected=server.tls.node_id)
    pair = Pair(client, server)
    try:
        await asyncio.wait_for(link.connected, timeout)
        deadline = time.monotonic() + timeout
        while (server.link is None or server.link.session is None or not server.link.session.established):
            if time.monotonic() > deadline:
                raise TimeoutError("the accepting side never established its session")
            await asyncio.sleep(0.005)
    except BaseException:
        await pair.close()
        raise
    return pair


__all__ = ["Pair", "Transfer", "connect_pair", "trusting_endpoint"]

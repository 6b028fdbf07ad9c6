"""Byte tunnels over ``tensor`` channels: a loopback TCP connection on one node
joined to a loopback TCP connection on a trusted peer (docs/split.md).

llama.cpp's RPC protocol has no authentication and its server must never face
a network, so nothing of it crosses the network outside the mesh's mutually
authenticated QUIC connection:

- the *host* (the node running the llama context) listens on 127.0.0.1 only,
  one listener per worker peer (``Tunnels.listen``); every connection llama.cpp
  makes there becomes one ``tensor`` channel (``TensorOpen(purpose="tunnel")``)
  to that peer;
- the *worker* accepts the channel only from a peer it trusts with ``tensor``
  (the session refuses anyone else with ``forbidden`` before this code runs),
  asks ``connect_local`` for its RPC server (started on demand) and joins the
  channel to a fresh loopback connection there.

Backpressure: TCP -> QUIC reads the socket only while the stream's bounded
send buffer is writable (``StreamWritable``); QUIC -> TCP writes and, above
``WRITE_HIGH`` bytes queued on the socket, stops reading that tunnel's TCP
side until it drains, so a request/response protocol such as RPC holds at most
one message per direction. A peer that keeps sending past ``WRITE_LIMIT``
unread bytes is cut off (the tunnel is reset): it cannot grow our memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..protocol import (
    ChannelAborted,
    ChannelDataReceived,
    ChannelEnded,
    ChannelKind,
    ChannelOpened,
    ChannelRefused,
    ChannelRequested,
    StreamWritable,
    TensorOpen,
    WireCode,
)
from ..transport.channel_io import settle, wait_writable
from ..transport.timers import clock

log = logging.getLogger(__name__)

__all__ = ["TUNNEL_TAG", "Tunnel", "Tunnels"]

TUNNEL_TAG = "llama-rpc"
READ_CHUNK = 256 * 1024
WRITE_HIGH = 8 * 1024 * 1024
WRITE_LIMIT = 256 * 1024 * 1024

# (peer node id, model) -> (reader, writer) of a fresh loopback connection to the local end.
ConnectLocal = Callable[[str, str | None], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@dataclass(eq=False)
class Tunnel:
    link: Any
    stream_id: int
    peer: str
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    opened: asyncio.Future | None = None
    writable: asyncio.Event = field(default_factory=asyncio.Event)
    pump: asyncio.Task | None = None
    closed: bool = False
    fin_sent: bool = False  # our local end closed cleanly and we finished our side
    # Set when the far side ended or reset the channel first: its end went away.
    lost_by_peer: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0


class Tunnels:
    """Both ends of every tunnel on this node; ``handle`` consumes their session events."""

    def __init__(self, connect_local: ConnectLocal | None = None, release_local: Callable[[str], None] | None = None,
                 on_lost: Callable[[str, str], None] | None = None) -> None:
        self._connect_local = connect_local  # None: this node serves no tunnel end (not a worker)
        self._release_local = release_local or (lambda peer: None)
        self._on_lost = on_lost or (lambda peer, why: None)
        self._tunnels: dict[tuple[int, int], Tunnel] = {}
        self._servers: list[asyncio.base_events.Server] = []

    def stop_serving(self) -> None:
        """Refuse tunnels to a local end from now on (this node cannot be a worker)."""
        self._connect_local = None

    @property
    def open_count(self) -> int:
        return len(self._tunnels)

    def count_for(self, peer: str) -> int:
        return sum(1 for t in self._tunnels.values() if t.peer == peer)

    # --- the host's side ----------------------------------------------------------

    async def listen(self, link_for: Callable[[], Any], model: str | None) -> asyncio.base_events.Server:
        """A 127.0.0.1 listener whose connections are tunnelled to the peer ``link_for()`` returns."""
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not same_user(writer):
                # Loopback is shared by every local user; only ours (the host child) may use the tunnel.
                log.warning("tunnel refused: a local connection from another user",
                            extra={"fields": {"from": str(writer.get_extra_info("peername"))}})
                writer.close()
                return
            link = link_for()
            if link is None or link.session is None or not link.session.established:
                log.warning("tunnel refused: the worker peer is not connected")
                writer.close()
                return
            await self._open(link, reader, writer, model)

        server = await asyncio.start_server(accepted, "127.0.0.1", 0)
        self._servers.append(server)
        return server

    async def _open(self, link: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    model: str | None) -> None:
        setup = TensorOpen(purpose="tunnel", tag=TUNNEL_TAG, model=model)
        stream_id = link.session.open_channel(setup, clock())
        tunnel = Tunnel(link, stream_id, str(link.node_id), reader, writer,
                        opened=asyncio.get_running_loop().create_future())
        self._tunnels[(id(link), stream_id)] = tunnel
        link.flush()
        try:
            await tunnel.opened
        except ConnectionError as exc:
            log.warning("tunnel refused by the worker", extra={"fields": {"peer": tunnel.peer, "error": str(exc)}})
            self._close(tunnel, None)
            return
        tunnel.pump = asyncio.ensure_future(self._pump_out(tunnel))

    # --- the worker's side ----------------------------------------------------------

    def _requested(self, link: Any, event: ChannelRequested) -> None:
        setup = event.setup
        session = link.session
        if setup.purpose != "tunnel" or setup.tag != TUNNEL_TAG:
            session.refuse_channel(event.stream_id, "unknown_tensor_channel", f"no tensor channel {setup.tag!r} here")
        elif self._connect_local is None:
            session.refuse_channel(event.stream_id, "not_accepting", "this node does not serve split layers")
        else:
            tunnel = Tunnel(link, event.stream_id, str(link.node_id))
            self._tunnels[(id(link), event.stream_id)] = tunnel
            asyncio.ensure_future(self._connect(tunnel, setup.model))
        link.flush()

    async def _connect(self, tunnel: Tunnel, model: str | None) -> None:
        assert self._connect_local is not None
        session = tunnel.link.session
        try:
            tunnel.reader, tunnel.writer = await self._connect_local(tunnel.peer, model)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a refusal with its reason
            log.warning("tunnel end not available", extra={"fields": {"peer": tunnel.peer, "error": str(exc)}})
            if not tunnel.closed:
                self._forget(tunnel)
                session.refuse_channel(tunnel.stream_id, "worker_failed", str(exc)[:200])
                tunnel.link.flush()
            return
        if tunnel.closed:  # the peer gave up while we connected
            tunnel.writer.close()
            self._release_local(tunnel.peer)
            return
        session.accept_channel(tunnel.stream_id)
        tunnel.link.flush()
        tunnel.pump = asyncio.ensure_future(self._pump_out(tunnel))

    # --- session events ---------------------------------------------------------------

    def handle(self, link: Any, event: Any) -> bool:
        if isinstance(event, ChannelRequested):
            if event.kind is not ChannelKind.TENSOR:
                return False
            self._requested(link, event)
            return True
        stream_id = getattr(event, "stream_id", None)
        tunnel = self._tunnels.get((id(link), stream_id)) if stream_id is not None else None
        if tunnel is None:
            return False
        if isinstance(event, ChannelOpened):
            settle(tunnel.opened)
        elif isinstance(event, ChannelRefused):
            settle(tunnel.opened, error=ConnectionRefusedError(f"{event.code}: {event.message}"))
        elif isinstance(event, StreamWritable):
            tunnel.writable.set()
        elif isinstance(event, ChannelDataReceived):
            self._data_in(tunnel, event.data)
        elif isinstance(event, ChannelEnded):
            if not tunnel.fin_sent:  # the far end closed first: finish ours too, the stream is over
                tunnel.fin_sent = True
                try:
                    tunnel.link.session.finish_stream(tunnel.stream_id)
                    tunnel.link.flush()
                except Exception:  # noqa: BLE001 - the connection is already gone
                    pass
                self._close(tunnel, "ended")
            else:
                self._close(tunnel, None)
        elif isinstance(event, ChannelAborted):
            self._close(tunnel, None if tunnel.fin_sent and event.code == "no_error" else event.code)
        return True

    def _data_in(self, tunnel: Tunnel, data: bytes) -> None:
        writer = tunnel.writer
        if writer is None or writer.is_closing():
            return
        tunnel.bytes_in += len(data)
        writer.write(data)
        queued = writer.transport.get_write_buffer_size()
        if queued > WRITE_LIMIT:
            log.warning("tunnel reset: the local end stopped reading", extra={"fields": {"peer": tunnel.peer}})
            self._reset(tunnel)

    async def _pump_out(self, tunnel: Tunnel) -> None:
        """Local TCP bytes into the channel, only as fast as the stream's send buffer drains."""
        link, reader, writer = tunnel.link, tunnel.reader, tunnel.writer
        assert reader is not None and writer is not None
        session = link.session
        try:
            while True:
                if writer.transport.get_write_buffer_size() > WRITE_HIGH:
                    await writer.drain()  # the other direction is backed up: stop pulling new work
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                await wait_writable(session, tunnel.stream_id, tunnel.writable)
                if tunnel.closed:
                    return
                tunnel.bytes_out += len(data)
                session.send_channel_data(tunnel.stream_id, data)
                link.flush()
        except (ConnectionError, OSError):
            # Our local end broke (e.g. the RPC worker was killed): a code the far side can tell apart.
            self._reset(tunnel, WireCode.TUNNEL_BROKEN)
            return
        except Exception as exc:  # noqa: BLE001 - the session went away under us
            log.debug("tunnel pump stopped", extra={"fields": {"peer": tunnel.peer, "error": repr(exc)}})
            self._close(tunnel, None)
            return
        if tunnel.closed:
            return
        tunnel.fin_sent = True  # a clean close: FIN, and the far side closes its end in turn
        try:
            session.finish_stream(tunnel.stream_id)
            link.flush()
        except Exception:  # noqa: BLE001 - the connection is already gone
            self._close(tunnel, None)

    # --- closing --------------------------------------------------------------------------

    def _reset(self, tunnel: Tunnel, code: WireCode = WireCode.TUNNEL_BROKEN) -> None:
        if tunnel.closed:
            return
        try:
            tunnel.link.session.reset_stream(tunnel.stream_id, code)
            tunnel.link.flush()
        except Exception:  # noqa: BLE001 - the connection is already gone
            pass
        self._close(tunnel, None)

    def _close(self, tunnel: Tunnel, by_peer: str | None) -> None:
        if tunnel.closed:
            return
        tunnel.closed = True
        self._forget(tunnel)
        tunnel.writable.set()
        settle(tunnel.opened, error=ConnectionResetError(f"tunnel closed: {by_peer}"))
        if tunnel.pump is not None and not tunnel.pump.done():
            tunnel.pump.cancel()
        if tunnel.writer is not None and not tunnel.writer.is_closing():
            tunnel.writer.close()
        if tunnel.opened is None and tunnel.writer is not None:  # a worker-side end that connect_local served
            self._release_local(tunnel.peer)
        if by_peer is not None and tunnel.opened is not None:
            # Host side only: the worker's end went away under a live llama.cpp connection.
            tunnel.lost_by_peer = by_peer
            self._on_lost(tunnel.peer, by_peer)
        log.debug("tunnel closed", extra={"fields": {"peer": tunnel.peer, "by_peer": by_peer,
                                                      "bytes_in": tunnel.bytes_in, "bytes_out": tunnel.bytes_out}})

    def _forget(self, tunnel: Tunnel) -> None:
        self._tunnels.pop((id(tunnel.link), tunnel.stream_id), None)

    def close(self) -> None:
        for tunnel in list(self._tunnels.values()):
            self._reset(tunnel, WireCode.NO_ERROR)
        for server in self._servers:
            server.close()
        self._servers.clear()


def same_user(writer: asyncio.StreamWriter) -> bool:
    """Whether the local process at the other end of an accepted 127.0.0.1 connection runs as our uid.

    TCP has no SO_PEERCRED; the kernel's socket table (/proc/net/tcp, this
    network namespace) lists the client's socket with its owner. Where that
    table cannot be read the answer is no: a tunnel is never opened on doubt.
    """
    import os

    peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
    if not peer or not local:
        return False
    want = (_proc_addr(peer[0], peer[1]), _proc_addr(local[0], local[1]))
    try:
        with open("/proc/net/tcp") as table:
            next(table)
            for line in table:
                fields = line.split()
                if (fields[1], fields[2]) == want:
                    return int(fields[7]) == os.getuid()
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return False


def _proc_addr(host: str, port: int) -> str:
    """``127.0.0.1:5000`` as /proc/net/tcp writes it: ``0100007F:1388`` (address bytes little-endian)."""
    import socket

    return f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"

"""The UDP endpoint: one socket for every peer connection, dialled or accepted.

Demultiplexes datagrams by destination connection id, creates server-side
connections for new Initial packets, dials peers, and sends what each
connection wants to send. Everything protocol-shaped happens in
``MeshQuicConnection`` and ``PeerSession``; this layer only moves bytes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from identity import NodeId, TlsIdentity

from .engine import (
    EngineSettings,
    MeshQuicConnection,
    destination_cid,
    is_initial_packet,
    make_configuration,
    stream_buffered,
)
from .link import EventHandler, PeerLink, SessionFactory, clock

log = logging.getLogger(__name__)

MIN_INITIAL_SIZE = 1200  # RFC 9000 14.1: a client's Initial is padded to at least this
UDP_BUFFER_BYTES = 4 * 1024 * 1024


class QuicEndpoint(asyncio.DatagramProtocol):
    def __init__(self, tls: TlsIdentity, settings: EngineSettings, *, make_session: SessionFactory,
                 on_event: EventHandler, on_link_closed: Callable[[PeerLink], None],
                 on_link_created: Callable[[PeerLink], None]) -> None:
        self.settings = settings
        self._server_config = make_configuration(
            is_client=False, certificate=tls.certificate, private_key=tls.private_key, settings=settings)
        self._tls = tls
        self._make_session = make_session
        self._on_event = on_event
        self._on_link_closed = on_link_closed
        self._on_link_created = on_link_created
        self._links_by_cid: dict[bytes, PeerLink] = {}
        self.links: set[PeerLink] = set()
        self.transport: asyncio.DatagramTransport | None = None
        self.dropped = 0

    # --- lifecycle -------------------------------------------------------------

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket

            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER_BYTES)
                except OSError:
                    pass  # the kernel caps it; a smaller buffer only costs throughput
        return transport.get_extra_info("sockname")[:2]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def close(self) -> None:
        for link in list(self.links):
            link.close(0, "shutting down")
        if self.transport is not None:
            self.transport.close()

    # --- links -------------------------------------------------------------------

    def _new_link(self, quic: MeshQuicConnection, addr: tuple[str, int], *, is_client: bool,
                  expected: NodeId | None) -> PeerLink:
        link = PeerLink(self, quic, addr, is_client=is_client, expected=expected, make_session=self._make_session,
                        on_event=self._on_event, on_closed=self._link_closed)
        self.links.add(link)
        for cid in (quic.host_cid,):
            self.register_cid(cid, link)
        self._on_link_created(link)
        return link

    def register_cid(self, cid: bytes, link: PeerLink) -> None:
        self._links_by_cid[cid] = link

    def unregister_cid(self, cid: bytes) -> None:
        self._links_by_cid.pop(cid, None)

    def _link_closed(self, link: PeerLink) -> None:
        self.links.discard(link)
        for cid in [cid for cid, owner in self._links_by_cid.items() if owner is link]:
            del self._links_by_cid[cid]
        self._on_link_closed(link)

    def dial(self, host: str, port: int, expected: NodeId | None = None) -> PeerLink:
        config = make_configuration(is_client=True, certificate=self._tls.certificate,
                                    private_key=self._tls.private_key, settings=self.settings)
        quic = MeshQuicConnection(configuration=config)
        now = clock()
        quic.connect((host, port), now=now)
        link = self._new_link(quic, (host, port), is_client=True, expected=expected)
        link.process(now)
        return link

    # --- datagrams -----------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        addr = addr[:2]
        now = clock()
        cid = destination_cid(data)
        link = self._links_by_cid.get(cid) if cid is not None else None
        if link is None:
            initial, original_cid = is_initial_packet(data)
            if not initial or original_cid is None or len(data) < MIN_INITIAL_SIZE:
                self.dropped += 1
                return
            quic = MeshQuicConnection(configuration=self._server_config, original_destination_connection_id=original_cid)
            link = self._new_link(quic, addr, is_client=False, expected=None)
            self.register_cid(original_cid, link)
        link.datagram_received(data, addr, now)

    def transmit(self, link: PeerLink) -> None:
        if self.transport is None:
            return
        now = clock()
        for data, addr in link.quic.datagrams_to_send(now=now):
            self.transport.sendto(data, addr)

    @staticmethod
    def engine_buffered(quic: MeshQuicConnection, stream_id: int) -> int:
        return stream_buffered(quic, stream_id)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error", extra={"fields": {"error": str(exc)}})


def links_of(endpoint: QuicEndpoint, node_id: NodeId) -> list[PeerLink]:
    return [link for link in endpoint.links if link.node_id == node_id]


__all__ = ["QuicEndpoint", "links_of"]

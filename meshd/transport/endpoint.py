"""The UDP endpoint: one socket for every peer connection, dialled or accepted.

Demultiplexes datagrams by destination connection id, creates server-side
connections for new Initial packets, dials peers, and sends what each
connection wants to send. Datagrams arrive in batches (udp.py); consecutive
datagrams for one connection are handed to it together, so it processes and
transmits once per batch rather than once per datagram. Everything
protocol-shaped happens in the engine's connection and in ``PeerSession``;
this layer only moves bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from identity import NodeId, TlsIdentity

from .busypoll import BusyPoll
from .engine import MeshConnection, load_engine
from .link import EventHandler, PeerLink, SessionFactory
from .packets import destination_cid, is_initial
from .settings import CONNECTION_ID_LENGTH, EngineSettings
from .timers import clock
from .udp import Address, UdpSocket

log = logging.getLogger(__name__)

MIN_INITIAL_SIZE = 1200  # RFC 9000 14.1: a client's Initial is padded to at least this


class QuicEndpoint:
    def __init__(self, tls: TlsIdentity, settings: EngineSettings | None = None, *, make_session: SessionFactory,
                 on_event: EventHandler, on_link_closed: Callable[[PeerLink], None],
                 on_link_created: Callable[[PeerLink], None]) -> None:
        self.settings = settings or EngineSettings()
        self.engine = load_engine(self.settings.engine)
        self._server_config = self.engine.configuration(tls, self.settings, is_client=False)
        self._client_config = self.engine.configuration(tls, self.settings, is_client=True)
        self._make_session = make_session
        self._on_event = on_event
        self._on_link_closed = on_link_closed
        self._on_link_created = on_link_created
        self._links_by_cid: dict[bytes, PeerLink] = {}
        self.links: set[PeerLink] = set()
        self.socket: UdpSocket | None = None
        self.dropped = 0
        self.busy_poll = BusyPoll(self.settings.busy_poll_us)  # busypoll.py: no sleep right after traffic

    # --- lifecycle -------------------------------------------------------------

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        self.socket = UdpSocket.bind(host, port, self.datagrams_received, buffer_bytes=self.settings.udp_buffer_bytes,
                                     batch=self.settings.batch_io)
        bound = self.socket.sockname()
        # info: which engine and datagram size a node runs is what an operator asks first.
        log.info("quic endpoint bound", extra={"fields": {
            "addr": f"{bound[0]}:{bound[1]}", "engine": self.engine.name, "batched_io": self.socket.batched,
            "max_datagram_size": self.settings.max_datagram_size, "busy_poll_us": self.settings.busy_poll_us}})
        return bound

    def close(self) -> None:
        for link in list(self.links):
            link.close(0, "shutting down")
        if self.socket is not None:
            self.socket.close()
        self.busy_poll.close()

    # --- links -------------------------------------------------------------------

    def _new_link(self, quic: MeshConnection, addr: Address, *, is_client: bool,
                  expected: NodeId | None) -> PeerLink:
        link = PeerLink(self, quic, addr, is_client=is_client, expected=expected, make_session=self._make_session,
                        on_event=self._on_event, on_closed=self._link_closed)
        self.links.add(link)
        self.register_cid(quic.host_cid, link)
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
        now = clock()
        quic = self.engine.connect(self._client_config, (host, port), now)
        link = self._new_link(quic, (host, port), is_client=True, expected=expected)
        link.process(now)
        return link

    # --- datagrams -----------------------------------------------------------------

    def datagrams_received(self, batch: list[tuple[bytes, Address]]) -> None:
        """One read burst: hand each run of datagrams for one connection to it at once."""
        if len(batch) == 1:  # a control message or an ACK: most wake-ups outside bulk transfers
            data, addr = batch[0]
            link = self._link_for(data, addr)
            if link is not None:
                self._deliver(link, [data], addr)
            return
        run: list[bytes] = []
        run_link: PeerLink | None = None
        run_addr: Address | None = None
        for data, addr in batch:
            link = self._link_for(data, addr)
            if link is not run_link or addr != run_addr:
                if run_link is not None and run:
                    self._deliver(run_link, run, run_addr)  # type: ignore[arg-type]
                run, run_link, run_addr = [], link, addr
            if link is not None:
                run.append(data)
        if run_link is not None and run:
            self._deliver(run_link, run, run_addr)  # type: ignore[arg-type]

    def _deliver(self, link: PeerLink, datagrams: list[bytes], addr: Address) -> None:
        # Only datagrams a connection takes keep the loop awake; ones nobody owns are dropped.
        self.busy_poll.touch()
        link.datagrams_received(datagrams, addr)

    def _link_for(self, data: bytes, addr: Address) -> PeerLink | None:
        cid = destination_cid(data, CONNECTION_ID_LENGTH)
        link = self._links_by_cid.get(cid) if cid is not None else None
        if link is not None and not link.closed:
            return link
        if cid is None or len(data) < MIN_INITIAL_SIZE or not is_initial(data):
            self.dropped += 1
            return None
        quic = self.engine.accept(self._server_config, cid)
        link = self._new_link(quic, addr, is_client=False, expected=None)
        self.register_cid(cid, link)
        return link

    def send(self, datagrams: list[tuple[bytes, Any]]) -> None:
        if self.socket is None or not datagrams:
            return
        self.busy_poll.touch()
        addr = datagrams[0][1]
        if len(datagrams) == 1:  # a control message, an ACK: most sends
            self.socket.send([datagrams[0][0]], addr)
            return
        payloads = [data for data, target in datagrams if target == addr]
        if len(payloads) == len(datagrams):
            self.socket.send(payloads, addr)
            return
        for data, target in datagrams:  # a connection probing or migrating to another path: rare
            self.socket.send([data], target)


def links_of(endpoint: QuicEndpoint, node_id: NodeId) -> list[PeerLink]:
    return [link for link in endpoint.links if link.node_id == node_id]


__all__ = ["QuicEndpoint", "links_of"]

"""MeshService: the peer table, discovery, and one authenticated session per peer.

Built by the daemon. Discovery and static configuration say where peers may
be; the QUIC endpoint dials trusted ones (and accepts anyone, letting the
session refuse the untrusted after the hello); session events update the peer
table that ``meshctl peers`` and the router read.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from identity import NodeId, NodeKey, TlsIdentity
from peers import TrustStore
from peers.announce import Announcement, ConflictDetected
from peers.discovery import DiscoveryConfig, DiscoveryEvent, ZeroconfDiscovery
from peers.table import PeerState, PeerTable, describe
from peers.trust_model import PeerRevoked, PeerTrusted, TrustChange

from ..config import MeshConfig
from ..logs import fields
from ..protocol import (
    PROTOCOL_VERSION,
    CapabilitiesReceived,
    CapabilitiesRejected,
    Event,
    HeartbeatMeasured,
    PeerAccepted,
    PeerRefused,
    PeerSession,
    PeerTimedOut,
    RefusedByPeer,
    SessionClosed,
    SessionConfig,
    StreamProtocolError,
    VersionMismatched,
    WireCode,
    connection_survives,
)
from ..transport import EngineSettings, InvalidTransportSettings, PeerLink, QuicEndpoint
from ..transport.link import clock
from ..transport.settings import DEFAULT_MAX_DATA, DEFAULT_MAX_STREAM_DATA
from .capabilities import CapabilityAnnouncer, CapabilityVerifier, node_descriptor
from .dialer import Backoff

log = logging.getLogger(__name__)

DIAL_INTERVAL_S = 1.0
ANNOUNCE_INTERVAL_S = 2.0
UNTRUSTED_RETRY_S = 15.0  # a peer that does not trust us yet: ask again now and then


@dataclass(frozen=True)
class LocalNode:
    key: NodeKey
    name: str
    api_port: int
    boot_id: str


def new_boot_id() -> str:
    return secrets.token_hex(8)


RequestHandler = Callable[[PeerLink, Event], None]


def engine_settings(config: MeshConfig) -> EngineSettings:
    """The transport settings of ``[mesh]``; unset ones keep the transport's defaults.

    Raises ``InvalidTransportSettings`` naming the ``mesh.*`` key at fault: a
    value the transport refuses, or ``mesh.engine = "qh3"`` on a machine where
    qh3 is not installed or fails its self-test ("auto" never fails).
    """
    chosen: dict[str, Any] = {name: getattr(config, name) for name in
                              ("max_datagram_size", "udp_buffer_bytes", "max_stream_data", "max_data",
                               "busy_poll_us")
                              if getattr(config, name) is not None}
    if config.engine != "auto":
        chosen["engine"] = config.engine
    if config.pmtu_probe:
        chosen["pmtu_probe"] = True
    # Setting one window alone keeps the pair consistent (max_stream_data <= max_data)
    # instead of failing against the other's default.
    if "max_stream_data" in chosen and "max_data" not in chosen:
        chosen["max_data"] = max(chosen["max_stream_data"], DEFAULT_MAX_DATA)
    if "max_data" in chosen and "max_stream_data" not in chosen:
        chosen["max_stream_data"] = min(chosen["max_data"], DEFAULT_MAX_STREAM_DATA)
    try:
        return EngineSettings(**chosen)
    except InvalidTransportSettings as exc:
        key = f"mesh.{exc.setting}" if exc.setting else "mesh"
        raise InvalidTransportSettings(exc.reason, setting=key) from exc


class MeshService:
    def __init__(self, config: MeshConfig, node: LocalNode, trust: TrustStore, tls: TlsIdentity,
                 capabilities: Callable[[], dict[str, Any]] = dict,
                 session_config: SessionConfig | None = None) -> None:
        self.config = config
        self.node = node
        self.trust = trust
        self.table = PeerTable(node.key.node_id)
        self.discovery: ZeroconfDiscovery | None = None
        self.conflicts: list[ConflictDetected] = []
        self.active: dict[NodeId, PeerLink] = {}  # the one established link per peer
        self.request_handler: RequestHandler | None = None
        self.on_link_closed: Callable[[PeerLink], None] | None = None
        self._session_config = session_config or SessionConfig(
            heartbeat_interval=config.heartbeat_s, peer_timeout=config.peer_timeout_s)
        self._verifier = CapabilityVerifier()
        self._descriptor = node_descriptor()
        self._collect = capabilities
        self._announcer = CapabilityAnnouncer(node.key, self._capability_payload)
        self._backoff = Backoff()
        self._dialing: dict[object, PeerLink] = {}
        self._tasks: list[asyncio.Task] = []
        self.endpoint = QuicEndpoint(tls, engine_settings(config), make_session=self._make_session,
                                     on_event=self._session_event, on_link_closed=self._link_closed,
                                     on_link_created=lambda link: None)
        self.bound: tuple[str, int] | None = None
        for peer in config.peers:
            self.table.add_static(peer.host, peer.port)

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self.bound = await self.endpoint.listen(self.config.listen.host, self.config.listen.port)
        log.info("mesh listening", extra=fields(quic=f"{self.bound[0]}:{self.bound[1]}",
                                                node_id=str(self.node.key.node_id)))
        if self.config.discovery:
            host = self.config.listen.host
            self.discovery = ZeroconfDiscovery(
                self.node.key,
                DiscoveryConfig(
                    name=self.node.name, protocol_version=PROTOCOL_VERSION, quic_port=self.bound[1],
                    api_port=self.node.api_port, boot_id=self.node.boot_id,
                    addresses=() if host in ("0.0.0.0", "::") else (host,),
                ),
                self._discovered,
            )
            await self.discovery.start()
        self._tasks = [asyncio.create_task(self._dial_loop()), asyncio.create_task(self._announce_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        now = clock()
        for link in list(self.endpoint.links):
            if link.session is not None:
                link.session.close(now, "shutting down")
                link.flush()
        await asyncio.sleep(0.05)  # let the goodbyes leave
        self.endpoint.close()
        if self.discovery is not None:
            await self.discovery.stop()
            self.discovery = None

    # --- sessions ----------------------------------------------------------------

    def _is_trusted(self, node_id: str, role: str) -> bool:
        try:
            return self.trust.allows(NodeId.parse(node_id), role)
        except ValueError:
            return False

    def _capability_payload(self) -> dict[str, Any]:
        return {"node": self._descriptor, "name": self.node.name, "api_port": self.node.api_port,
                "quic_port": self.bound[1] if self.bound else self.config.listen.port,
                **self._collect()}

    def _make_session(self, link: PeerLink, node_id: NodeId, now: float) -> PeerSession:
        session = PeerSession(
            local_node_id=str(self.node.key.node_id), peer_node_id=str(node_id), is_client=link.is_client,
            now=now, is_trusted=self._is_trusted, verify_capabilities=self._verifier, config=self._session_config,
        )
        record, _ = self._announcer.current()
        session.announce_capabilities(record, now)
        if not link.is_client:
            self.table.inbound(node_id, link.addr[0], time.time())
        return session

    def _session_event(self, link: PeerLink, event: Event) -> None:
        node_id = link.node_id
        if node_id is None:
            return
        if isinstance(event, PeerAccepted):
            self._accepted(link, node_id, event)
        elif isinstance(event, CapabilitiesReceived):
            record = self.table.get(node_id)
            if record is not None:
                payload = event.payload
                record.name = str(payload.get("name") or record.name)[:64]
                record.models = list(payload.get("models", []))
                record.load = dict(payload.get("load", {}))
                record.node = dict(payload.get("node") or {})
                record.split = dict(payload.get("split") or {}) if isinstance(payload.get("split"), dict) else {}
                record.api_port = payload.get("api_port", record.api_port)
                if isinstance(payload.get("quic_port"), int) and not link.is_client:
                    record.add_address(link.addr[0], payload["quic_port"])
        elif isinstance(event, CapabilitiesRejected):
            log.warning("capabilities rejected", extra=fields(peer=str(node_id), reason=event.reason))
        elif isinstance(event, HeartbeatMeasured):
            record = self.table.get(node_id)
            if record is not None:
                record.rtt_ms = event.rtt * 1000.0
                record.last_seen = time.time()
        elif isinstance(event, PeerRefused):
            # We refused them: authenticated, but not in our trust store.
            state = PeerState.INCOMPATIBLE if event.code == WireCode.VERSION_MISMATCH.code else PeerState.UNTRUSTED
            self.table.set_state(node_id, state, f"we refused: {event.code}")
        elif isinstance(event, RefusedByPeer):
            state = PeerState.INCOMPATIBLE if event.code == WireCode.VERSION_MISMATCH.code else PeerState.UNTRUSTED
            self.table.set_state(node_id, state, f"peer refused us: {event.code}")
            self._backoff.failed(node_id, time.monotonic(), floor_s=UNTRUSTED_RETRY_S)
        elif isinstance(event, VersionMismatched):
            log.warning("protocol version mismatch", extra=fields(peer=str(node_id), ours=event.local_version,
                                                                 theirs=event.peer_version))
        elif isinstance(event, PeerTimedOut):
            if self.active.get(node_id) is link:
                self.table.set_state(node_id, PeerState.DOWN, f"silent for {event.silent_for:.1f}s")
        elif isinstance(event, StreamProtocolError):
            log.warning("stream protocol error", extra=fields(peer=str(node_id), code=event.code))
        elif isinstance(event, SessionClosed):
            self._session_closed(link, node_id, event)
        elif self.request_handler is not None:
            self.request_handler(link, event)

    def _accepted(self, link: PeerLink, node_id: NodeId, event: PeerAccepted) -> None:
        current = self.active.get(node_id)
        if current is not None and current is not link and not current.closed:
            # Both sides dialled: keep the connection both sides agree on.
            own, peer = self.node.key.node_id.compact, node_id.compact
            keep_new = connection_survives(own, peer, initiated_locally=link.is_client)
            loser = current if keep_new else link
            if loser.session is not None:
                loser.session.close(clock(), "duplicate connection",
                                    WireCode.DUPLICATE_CONNECTION)
                loser.flush()
            if not keep_new:
                return
        self.active[node_id] = link
        self._backoff.succeeded(node_id)
        record = self.table.get(node_id) or self.table.inbound(node_id, link.addr[0], time.time())
        if link.is_client:
            for static in self.table.static:
                if (static.host, static.port) == link.addr:
                    self.table.learn_static(static.host, static.port, node_id, time.time())
        record.last_seen = time.time()
        self.table.set_state(node_id, PeerState.CONNECTED)
        log.info("peer connected", extra=fields(peer=str(node_id), addr=f"{link.addr[0]}:{link.addr[1]}",
                                                 dialled=link.is_client, roles=",".join(sorted(event.granted_roles))))

    def _session_closed(self, link: PeerLink, node_id: NodeId, event: SessionClosed) -> None:
        if self.active.get(node_id) is link:
            del self.active[node_id]
            record = self.table.get(node_id)
            if record is not None and record.state == PeerState.CONNECTED:
                self.table.set_state(node_id, PeerState.DOWN, event.reason)
            log.info("peer disconnected", extra=fields(peer=str(node_id), code=event.code, reason=event.reason))

    def _link_closed(self, link: PeerLink) -> None:
        if self.on_link_closed is not None:
            self.on_link_closed(link)
        for target, dialling in list(self._dialing.items()):
            if dialling is link:
                del self._dialing[target]
                if link.session is None or not link.session.established:
                    self._backoff.failed(target, time.monotonic())
        if link.node_id is not None and self.active.get(link.node_id) is link:
            del self.active[link.node_id]
            if (record := self.table.get(link.node_id)) is not None and record.state == PeerState.CONNECTED:
                self.table.set_state(link.node_id, PeerState.DOWN, link.close_reason)

    # --- dialling ------------------------------------------------------------------

    def _targets(self) -> list[tuple[object, str, int, NodeId | None]]:
        targets: list[tuple[object, str, int, NodeId | None]] = []
        for record in self.table.peers():
            if record.node_id in self.active or record.state == PeerState.CONFLICT or not record.addresses:
                continue
            if not self.trust.roles_of(record.node_id):
                continue  # we would refuse it ourselves; it can dial us once it trusts us
            host, port = record.addresses[0]
            targets.append((record.node_id, host, port, record.node_id))
        for static in self.table.static:
            if static.node_id is None:
                targets.append(((static.host, static.port), static.host, static.port, None))
        return targets

    def dial_now(self) -> None:
        now = time.monotonic()
        for target, host, port, expected in self._targets():
            if target in self._dialing or not self._backoff.ready(target, now):
                continue
            if expected is not None:
                self.table.set_state(expected, PeerState.CONNECTING)
            self._backoff.failed(target, now)  # counts as an attempt until it succeeds
            self._dialing[target] = link = self.endpoint.dial(host, port, expected)
            link.connected.add_done_callback(lambda fut, t=target: self._dial_done(t, fut))

    def _dial_done(self, target: object, fut: asyncio.Future) -> None:
        self._dialing.pop(target, None)
        if not fut.cancelled() and fut.exception() is None:
            self._backoff.succeeded(target)

    async def _dial_loop(self) -> None:
        while True:
            self.dial_now()
            self._expire_handshakes()
            await asyncio.sleep(DIAL_INTERVAL_S)

    def _expire_handshakes(self) -> None:
        """A dial to an address where nobody answers must not linger forever."""
        now = clock()
        for link in list(self._dialing.values()):
            if link.session is None and not link.closed and now - link.created_at > self._session_config.handshake_timeout:
                link.close(int(WireCode.PEER_TIMEOUT), "handshake timed out")
                if (record := self.table.get(link.expected)) is not None and record.state == PeerState.CONNECTING:
                    self.table.set_state(record.node_id, PeerState.DOWN, "no answer")

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(ANNOUNCE_INTERVAL_S)
            record, changed = self._announcer.current()
            if not changed:
                continue
            now = clock()
            for link in list(self.active.values()):
                if link.session is not None and link.session.established:
                    link.session.announce_capabilities(record, now)
                    link.flush()

    # --- trust and discovery ----------------------------------------------------------

    def trust_changed(self, changes: tuple[TrustChange, ...]) -> None:
        now = clock()
        for link in list(self.endpoint.links):
            if link.session is not None:
                link.session.trust_changed(now)
                link.flush()
        for change in changes:
            node_id = getattr(change, "node_id", None)
            if isinstance(change, PeerTrusted) and node_id is not None:
                self._backoff.reset(node_id)
                record = self.table.get(node_id)
                if record is not None and record.state == PeerState.UNTRUSTED:
                    self.table.set_state(node_id, PeerState.DISCOVERED)
            elif isinstance(change, PeerRevoked) and node_id is not None:
                log.info("peer revoked", extra=fields(peer=str(node_id), connected=node_id in self.active))
        self.dial_now()

    def _discovered(self, event: DiscoveryEvent) -> None:
        now = time.time()
        if isinstance(event, ConflictDetected):
            self.conflicts.append(event)
            self.table.conflict(event)
            return
        if isinstance(event, Announcement):
            previous = self.table.get(event.node_id)
            known = previous is not None
            if previous is not None and previous.boot_id and previous.boot_id != event.boot_id:
                self._backoff.reset(event.node_id)  # it restarted: dial it now, not after the backoff
            record = self.table.heard(event, now)
            if not known:
                log.info("peer discovered", extra=fields(node_id=str(event.node_id), name=event.name,
                                                         addresses=",".join(event.addresses)))
                if not self.trust.roles_of(event.node_id):
                    self.table.set_state(record.node_id, PeerState.UNTRUSTED, "not in the trust store")
            self.dial_now()

    def add_static_peer(self, host: str, port: int) -> None:
        self.table.add_static(host, port)
        self.dial_now()

    def snapshot(self) -> dict:
        peers = [describe(p, sorted(r.value for r in self.trust.roles_of(p.node_id))) for p in self.table.peers()]
        static = [{"address": f"{p.host}:{p.port}", "node_id": str(p.node_id) if p.node_id else None}
                  for p in self.table.static]
        own_conflicts = [c for c in self.conflicts if c.node_id == self.node.key.node_id]
        return {
            "node_id": str(self.node.key.node_id),
            "quic": f"{self.bound[0]}:{self.bound[1]}" if self.bound else None,
            "peers": peers,
            "static": static,
            "self_conflict": [{"addresses": list(c.addresses)} for c in own_conflicts],
        }


__all__ = ["LocalNode", "MeshService", "engine_settings", "new_boot_id"]

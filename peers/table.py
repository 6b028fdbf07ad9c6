"""The peer table: everything this node knows about other nodes, in one place.

Discovery, static configuration and the transport report into it; ``meshctl
peers`` and the router read from it. Plain data and methods, no I/O; time is
passed in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from identity import NodeId

from .announce import Announcement, ConflictDetected


class PeerState(enum.StrEnum):
    DISCOVERED = "discovered"  # heard of (mDNS or static), not connected
    CONNECTING = "connecting"
    CONNECTED = "connected"  # authenticated, trusted, hello done
    UNTRUSTED = "untrusted"  # authenticated, but not in our trust store (or we are not in theirs)
    INCOMPATIBLE = "incompatible"  # protocol version mismatch
    DOWN = "down"  # was reachable, is not now
    CONFLICT = "conflict"  # two live daemons present this id


class PeerSource(enum.StrEnum):
    MDNS = "mdns"
    STATIC = "static"
    INBOUND = "inbound"


@dataclass
class PeerRecord:
    node_id: NodeId
    name: str = ""
    state: PeerState = PeerState.DISCOVERED
    sources: set[PeerSource] = field(default_factory=set)
    addresses: list[tuple[str, int]] = field(default_factory=list)  # QUIC endpoints to dial, best first
    api_port: int | None = None
    boot_id: str = ""
    last_seen: float = 0.0
    rtt_ms: float | None = None
    models: list[dict[str, Any]] = field(default_factory=list)
    load: dict[str, Any] = field(default_factory=dict)
    node: dict[str, Any] = field(default_factory=dict)  # its signed node descriptor: OS, CPU, memory, accelerators
    split: dict[str, Any] = field(default_factory=dict)  # what it offers as a layer-split worker (docs/split.md)
    detail: str = ""  # why it is in its state (refusal code, error)

    def add_address(self, host: str, port: int) -> None:
        endpoint = (host, port)
        if endpoint in self.addresses:
            self.addresses.remove(endpoint)
        self.addresses.insert(0, endpoint)
        del self.addresses[8:]


@dataclass(frozen=True)
class StaticPeer:
    host: str
    port: int
    node_id: NodeId | None = None  # learnt on first connection


class PeerTable:
    def __init__(self, own_node_id: NodeId) -> None:
        self.own = own_node_id
        self._peers: dict[NodeId, PeerRecord] = {}
        self.static: list[StaticPeer] = []

    def get(self, node_id: NodeId) -> PeerRecord | None:
        return self._peers.get(node_id)

    def peers(self) -> list[PeerRecord]:
        return sorted(self._peers.values(), key=lambda p: (p.name.casefold(), p.node_id))

    def _record(self, node_id: NodeId) -> PeerRecord:
        record = self._peers.get(node_id)
        if record is None:
            record = self._peers[node_id] = PeerRecord(node_id)
        return record

    def heard(self, announcement: Announcement, now: float) -> PeerRecord:
        """A verified mDNS announcement."""
        record = self._record(announcement.node_id)
        record.name = announcement.name or record.name
        record.sources.add(PeerSource.MDNS)
        for host in reversed(announcement.addresses):
            record.add_address(host, announcement.quic_port)
        record.api_port = announcement.api_port
        if record.boot_id and record.boot_id != announcement.boot_id and record.state == PeerState.DOWN:
            record.state = PeerState.DISCOVERED  # it restarted: worth dialling again now
        record.boot_id = announcement.boot_id
        record.last_seen = now
        return record

    def conflict(self, event: ConflictDetected) -> None:
        if event.node_id == self.own:
            return  # reported by the daemon itself; our own id is not a peer
        record = self._record(event.node_id)
        record.state = PeerState.CONFLICT
        record.detail = "two live daemons present this id at " + ", ".join(event.addresses)

    def add_static(self, host: str, port: int) -> StaticPeer:
        peer = StaticPeer(host, port)
        if all((p.host, p.port) != (host, port) for p in self.static):
            self.static.append(peer)
        return peer

    def learn_static(self, host: str, port: int, node_id: NodeId, now: float) -> PeerRecord:
        """A static address turned out to be this node."""
        self.static = [StaticPeer(p.host, p.port, node_id) if (p.host, p.port) == (host, port) else p
                       for p in self.static]
        record = self._record(node_id)
        record.sources.add(PeerSource.STATIC)
        record.add_address(host, port)
        record.last_seen = now
        return record

    def inbound(self, node_id: NodeId, host: str, now: float) -> PeerRecord:
        record = self._record(node_id)
        record.sources.add(PeerSource.INBOUND)
        record.last_seen = now
        return record

    def set_state(self, node_id: NodeId, state: PeerState, detail: str = "") -> PeerRecord:
        record = self._record(node_id)
        if record.state == PeerState.CONFLICT and state != PeerState.CONFLICT:
            return record  # a conflict stays visible until an operator restarts us
        record.state, record.detail = state, detail
        return record


def describe(record: PeerRecord, roles: list[str]) -> dict[str, Any]:
    """The JSON shape of one peer for the admin API and ``meshctl peers --json``."""
    return {
        "node_id": str(record.node_id),
        "name": record.name,
        "state": record.state.value,
        "detail": record.detail,
        "sources": sorted(s.value for s in record.sources),
        "addresses": [f"{h}:{p}" for h, p in record.addresses],
        "api_port": record.api_port,
        "rtt_ms": None if record.rtt_ms is None else round(record.rtt_ms, 3),
        "models": record.models,
        "load": record.load,
        "node": record.node,
        "split": record.split,
        "roles": roles,
        "last_seen": record.last_seen,
    }


__all__ = ["PeerRecord", "PeerSource", "PeerState", "PeerTable", "StaticPeer", "describe"]

"""MeshService: owns the peer table and everything that updates it.

Discovery events and (later) QUIC connections report here; the admin API and
the router read the table. It is built by the daemon and holds no global state.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

from identity import NodeKey
from peers import TrustStore
from peers.announce import Announcement, ConflictDetected
from peers.discovery import DiscoveryConfig, DiscoveryEvent, ZeroconfDiscovery
from peers.table import PeerTable, describe

from ..config import MeshConfig
from ..logs import fields

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class LocalNode:
    key: NodeKey
    name: str
    api_port: int
    boot_id: str


def new_boot_id() -> str:
    return secrets.token_hex(8)


class MeshService:
    def __init__(self, config: MeshConfig, node: LocalNode, trust: TrustStore) -> None:
        self.config = config
        self.node = node
        self.trust = trust
        self.table = PeerTable(node.key.node_id)
        self.discovery: ZeroconfDiscovery | None = None
        self.conflicts: list[ConflictDetected] = []
        for peer in config.peers:
            self.table.add_static(peer.host, peer.port)

    @property
    def quic_port(self) -> int:
        return self.config.listen.port

    async def start(self) -> None:
        if self.config.discovery:
            host = self.config.listen.host
            self.discovery = ZeroconfDiscovery(
                self.node.key,
                DiscoveryConfig(
                    name=self.node.name, protocol_version=PROTOCOL_VERSION, quic_port=self.quic_port,
                    api_port=self.node.api_port, boot_id=self.node.boot_id,
                    addresses=() if host in ("0.0.0.0", "::") else (host,),
                ),
                self._discovered,
            )
            await self.discovery.start()

    async def stop(self) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
            self.discovery = None

    def _discovered(self, event: DiscoveryEvent) -> None:
        now = time.time()
        if isinstance(event, ConflictDetected):
            self.conflicts.append(event)
            self.table.conflict(event)
            return
        if isinstance(event, Announcement):
            known = self.table.get(event.node_id) is not None
            self.table.heard(event, now)
            if not known:
                log.info("peer discovered", extra=fields(node_id=str(event.node_id), name=event.name,
                                                         addresses=",".join(event.addresses)))

    def add_static_peer(self, host: str, port: int) -> None:
        self.table.add_static(host, port)

    def snapshot(self) -> dict:
        peers = [describe(p, sorted(r.value for r in self.trust.roles_of(p.node_id))) for p in self.table.peers()]
        static = [{"address": f"{p.host}:{p.port}", "node_id": str(p.node_id) if p.node_id else None}
                  for p in self.table.static]
        own_conflicts = [c for c in self.conflicts if c.node_id == self.node.key.node_id]
        return {
            "peers": peers,
            "static": static,
            "self_conflict": [{"addresses": list(c.addresses)} for c in own_conflicts],
        }


__all__ = ["LocalNode", "MeshService", "PROTOCOL_VERSION", "new_boot_id"]

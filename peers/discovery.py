"""LAN discovery with python-zeroconf's asyncio API: announce ourselves, hear others.

The thin asyncio layer over ``announce.py``: it registers this node's signed
announcement, re-signs it before it expires, browses for peers and hands each
verified ``Announcement`` (or rejection, or conflict) to a callback.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import ifaddr
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from identity import NodeKey, RecordSigner, ReplayGuard

from .announce import (
    RECORD_KIND,
    RECORD_TTL_S,
    SERVICE_TYPE,
    Announcement,
    AnnouncementRejected,
    ConflictDetected,
    ConflictDetector,
    announcement_properties,
    parse_announcement,
)

log = logging.getLogger(__name__)

DiscoveryEvent = Announcement | ConflictDetected


@dataclass(frozen=True)
class DiscoveryConfig:
    name: str
    protocol_version: int
    quic_port: int
    api_port: int
    boot_id: str
    # Addresses to announce and listen on; empty means every non-loopback IPv4 address.
    addresses: tuple[str, ...] = ()
    reannounce_s: float = RECORD_TTL_S / 3


def local_ipv4_addresses() -> tuple[str, ...]:
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                found.append(ip.ip)
    return tuple(sorted(set(found)))


class ZeroconfDiscovery:
    def __init__(self, key: NodeKey, config: DiscoveryConfig, on_event: Callable[[DiscoveryEvent], None]) -> None:
        self.key = key
        self.config = config
        self._on_event = on_event
        self._signer = RecordSigner(key, RECORD_KIND, ttl=RECORD_TTL_S)
        self._guard = ReplayGuard()
        self._conflicts = ConflictDetector(key.node_id, config.boot_id, int(time.time() * 1_000_000))
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task] = set()
        self._refresh: asyncio.Task | None = None
        self.rejected = 0

    def _service_info(self) -> AsyncServiceInfo:
        cfg = self.config
        addresses = cfg.addresses or local_ipv4_addresses()
        compact = self.key.node_id.compact
        # The boot id in the instance name lets two daemons with one (copied)
        # id both be heard, so we can report the conflict instead of mDNS
        # silently renaming one of them.
        instance = f"{compact[:16]}-{cfg.boot_id[:8]}.{SERVICE_TYPE}"
        props = announcement_properties(
            self._signer, self.key.node_id, name=cfg.name, protocol_version=cfg.protocol_version,
            quic_port=cfg.quic_port, api_port=cfg.api_port, boot_id=cfg.boot_id, now=time.time(),
        )
        return AsyncServiceInfo(
            SERVICE_TYPE, instance, port=cfg.quic_port, properties=props,
            addresses=[socket.inet_aton(a) for a in addresses],
            server=f"meshd-{compact[:12].lower()}-{cfg.boot_id[:6]}.local.",
        )

    async def start(self) -> None:
        interfaces = list(self.config.addresses) if self.config.addresses else InterfaceChoice.All
        self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        self._info = self._service_info()
        await self._zc.async_register_service(self._info, allow_name_change=True)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        self._refresh = asyncio.create_task(self._reannounce())
        log.info("discovery started", extra={"fields": {"service": self._info.name, "addresses": ",".join(
            self.config.addresses or local_ipv4_addresses())}})

    async def _reannounce(self) -> None:
        """Signed records expire; re-sign and update before they do."""
        while True:
            await asyncio.sleep(self.config.reannounce_s)
            if self._zc is None:
                return
            self._info = self._service_info()
            await self._zc.async_update_service(self._info)

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, 3000):
            return
        addresses = tuple(info.parsed_addresses(IPVersion.V4Only))
        now = time.time()
        try:
            announcement = parse_announcement(info.properties, addresses, now=now, replay_guard=self._guard)
        except AnnouncementRejected as exc:
            self.rejected += 1
            log.warning("ignored announcement", extra={"fields": {"instance": name, "reason": exc.code,
                                                                   "detail": str(exc)}})
            return
        if announcement is None:
            return
        conflict = self._conflicts.observe(announcement, now)
        if conflict is not None:
            log.error("node id conflict: two live daemons present one id", extra={"fields": {
                "node_id": str(conflict.node_id), "addresses": ",".join(conflict.addresses)}})
            self._on_event(conflict)
        if announcement.node_id != self.key.node_id:
            self._on_event(announcement)

    async def stop(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            if self._info is not None:
                await self._zc.async_unregister_service(self._info)
            await self._zc.async_close()
            self._zc = None


__all__ = ["DiscoveryConfig", "DiscoveryEvent", "ZeroconfDiscovery", "local_ipv4_addresses"]

"""A small lab of Linux network namespaces joined by a bridge, for multi-host tests.

Each host gets its own namespace with loopback and one veth (10.231.0.N/24) on a
bridge that lives in a separate hub namespace, so real multicast (mDNS) and real
UDP (QUIC) cross a real network stack. The test process reaches the hosts via
one more veth from its own namespace (10.231.0.254). Everything is removed at
the end, even after a failure. Needs root and iproute2; tests skip otherwise.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass

SUBNET = "10.231.0"
ROOT_IP = f"{SUBNET}.254"


class LabUnavailable(Exception):
    pass


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=20)


@dataclass
class Host:
    name: str
    ns: str
    ip: str

    def argv(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *command]


class NetnsLab:
    def __init__(self, hosts: int) -> None:
        if os.geteuid() != 0:
            raise LabUnavailable("network namespace tests need root")
        if shutil.which("ip") is None:
            raise LabUnavailable("iproute2 ('ip') is not installed")
        self.tag = secrets.token_hex(3)
        self.hub = f"mh-{self.tag}"
        self.hosts = [Host(f"h{i}", f"mn-{self.tag}-{i}", f"{SUBNET}.{i + 1}") for i in range(hosts)]
        self._root_link = f"mr{self.tag}"

    def __enter__(self) -> NetnsLab:
        try:
            self._create()
        except (subprocess.CalledProcessError, OSError) as exc:
            self.destroy()
            detail = getattr(exc, "stderr", "") or str(exc)
            raise LabUnavailable(f"cannot create network namespaces: {detail.strip()}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def _create(self) -> None:
        subprocess.run(["ip", "netns", "add", self.hub], check=True, capture_output=True, text=True)
        _ip("link", "add", "br0", "type", "bridge", ns=self.hub)
        # No IGMP querier on this bridge: snooping would eventually drop mDNS.
        _ip("link", "set", "br0", "type", "bridge", "mcast_snooping", "0", ns=self.hub)
        _ip("link", "set", "br0", "up", ns=self.hub)
        for index, host in enumerate(self.hosts):
            subprocess.run(["ip", "netns", "add", host.ns], check=True, capture_output=True, text=True)
            _ip("link", "set", "lo", "up", ns=host.ns)
            _ip("link", "add", "eth0", "netns", host.ns, "type", "veth", "peer", "name", f"p{index}",
                "netns", self.hub)
            self._attach(f"p{index}")
            _ip("addr", "add", f"{host.ip}/24", "dev", "eth0", ns=host.ns)
            _ip("link", "set", "eth0", "up", ns=host.ns)
            _ip("link", "set", "eth0", "multicast", "on", ns=host.ns)
            _ip("route", "add", "default", "dev", "eth0", ns=host.ns)
        _ip("link", "add", self._root_link, "type", "veth", "peer", "name", "proot", "netns", self.hub)
        self._attach("proot")
        _ip("addr", "add", f"{ROOT_IP}/24", "dev", self._root_link)
        _ip("link", "set", self._root_link, "up")

    def _attach(self, port: str) -> None:
        _ip("link", "set", port, "master", "br0", ns=self.hub)
        _ip("link", "set", port, "up", ns=self.hub)

    def destroy(self) -> None:
        _ip("link", "del", self._root_link, check=False)
        for ns in [h.ns for h in self.hosts] + [self.hub]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=20)

    def cut(self, host: Host) -> None:
        """Unplug a host's cable (its processes keep running)."""
        _ip("link", "set", "eth0", "down", ns=host.ns)

    def plug(self, host: Host) -> None:
        _ip("link", "set", "eth0", "up", ns=host.ns)
        _ip("route", "replace", "default", "dev", "eth0", ns=host.ns)


__all__ = ["Host", "LabUnavailable", "NetnsLab", "ROOT_IP"]

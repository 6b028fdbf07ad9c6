"""Signed capability announcements: what a node has and how busy it is.

The payload is a plain dict (it travels as msgpack inside a signed record):
node descriptor (OS, CPU, memory, accelerators), backends, model identity
descriptors and live load. Verification is the identity library's, with a
replay guard so an old announcement cannot be played back.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

from identity import NodeId, NodeKey, RecordSigner, ReplayGuard, verify_record

CAPABILITIES_KIND = "meshd.capabilities"
CAPABILITIES_TTL_S = 300.0


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def node_descriptor() -> dict[str, Any]:
    return {
        "os": platform.system().lower(),
        "arch": platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "accelerators": [],  # filled by backends that find one (CUDA, Metal)
        "python": platform.python_version(),
    }


class CapabilityAnnouncer:
    """Signs the current capabilities, re-signing only when something changed."""

    def __init__(self, key: NodeKey, collect: Callable[[], dict[str, Any]]) -> None:
        self._signer = RecordSigner(key, CAPABILITIES_KIND, ttl=CAPABILITIES_TTL_S)
        self._collect = collect
        self._last_payload: dict[str, Any] | None = None
        self._last_record: bytes | None = None
        self._signed_at = 0.0

    def current(self, now: float | None = None) -> tuple[bytes, bool]:
        """(signed record, changed since last call)."""
        now = time.time() if now is None else now
        payload = self._collect()
        stale = now - self._signed_at > CAPABILITIES_TTL_S / 2
        if payload == self._last_payload and self._last_record is not None and not stale:
            return self._last_record, False
        self._last_payload, self._signed_at = payload, now
        self._last_record = self._signer.sign(payload, now=now)
        return self._last_record, True


class CapabilityVerifier:
    def __init__(self) -> None:
        self._guard = ReplayGuard()

    def __call__(self, signed: bytes, peer_node_id: str, now: float) -> dict[str, Any]:
        # The session passes its monotonic clock; record expiry is wall-clock.
        record = verify_record(signed, kind=CAPABILITIES_KIND, now=time.time(), signer=NodeId.parse(peer_node_id))
        if not self._guard.accept(record, now=time.time()):
            return dict(record.payload) if isinstance(record.payload, dict) else {}
        if not isinstance(record.payload, dict):
            raise ValueError("capability payload is not a map")
        return dict(record.payload)


__all__ = ["CAPABILITIES_KIND", "CapabilityAnnouncer", "CapabilityVerifier", "node_descriptor"]

"""Signed zeroconf announcements: build the TXT properties, check what we hear.

Pure functions plus the conflict detector; no sockets, time passed in. A TXT
string holds at most 255 bytes, so the base64 signed record is split across
``r0``, ``r1``, ... keys. Only the signed payload is believed: the plain
``id``/``qp``/``ap`` keys are there for people browsing with avahi-browse.
Addresses come from the mDNS A records and are not signed; a forged address
only makes us dial a host that then fails the TLS node-id check.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from identity import NodeId, RecordError, RecordSigner, ReplayGuard, verify_record

SERVICE_TYPE = "_meshd._udp.local."
RECORD_KIND = "meshd.announce"
RECORD_TTL_S = 600.0
_CHUNK = 200


class AnnouncementRejected(Exception):
    """A heard announcement we will not believe; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Announcement:
    node_id: NodeId
    name: str
    protocol_version: int
    quic_port: int
    api_port: int
    boot_id: str
    seq: int
    addresses: tuple[str, ...] = ()


def announcement_properties(signer: RecordSigner, node_id: NodeId, *, name: str, protocol_version: int,
                            quic_port: int, api_port: int, boot_id: str, now: float) -> dict[str, str]:
    payload = {"name": name, "pv": protocol_version, "qp": quic_port, "ap": api_port, "boot": boot_id}
    record = base64.b64encode(signer.sign(payload, now=now)).decode("ascii")
    props = {"id": str(node_id), "pv": str(protocol_version), "qp": str(quic_port), "ap": str(api_port)}
    for index in range(0, len(record), _CHUNK):
        props[f"r{index // _CHUNK}"] = record[index : index + _CHUNK]
    return props


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value or "")


def _record_bytes(props: dict[str, str]) -> bytes:
    chunks = []
    index = 0
    while f"r{index}" in props:
        chunks.append(props[f"r{index}"])
        index += 1
    if not chunks:
        raise AnnouncementRejected("unsigned", "the announcement carries no signed record")
    try:
        return base64.b64decode("".join(chunks), validate=True)
    except ValueError:
        raise AnnouncementRejected("malformed", "the signed record is not valid base64") from None


def _port(payload: dict[str, Any], key: str) -> int:
    value = payload.get(key)
    if not isinstance(value, int) or not 0 < value < 65536:
        raise AnnouncementRejected("malformed", f"signed payload field {key!r} is not a port")
    return value


def parse_announcement(raw_props: dict[Any, Any], addresses: tuple[str, ...], *, now: float,
                       replay_guard: ReplayGuard) -> Announcement | None:
    """Verify one heard announcement. None means a harmless re-delivery of the newest one."""
    props = {_text(k): _text(v) for k, v in raw_props.items()}
    data = _record_bytes(props)
    try:
        claimed = NodeId.parse(props.get("id", ""))
    except ValueError:
        raise AnnouncementRejected("malformed", f"bad node id {props.get('id')!r}") from None
    try:
        record = verify_record(data, kind=RECORD_KIND, now=now, signer=claimed)
        if not replay_guard.accept(record, now=now):
            return None
    except RecordError as exc:
        raise AnnouncementRejected(exc.code, str(exc)) from None
    payload = record.payload if isinstance(record.payload, dict) else {}
    if not isinstance(payload.get("pv"), int) or not isinstance(payload.get("boot"), str):
        raise AnnouncementRejected("malformed", "signed payload lacks protocol version or boot id")
    return Announcement(
        node_id=record.node_id,
        name=str(payload.get("name", ""))[:64],
        protocol_version=payload["pv"],
        quic_port=_port(payload, "qp"),
        api_port=_port(payload, "ap"),
        boot_id=payload["boot"],
        seq=record.seq,
        addresses=addresses,
    )


@dataclass(frozen=True)
class ConflictDetected:
    """Two live daemons present one node id: a copied state dir, not a peer to merge."""

    node_id: NodeId
    boot_ids: tuple[str, str]
    addresses: tuple[str, ...]


class ConflictDetector:
    """Tells a copied state dir (two live daemons, one id) from a restarted node.

    A restart changes a node's boot id once; two live daemons make the boot ids
    alternate, each with a fresh, newer signed record. So a boot id that comes
    back after being superseded, while still fresh, is a conflict. Our own id
    heard with another boot id in a record newer than our own start is a
    conflict at once (an older one is our previous life, still in caches).
    """

    def __init__(self, own_node_id: NodeId, own_boot_id: str, own_start_seq: int,
                 fresh_s: float = RECORD_TTL_S) -> None:
        self._own = (own_node_id, own_boot_id, own_start_seq)
        self._current: dict[NodeId, tuple[str, tuple[str, ...]]] = {}
        self._retired: dict[NodeId, dict[str, float]] = {}
        self._fresh_s = fresh_s

    def observe(self, announcement: Announcement, now: float) -> ConflictDetected | None:
        node_id, boot = announcement.node_id, announcement.boot_id
        if node_id == self._own[0]:
            if boot == self._own[1] or announcement.seq < self._own[2]:
                return None
            return ConflictDetected(node_id, (self._own[1], boot), announcement.addresses)
        current = self._current.get(node_id)
        if current is not None and current[0] == boot:
            return None
        retired = self._retired.setdefault(node_id, {})
        came_back = boot in retired and now - retired[boot] < self._fresh_s
        if current is not None:
            retired[current[0]] = now
        self._current[node_id] = (boot, announcement.addresses)
        if came_back and current is not None:
            return ConflictDetected(node_id, (current[0], boot), tuple(sorted({*current[1], *announcement.addresses})))
        return None


__all__ = [
    "RECORD_KIND",
    "SERVICE_TYPE",
    "Announcement",
    "AnnouncementRejected",
    "ConflictDetected",
    "ConflictDetector",
    "announcement_properties",
    "parse_announcement",
]

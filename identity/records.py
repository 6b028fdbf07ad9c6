"""Signed records: small msgpack statements a node makes about itself.

Used for zeroconf announcements and capability announcements: anything a peer
must be able to attribute to a node id, check for freshness, and refuse to
accept twice. Pure functions plus one small state object (``ReplayGuard``);
time is always passed in (``now``, seconds since the Unix epoch), never read.

Wire form (docs/identity.md has the field table)::

    record = msgpack [body: bin, signature: bin(64)]
    body   = msgpack {"v": 1, "k": kind, "n": node id, "pk": public key,
                      "iat": ms, "exp": ms, "seq": uint, "p": payload}
    signature = Ed25519(node key, b"meshd signed record v1\\0" + body)

The signature covers the body bytes exactly as sent, so verification never
depends on re-encoding. The record carries the 32-byte public key, and the
node id must be that key's fingerprint, so a record is verifiable from the
node id alone.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import (
    InvalidNodeId,
    RecordExpired,
    RecordKeyMismatch,
    RecordKindMismatch,
    RecordLifetimeTooLong,
    RecordMalformed,
    RecordNotYetValid,
    RecordReplayed,
    RecordSignatureInvalid,
    RecordSignerMismatch,
)
from .keys import SIGNATURE_LENGTH, NodeKey, verify_signature
from .nodeid import PUBLIC_KEY_LENGTH, NodeId

RECORD_VERSION = 1
SIGNING_CONTEXT = b"meshd signed record v1\x00"
DEFAULT_MAX_SKEW = 60.0
DEFAULT_MAX_LIFETIME = 24 * 3600.0
MAX_RECORD_BYTES = 64 * 1024
_MAX_SEQ = 2**64 - 1
_BODY_KEYS = frozenset({"v", "k", "n", "pk", "iat", "exp", "seq", "p"})


@dataclass(frozen=True, slots=True)
class SignedRecord:
    """A decoded record. Only ``verify_record`` results are authentic."""

    kind: str
    node_id: NodeId
    public_key: bytes
    issued_at: float
    expires_at: float
    seq: int
    payload: Any
    body: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    def encode(self) -> bytes:
        data: bytes = msgpack.packb([self.body, self.signature], use_bin_type=True)
        return data


def sign_record(key: NodeKey, kind: str, payload: Any, *, now: float, ttl: float, seq: int) -> SignedRecord:
    """Sign ``payload`` as a record of ``kind`` valid from ``now`` for ``ttl`` seconds.

    ``payload`` must be msgpack-serializable (``TypeError`` otherwise).
    """
    if not kind:
        raise ValueError("record kind must be a non-empty string")
    if ttl <= 0:
        raise ValueError(f"record ttl must be positive, got {ttl}")
    if not 0 <= seq <= _MAX_SEQ:
        raise ValueError(f"record seq must fit in 64 bits, got {seq}")
    issued_ms = int(now * 1000)
    expires_ms = issued_ms + max(1, round(ttl * 1000))
    body = msgpack.packb(
        {
            "v": RECORD_VERSION,
            "k": kind,
            "n": key.node_id.compact,
            "pk": key.public_key,
            "iat": issued_ms,
            "exp": expires_ms,
            "seq": seq,
            "p": payload,
        },
        use_bin_type=True,
    )
    signature = key.sign(SIGNING_CONTEXT + body)
    return SignedRecord(
        kind=kind,
        node_id=key.node_id,
        public_key=key.public_key,
        issued_at=issued_ms / 1000,
        expires_at=expires_ms / 1000,
        seq=seq,
        payload=msgpack.unpackb(body, raw=False)["p"],
        body=body,
        signature=signature,
    )


def decode_unverified(data: bytes) -> SignedRecord:
    """Parse a record's structure without checking anything else (logging, debugging).

    Raises ``RecordMalformed``. Never act on the result: use ``verify_record``.
    """
    if len(data) > MAX_RECORD_BYTES:
        raise RecordMalformed(f"record is {len(data)} bytes; the limit is {MAX_RECORD_BYTES}")
    envelope = _unpack(bytes(data), "record")
    if not (isinstance(envelope, list) and len(envelope) == 2):
        raise RecordMalformed("record is not a [body, signature] pair")
    body, signature = envelope
    if not isinstance(body, bytes) or not isinstance(signature, bytes):
        raise RecordMalformed("record body and signature must be binary")
    if len(signature) != SIGNATURE_LENGTH:
        raise RecordMalformed(f"record signature has {len(signature)} bytes, not {SIGNATURE_LENGTH}")
    fields = _unpack(body, "record body")
    if not isinstance(fields, dict) or set(fields) != _BODY_KEYS:
        raise RecordMalformed("record body does not have exactly the fields v, k, n, pk, iat, exp, seq, p")
    if _int(fields["v"]) != RECORD_VERSION:
        raise RecordMalformed(f"unsupported record version {fields['v']!r}")
    kind, node_text, public_key = fields["k"], fields["n"], fields["pk"]
    if not isinstance(kind, str) or not kind:
        raise RecordMalformed("record kind must be a non-empty string")
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_LENGTH:
        raise RecordMalformed("record public key must be 32 bytes")
    if not isinstance(node_text, str):
        raise RecordMalformed("record node id must be a string")
    try:
        node_id = NodeId(node_text)
    except InvalidNodeId as exc:
        raise RecordMalformed(f"record node id is invalid: {exc.message}") from exc
    issued_ms, expires_ms, seq = _int(fields["iat"]), _int(fields["exp"]), _int(fields["seq"])
    if issued_ms is None or expires_ms is None or seq is None or not 0 <= seq <= _MAX_SEQ:
        raise RecordMalformed("record times and sequence must be integers")
    if expires_ms <= issued_ms:
        raise RecordMalformed("record expires before it is issued")
    return SignedRecord(
        kind=kind,
        node_id=node_id,
        public_key=public_key,
        issued_at=issued_ms / 1000,
        expires_at=expires_ms / 1000,
        seq=seq,
        payload=fields["p"],
        body=body,
        signature=signature,
    )


def verify_record(
    data: bytes,
    *,
    kind: str,
    now: float,
    signer: NodeId | None = None,
    max_skew: float = DEFAULT_MAX_SKEW,
    max_lifetime: float = DEFAULT_MAX_LIFETIME,
    replay_guard: ReplayGuard | None = None,
) -> SignedRecord:
    """Decode and fully verify a record; raise a ``RecordError`` subclass if anything is off.

    Checks, in order: structure, public key hashes to the node id, signature,
    kind, expected signer (if given), lifetime, not issued beyond ``max_skew``
    in the future, not expired (with the same skew), and finally the replay
    guard (if given). The guard only learns from records that passed every
    other check. An exact re-delivery of the newest record passes; use
    ``ReplayGuard.accept`` directly to tell it apart.
    """
    record = decode_unverified(data)
    if not record.node_id.matches_public_key(record.public_key):
        raise RecordKeyMismatch(f"record claims {record.node_id}, but its public key has another id")
    if not verify_signature(record.public_key, SIGNING_CONTEXT + record.body, record.signature):
        raise RecordSignatureInvalid(f"record signature from {record.node_id} does not verify")
    if record.kind != kind:
        raise RecordKindMismatch(f"expected a {kind!r} record, got {record.kind!r}")
    if signer is not None and record.node_id != signer:
        raise RecordSignerMismatch(f"record is signed by {record.node_id}, expected {signer}")
    if record.expires_at - record.issued_at > max_lifetime:
        raise RecordLifetimeTooLong(
            f"record is valid for {record.expires_at - record.issued_at:.0f} s; the limit is {max_lifetime:.0f} s"
        )
    if record.issued_at > now + max_skew:
        raise RecordNotYetValid(
            f"record from {record.node_id} is issued {record.issued_at - now:.1f} s in the future "
            f"(allowed skew {max_skew:.0f} s)"
        )
    if now > record.expires_at + max_skew:
        raise RecordExpired(f"record from {record.node_id} expired {now - record.expires_at:.1f} s ago")
    if replay_guard is not None:
        replay_guard.accept(record, now=now)
    return record


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise RecordMalformed(f"{what} is not valid msgpack ({type(exc).__name__})") from exc


def _int(value: Any) -> int | None:
    # bool is an int subclass in Python, but not a number on the wire.
    return value if type(value) is int else None


@dataclass(slots=True)
class _Latest:
    seq: int
    body_hash: bytes
    expires_at: float


class ReplayGuard:
    """Remembers the newest sequence number per (node id, kind).

    ``accept`` returns True for a newer record, False for an exact re-delivery
    of the newest one (mDNS repeats itself), and raises ``RecordReplayed`` for
    an older sequence number or for a different record under the newest one.

    An older sequence is accepted again once the newest record known for that
    node has expired: this lets a node whose clock stepped back recover after
    one lifetime, while a replay inside the lifetime is still refused.

    Memory is bounded by ``max_entries``: the least recently updated entries
    are dropped first (announcement records are short-lived, so a dropped
    entry's older records have normally expired too).
    """

    def __init__(self, max_entries: int = 4096) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._latest: OrderedDict[tuple[NodeId, str], _Latest] = OrderedDict()

    def accept(self, record: SignedRecord, *, now: float) -> bool:
        key = (record.node_id, record.kind)
        body_hash = hashlib.sha256(record.body).digest()
        latest = self._latest.get(key)
        if latest is not None and now <= latest.expires_at:
            if record.seq < latest.seq:
                raise RecordReplayed(
                    f"{record.kind!r} record seq {record.seq} from {record.node_id} is older than seq {latest.seq}"
                )
            if record.seq == latest.seq:
                if body_hash == latest.body_hash:
                    return False
                raise RecordReplayed(
                    f"{record.kind!r} record seq {record.seq} from {record.node_id} reuses a sequence number"
                )
        self._latest[key] = _Latest(record.seq, body_hash, record.expires_at)
        self._latest.move_to_end(key)
        while len(self._latest) > self.max_entries:
            self._latest.popitem(last=False)
        return True

    def latest_seq(self, node_id: NodeId, kind: str) -> int | None:
        latest = self._latest.get((node_id, kind))
        return None if latest is None else latest.seq

    def forget(self, node_id: NodeId) -> None:
        """Drop everything known about a node (e.g. after it is revoked)."""
        for key in [k for k in self._latest if k[0] == node_id]:
            del self._latest[key]

    def __len__(self) -> int:
        return len(self._latest)


class RecordSigner:
    """Signs successive records of one kind with strictly increasing sequence numbers.

    The sequence is ``max(previous + 1, now in microseconds)``, so it keeps
    increasing across restarts without being stored, as long as the clock does
    not step backwards by more than a restart takes.
    """

    def __init__(self, key: NodeKey, kind: str, *, ttl: float) -> None:
        self.key = key
        self.kind = kind
        self.ttl = ttl
        self._last_seq = -1

    def sign(self, payload: Any, *, now: float) -> bytes:
        seq = max(self._last_seq + 1, int(now * 1_000_000))
        self._last_seq = seq
        return sign_record(self.key, self.kind, payload, now=now, ttl=self.ttl, seq=seq).encode()


__all__ = [
    "DEFAULT_MAX_LIFETIME",
    "DEFAULT_MAX_SKEW",
    "MAX_RECORD_BYTES",
    "RECORD_VERSION",
    "SIGNING_CONTEXT",
    "RecordSigner",
    "ReplayGuard",
    "SignedRecord",
    "decode_unverified",
    "sign_record",
    "verify_record",
]

"""The entry node's signed verdict on a forwarded request.

The node that receives a request from a client (the *entry node*)
authenticates the key, authorizes the model and data class and charges the
quota. When it forwards the request to a peer, it sends along a verdict: who
asked (key id, tenant), what for (model, data class, request id), for which
peer (``audience``), signed with its node key as an identity signed record of
kind ``meshd.verdict`` with a short lifetime. The serving peer verifies the
signature against the node id of the connection it arrived on, the audience
and freshness, and then serves without authenticating a key or charging a
quota of its own. Whether that node may send requests at all (the ``use``
trust role) is checked by the caller, before this.

Errors are ``InvalidVerdict`` (403) with a code per cause:
``verdict_malformed``, ``verdict_signature_invalid``,
``verdict_signer_mismatch``, ``verdict_wrong_audience``, ``verdict_expired``,
``verdict_not_yet_valid``, ``verdict_lifetime_too_long``, ``verdict_replayed``.
"""

from __future__ import annotations

import heapq
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from identity.errors import (
    RecordError,
    RecordExpired,
    RecordKeyMismatch,
    RecordLifetimeTooLong,
    RecordNotYetValid,
    RecordSignatureInvalid,
    RecordSignerMismatch,
)
from identity.keys import NodeKey
from identity.nodeid import NodeId
from identity.records import SignedRecord, sign_record, verify_record

from ..errors import InvalidVerdict
from .errors import InvalidKeySpec
from .model import DataClass, check_key_id, check_tenant_name

logger = logging.getLogger(__name__)

VERDICT_KIND = "meshd.verdict"
DEFAULT_TTL = 30.0  # long enough for a failover hop; checked once, when the request arrives
DEFAULT_MAX_SKEW = 10.0  # NTP-synced LAN clocks agree far better than this
DEFAULT_MAX_LIFETIME = 300.0
MAX_FIELD_LENGTH = 256
_FIELDS = {"rid", "kid", "ten", "mdl", "dc", "aud"}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the entry node decided. ``entry_node``, ``issued_at`` and ``expires_at`` are set by signing."""

    request_id: str
    key_id: str
    tenant: str
    model: str
    data_class: DataClass
    audience: NodeId | None = None  # the peer it is meant for; None = any (avoid)
    entry_node: NodeId | None = None
    issued_at: float | None = None
    expires_at: float | None = None

    def payload(self) -> dict[str, Any]:
        return {
            "rid": self.request_id,
            "kid": self.key_id,
            "ten": self.tenant,
            "mdl": self.model,
            "dc": self.data_class.value,
            "aud": None if self.audience is None else self.audience.compact,
        }


def sign_verdict(node_key: NodeKey, verdict: Verdict, now: float, *, ttl: float = DEFAULT_TTL) -> bytes:
    """The verdict as a signed record (bytes for the request frame), valid for ``ttl`` seconds from ``now``."""
    _check_payload(verdict.payload())
    # The sequence number is a random nonce: verdicts are not ordered, and two
    # verdicts for retries of one request must still differ (replay guard).
    record = sign_record(node_key, VERDICT_KIND, verdict.payload(), now=now, ttl=ttl, seq=secrets.randbits(63))
    return record.encode()


def verify_verdict(
    data: bytes,
    expected_signer: NodeId,
    now: float,
    *,
    audience: NodeId | None = None,
    max_skew: float = DEFAULT_MAX_SKEW,
    max_lifetime: float = DEFAULT_MAX_LIFETIME,
    replay_guard: VerdictReplayGuard | None = None,
) -> Verdict:
    """Check a verdict from ``expected_signer`` (the authenticated peer it came from) and decode it.

    ``audience`` is this node's id: a verdict issued for another node is
    refused. A verdict is accepted from ``max_skew`` seconds before its issue
    time until ``max_skew`` seconds after its expiry.
    """
    try:
        record = verify_record(
            bytes(data), kind=VERDICT_KIND, now=now, signer=expected_signer,
            max_skew=max_skew, max_lifetime=max_lifetime,
        )
    except RecordError as exc:
        raise InvalidVerdict(f"forwarded request verdict refused: {exc.message}", code=_code(exc)) from exc
    verdict = _decode(record)
    if audience is not None and verdict.audience != audience:
        raise InvalidVerdict(
            f"verdict from {record.node_id} was issued for {verdict.audience or 'any node'}, not for {audience}",
            code="verdict_wrong_audience",
        )
    if replay_guard is not None:
        replay_guard.accept(record, now=now, max_skew=max_skew)
    return verdict


def _code(exc: RecordError) -> str:
    if isinstance(exc, RecordExpired):
        return "verdict_expired"
    if isinstance(exc, RecordNotYetValid):
        return "verdict_not_yet_valid"
    if isinstance(exc, RecordSignerMismatch):
        return "verdict_signer_mismatch"
    if isinstance(exc, (RecordSignatureInvalid, RecordKeyMismatch)):
        return "verdict_signature_invalid"
    if isinstance(exc, RecordLifetimeTooLong):
        return "verdict_lifetime_too_long"
    return "verdict_malformed"


def _check_payload(payload: Any) -> None:
    if not isinstance(payload, dict) or set(payload) != _FIELDS:
        raise InvalidKeySpec(f"a verdict payload has exactly the fields {sorted(_FIELDS)}")
    for name in ("rid", "mdl"):
        value = payload[name]
        if not isinstance(value, str) or not value or len(value) > MAX_FIELD_LENGTH:
            raise InvalidKeySpec(f"verdict field {name!r} must be a string of 1-{MAX_FIELD_LENGTH} characters")
    check_key_id(payload["kid"])
    check_tenant_name(payload["ten"])
    DataClass.parse(payload["dc"])
    if payload["aud"] is not None:
        NodeId(payload["aud"])


def _decode(record: SignedRecord) -> Verdict:
    payload = record.payload
    try:
        _check_payload(payload)
        audience = None if payload["aud"] is None else NodeId(payload["aud"])
    except (InvalidKeySpec, ValueError) as exc:
        detail = exc.message if isinstance(exc, InvalidKeySpec) else str(exc)
        raise InvalidVerdict(f"verdict from {record.node_id} is malformed: {detail}", code="verdict_malformed") from exc
    return Verdict(
        request_id=payload["rid"],
        key_id=payload["kid"],
        tenant=payload["ten"],
        model=payload["mdl"],
        data_class=DataClass(payload["dc"]),
        audience=audience,
        entry_node=record.node_id,
        issued_at=record.issued_at,
        expires_at=record.expires_at,
    )


class VerdictReplayGuard:
    """Refuses a verdict seen before, for as long as it could still be accepted.

    Entries are forgotten once expired (plus skew). Memory is bounded by
    ``max_entries``; beyond it the entries closest to expiry are dropped
    first, and that is logged, since a dropped entry could be replayed.
    """

    def __init__(self, max_entries: int = 65536) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._seen: set[bytes] = set()
        self._expiry: list[tuple[float, bytes]] = []  # heap by forget-time

    def accept(self, record: SignedRecord, *, now: float, max_skew: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            self._seen.discard(heapq.heappop(self._expiry)[1])
        token = record.signature  # Ed25519 signatures are deterministic: same record, same bytes
        if token in self._seen:
            raise InvalidVerdict(
                f"verdict {record.seq} from {record.node_id} was already used", code="verdict_replayed"
            )
        if len(self._seen) >= self.max_entries:
            self._seen.discard(heapq.heappop(self._expiry)[1])
            logger.warning("verdict replay guard full; dropping the oldest entry",
                           extra={"fields": {"max_entries": self.max_entries}})
        self._seen.add(token)
        heapq.heappush(self._expiry, (record.expires_at + max_skew, token))

    def __len__(self) -> int:
        return len(self._seen)


__all__ = [
    "DEFAULT_MAX_SKEW",
    "DEFAULT_TTL",
    "VERDICT_KIND",
    "Verdict",
    "VerdictReplayGuard",
    "sign_verdict",
    "verify_verdict",
]

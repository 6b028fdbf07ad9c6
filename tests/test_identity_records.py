"""Signed records: every rejection reason, replay protection, and properties over payloads."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from identity import (
    NodeKey,
    RecordError,
    RecordExpired,
    RecordKeyMismatch,
    RecordKindMismatch,
    RecordLifetimeTooLong,
    RecordMalformed,
    RecordNotYetValid,
    RecordReplayed,
    RecordSignatureInvalid,
    RecordSigner,
    RecordSignerMismatch,
    ReplayGuard,
    decode_unverified,
    sign_record,
    verify_record,
)
from identity.records import MAX_RECORD_BYTES, SIGNING_CONTEXT

NOW = 1_750_000_000.0
KEY = NodeKey.from_seed(b"\x11" * 32)
OTHER = NodeKey.from_seed(b"\x22" * 32)


_DEFAULT_PAYLOAD = {"port": 7443, "models": ["smollm2"]}


def _record(
    key: NodeKey = KEY,
    *,
    kind: str = "announce",
    payload: object = _DEFAULT_PAYLOAD,
    now: float = NOW,
    ttl: float = 60.0,
    seq: int = 1,
) -> bytes:
    return sign_record(key, kind, payload, now=now, ttl=ttl, seq=seq).encode()


def _resign(body_fields: dict[str, object], key: NodeKey) -> bytes:
    """A record with an arbitrary body, correctly signed by ``key``."""
    body = msgpack.packb(body_fields, use_bin_type=True)
    return msgpack.packb([body, key.sign(SIGNING_CONTEXT + body)], use_bin_type=True)


def _fields(data: bytes) -> dict[str, object]:
    body, _ = msgpack.unpackb(data)
    return msgpack.unpackb(body)


def test_round_trip() -> None:
    data = _record(payload={"a": [1, 2, 3], "b": b"\x00\x01", "c": None})
    record = verify_record(data, kind="announce", now=NOW + 1)
    assert record.node_id == KEY.node_id
    assert record.public_key == KEY.public_key
    assert record.payload == {"a": [1, 2, 3], "b": b"\x00\x01", "c": None}
    assert record.issued_at == NOW and record.expires_at == NOW + 60
    assert record.seq == 1 and record.kind == "announce"
    assert record.encode() == data


def test_wrong_key_signature_is_rejected() -> None:
    # Body claims KEY's identity but the signature is OTHER's.
    fields = _fields(_record())
    body = msgpack.packb(fields, use_bin_type=True)
    forged = msgpack.packb([body, OTHER.sign(SIGNING_CONTEXT + body)], use_bin_type=True)
    with pytest.raises(RecordSignatureInvalid):
        verify_record(forged, kind="announce", now=NOW)


def test_substituted_public_key_is_rejected() -> None:
    # OTHER signs a body that carries its own key but claims KEY's node id.
    fields = _fields(_record())
    fields["pk"] = OTHER.public_key
    with pytest.raises(RecordKeyMismatch):
        verify_record(_resign(fields, OTHER), kind="announce", now=NOW)


def test_consistent_identity_swap_is_caught_by_expected_signer() -> None:
    data = _record(OTHER)
    assert verify_record(data, kind="announce", now=NOW).node_id == OTHER.node_id
    with pytest.raises(RecordSignerMismatch):
        verify_record(data, kind="announce", now=NOW, signer=KEY.node_id)


def test_signature_without_the_domain_prefix_is_rejected() -> None:
    fields = _fields(_record())
    body = msgpack.packb(fields, use_bin_type=True)
    bare = msgpack.packb([body, KEY.sign(body)], use_bin_type=True)
    with pytest.raises(RecordSignatureInvalid):
        verify_record(bare, kind="announce", now=NOW)


@pytest.mark.parametrize("index", range(0, 400, 7))
def test_tampered_byte_is_rejected(index: int) -> None:
    data = bytearray(_record())
    index %= len(data)
    data[index] ^= 0x5A
    with pytest.raises(RecordError):
        verify_record(bytes(data), kind="announce", now=NOW)


def test_expired_record_is_rejected_after_the_skew_allowance() -> None:
    data = _record(ttl=60)
    verify_record(data, kind="announce", now=NOW + 60 + 10, max_skew=30)
    with pytest.raises(RecordExpired):
        verify_record(data, kind="announce", now=NOW + 60 + 31, max_skew=30)


def test_record_from_the_future_is_rejected_beyond_the_skew_allowance() -> None:
    data = _record(now=NOW + 100)
    verify_record(data, kind="announce", now=NOW + 71, max_skew=30)
    with pytest.raises(RecordNotYetValid):
        verify_record(data, kind="announce", now=NOW + 69, max_skew=30)


def test_overlong_lifetime_is_rejected() -> None:
    data = _record(ttl=7200)
    verify_record(data, kind="announce", now=NOW, max_lifetime=7200)
    with pytest.raises(RecordLifetimeTooLong):
        verify_record(data, kind="announce", now=NOW, max_lifetime=3600)


def test_wrong_kind_is_rejected() -> None:
    with pytest.raises(RecordKindMismatch):
        verify_record(_record(kind="capabilities"), kind="announce", now=NOW)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.update(v=2), "version"),
        (lambda f: f.pop("seq"), "exactly the fields"),
        (lambda f: f.update(extra=1), "exactly the fields"),
        (lambda f: f.update(seq=-1), "integers"),
        (lambda f: f.update(seq=True), "integers"),
        (lambda f: f.update(iat=1.5), "integers"),
        (lambda f: f.update(exp=f["iat"]), "expires before"),
        (lambda f: f.update(k=""), "kind"),
        (lambda f: f.update(pk=b"short"), "public key"),
        (lambda f: f.update(n="MESHD-NOPE"), "node id"),
    ],
)
def test_malformed_bodies_are_rejected_even_when_signed(mutate: object, message: str) -> None:
    fields = _fields(_record())
    mutate(fields)  # type: ignore[operator]
    with pytest.raises(RecordMalformed, match=message):
        verify_record(_resign(fields, KEY), kind="announce", now=NOW)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb({"body": b"", "sig": b""}),
        msgpack.packb([b"x"]),
        msgpack.packb([b"x", b"y" * 64, b"z"]),
        msgpack.packb(["text", b"y" * 64]),
        msgpack.packb([b"x", b"y" * 63]),
        msgpack.packb([b"\x93\x01\x02\x03", b"y" * 64]),
        b"\x92" + b"\xc4\x00",  # truncated
    ],
)
def test_malformed_envelopes_are_rejected(data: bytes) -> None:
    with pytest.raises(RecordMalformed):
        decode_unverified(data)


def test_oversized_record_is_rejected_before_parsing() -> None:
    with pytest.raises(RecordMalformed, match="limit"):
        decode_unverified(b"\x00" * (MAX_RECORD_BYTES + 1))


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(RecordMalformed):
        verify_record(_record() + b"\x00", kind="announce", now=NOW)


# --- replay -----------------------------------------------------------------------------


def test_replay_of_an_older_sequence_is_rejected() -> None:
    guard = ReplayGuard()
    old, new = _record(seq=5), _record(seq=6, now=NOW + 1)
    verify_record(old, kind="announce", now=NOW, replay_guard=guard)
    verify_record(new, kind="announce", now=NOW + 1, replay_guard=guard)
    with pytest.raises(RecordReplayed):
        verify_record(old, kind="announce", now=NOW + 2, replay_guard=guard)
    assert guard.latest_seq(KEY.node_id, "announce") == 6


def test_exact_redelivery_is_a_duplicate_not_an_error() -> None:
    guard = ReplayGuard()
    record = verify_record(_record(seq=5), kind="announce", now=NOW)
    assert guard.accept(record, now=NOW) is True
    assert guard.accept(record, now=NOW + 1) is False
    verify_record(record.encode(), kind="announce", now=NOW + 1, replay_guard=guard)


def test_a_different_record_under_the_same_sequence_is_rejected() -> None:
    guard = ReplayGuard()
    verify_record(_record(seq=5, payload={"a": 1}), kind="announce", now=NOW, replay_guard=guard)
    with pytest.raises(RecordReplayed, match="reuses"):
        verify_record(_record(seq=5, payload={"a": 2}), kind="announce", now=NOW, replay_guard=guard)


def test_guard_is_keyed_by_node_and_kind() -> None:
    guard = ReplayGuard()
    verify_record(_record(seq=9), kind="announce", now=NOW, replay_guard=guard)
    verify_record(_record(seq=1, kind="caps"), kind="caps", now=NOW, replay_guard=guard)
    verify_record(_record(OTHER, seq=1), kind="announce", now=NOW, replay_guard=guard)
    assert len(guard) == 3
    guard.forget(KEY.node_id)
    assert len(guard) == 1
    verify_record(_record(seq=1), kind="announce", now=NOW, replay_guard=guard)


def test_guard_learns_only_from_records_that_pass_every_check() -> None:
    guard = ReplayGuard()
    expired_high = _record(seq=100, now=NOW - 1000)
    with pytest.raises(RecordExpired):
        verify_record(expired_high, kind="announce", now=NOW, replay_guard=guard)
    assert guard.latest_seq(KEY.node_id, "announce") is None
    verify_record(_record(seq=1), kind="announce", now=NOW, replay_guard=guard)


def test_older_sequence_is_accepted_once_the_newest_record_has_expired() -> None:
    # Recovery from a clock that stepped back across a restart.
    guard = ReplayGuard()
    verify_record(_record(seq=1_000, ttl=60), kind="announce", now=NOW, replay_guard=guard)
    with pytest.raises(RecordReplayed):
        verify_record(_record(seq=10, now=NOW + 30), kind="announce", now=NOW + 30, replay_guard=guard)
    verify_record(_record(seq=10, now=NOW + 61), kind="announce", now=NOW + 61, replay_guard=guard)
    assert guard.latest_seq(KEY.node_id, "announce") == 10


def test_guard_memory_is_bounded() -> None:
    guard = ReplayGuard(max_entries=3)
    for i in range(5):
        guard.accept(verify_record(_record(kind=f"k{i}"), kind=f"k{i}", now=NOW), now=NOW)
    assert len(guard) == 3
    assert guard.latest_seq(KEY.node_id, "k0") is None
    assert guard.latest_seq(KEY.node_id, "k4") == 1


def test_signer_sequences_increase_even_when_the_clock_does_not() -> None:
    signer = RecordSigner(KEY, "announce", ttl=30)
    guard = ReplayGuard()
    seqs = []
    for now in [NOW, NOW, NOW - 5, NOW + 0.000001]:
        record = verify_record(signer.sign({"x": 1}, now=now), kind="announce", now=NOW, replay_guard=guard)
        seqs.append(record.seq)
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # A restarted signer continues above the old sequence (time-based start).
    restarted = RecordSigner(KEY, "announce", ttl=30)
    later = verify_record(restarted.sign({"x": 1}, now=NOW + 1), kind="announce", now=NOW + 1)
    assert later.seq > seqs[-1]


def test_sign_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        sign_record(KEY, "", {}, now=NOW, ttl=1, seq=1)
    with pytest.raises(ValueError):
        sign_record(KEY, "k", {}, now=NOW, ttl=0, seq=1)
    with pytest.raises(ValueError):
        sign_record(KEY, "k", {}, now=NOW, ttl=1, seq=-1)
    with pytest.raises(TypeError):
        sign_record(KEY, "k", {"x": object()}, now=NOW, ttl=1, seq=1)


# --- properties -------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
payloads = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=200, deadline=None)
@given(payloads, st.integers(0, 2**64 - 1), st.floats(1, 3600))
def test_any_payload_round_trips(payload: object, seq: int, ttl: float) -> None:
    data = _record(payload=payload, seq=seq, ttl=ttl)
    record = verify_record(data, kind="announce", now=NOW)
    assert _same(record.payload, payload)
    assert record.seq == seq


@settings(max_examples=300, deadline=None)
@given(payloads, st.data())
def test_any_single_bit_flip_is_rejected(payload: object, data: st.DataObject) -> None:
    encoded = bytearray(_record(payload=payload))
    bit = data.draw(st.integers(0, len(encoded) * 8 - 1))
    encoded[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(RecordError):
        verify_record(bytes(encoded), kind="announce", now=NOW)

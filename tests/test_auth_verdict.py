"""The entry node's signed verdict: round trip, tampering, freshness, signer, audience, replay."""

from __future__ import annotations

import msgpack
import pytest

from identity import NodeKey
from identity.records import SIGNING_CONTEXT
from meshd.auth import DataClass, Verdict, VerdictReplayGuard, sign_verdict, verify_verdict
from meshd.errors import InvalidVerdict

ENTRY = NodeKey.from_seed(b"\x61" * 32)
SERVER = NodeKey.from_seed(b"\x62" * 32)
OTHER = NodeKey.from_seed(b"\x63" * 32)
NOW = 1_770_000_000.0


def verdict(**changes) -> Verdict:
    fields = dict(request_id="chatcmpl-123", key_id="abcdefghijkl", tenant="acme", model="smollm2",
                  data_class=DataClass.CONFIDENTIAL, audience=SERVER.node_id)
    fields.update(changes)
    return Verdict(**fields)


def test_round_trip() -> None:
    data = sign_verdict(ENTRY, verdict(), NOW, ttl=30)
    checked = verify_verdict(data, ENTRY.node_id, NOW + 1, audience=SERVER.node_id)
    assert (checked.request_id, checked.key_id, checked.tenant, checked.model) == (
        "chatcmpl-123", "abcdefghijkl", "acme", "smollm2")
    assert checked.data_class is DataClass.CONFIDENTIAL
    assert checked.entry_node == ENTRY.node_id and checked.audience == SERVER.node_id
    assert (checked.issued_at, checked.expires_at) == (NOW, NOW + 30)


def test_two_signatures_of_one_verdict_differ() -> None:
    assert sign_verdict(ENTRY, verdict(), NOW) != sign_verdict(ENTRY, verdict(), NOW)


def _tamper_payload(data: bytes, **changes) -> bytes:
    body, signature = msgpack.unpackb(data, raw=False)
    fields = msgpack.unpackb(body, raw=False)
    fields["p"].update(changes)
    return msgpack.packb([msgpack.packb(fields, use_bin_type=True), signature], use_bin_type=True)


@pytest.mark.parametrize("changes", [{"ten": "other"}, {"dc": "public"}, {"kid": "zzzzzzzzzzzz"}, {"mdl": "big"}])
def test_a_tampered_field_breaks_the_signature(changes: dict) -> None:
    data = _tamper_payload(sign_verdict(ENTRY, verdict(), NOW), **changes)
    with pytest.raises(InvalidVerdict) as info:
        verify_verdict(data, ENTRY.node_id, NOW)
    assert info.value.code == "verdict_signature_invalid" and info.value.status == 403


def test_a_flipped_bit_anywhere_is_refused() -> None:
    data = bytearray(sign_verdict(ENTRY, verdict(), NOW))
    for index in range(0, len(data), 7):
        corrupted = bytearray(data)
        corrupted[index] ^= 0x01
        with pytest.raises(InvalidVerdict):
            verify_verdict(bytes(corrupted), ENTRY.node_id, NOW)


def test_wrong_signer_is_refused() -> None:
    data = sign_verdict(OTHER, verdict(), NOW)
    with pytest.raises(InvalidVerdict) as info:
        verify_verdict(data, ENTRY.node_id, NOW)
    assert info.value.code == "verdict_signer_mismatch"


def test_expiry_and_skew() -> None:
    data = sign_verdict(ENTRY, verdict(), NOW, ttl=30)
    verify_verdict(data, ENTRY.node_id, NOW + 30 + 10, max_skew=10)
    with pytest.raises(InvalidVerdict) as info:
        verify_verdict(data, ENTRY.node_id, NOW + 30 + 10.01, max_skew=10)
    assert info.value.code == "verdict_expired"
    with pytest.raises(InvalidVerdict) as early:
        verify_verdict(data, ENTRY.node_id, NOW - 10.01, max_skew=10)
    assert early.value.code == "verdict_not_yet_valid"


def test_a_long_lived_verdict_is_refused() -> None:
    data = sign_verdict(ENTRY, verdict(), NOW, ttl=3600)
    with pytest.raises(InvalidVerdict) as info:
        verify_verdict(data, ENTRY.node_id, NOW)
    assert info.value.code == "verdict_lifetime_too_long"


def test_a_verdict_for_another_node_is_refused() -> None:
    data = sign_verdict(ENTRY, verdict(audience=OTHER.node_id), NOW)
    with pytest.raises(InvalidVerdict) as info:
        verify_verdict(data, ENTRY.node_id, NOW, audience=SERVER.node_id)
    assert info.value.code == "verdict_wrong_audience"


def test_another_record_kind_is_not_a_verdict() -> None:
    from identity import sign_record

    data = sign_record(ENTRY, "announce", verdict().payload(), now=NOW, ttl=30, seq=1).encode()
    with pytest.raises(InvalidVerdict) as info:
        verify_verdict(data, ENTRY.node_id, NOW)
    assert info.value.code == "verdict_malformed"


def test_a_properly_signed_but_malformed_payload_is_refused() -> None:
    body = msgpack.packb({
        "v": 1, "k": "meshd.verdict", "n": ENTRY.node_id.compact, "pk": ENTRY.public_key,
        "iat": int(NOW * 1000), "exp": int(NOW * 1000) + 30_000, "seq": 1,
        "p": {"rid": "r", "kid": "NOT-A-KEY-ID", "ten": "acme", "mdl": "m", "dc": "secret", "aud": None},
    }, use_bin_type=True)
    data = msgpack.packb([body, ENTRY.sign(SIGNING_CONTEXT + body)], use_bin_type=True)
    with pytest.raises(InvalidVerdict) as info:
        verify_verdict(data, ENTRY.node_id, NOW)
    assert info.value.code == "verdict_malformed"


def test_garbage_is_malformed() -> None:
    for data in (b"", b"\x00", b"not msgpack at all", msgpack.packb([1, 2])):
        with pytest.raises(InvalidVerdict) as info:
            verify_verdict(data, ENTRY.node_id, NOW)
        assert info.value.code == "verdict_malformed"


def test_replay_guard_refuses_a_second_use_until_expiry() -> None:
    guard = VerdictReplayGuard()
    data = sign_verdict(ENTRY, verdict(), NOW, ttl=30)
    verify_verdict(data, ENTRY.node_id, NOW, replay_guard=guard)
    with pytest.raises(InvalidVerdict) as info:
        verify_verdict(data, ENTRY.node_id, NOW + 1, replay_guard=guard)
    assert info.value.code == "verdict_replayed"
    fresh = sign_verdict(ENTRY, verdict(), NOW + 1, ttl=30)  # a retry of the same request: a new verdict
    verify_verdict(fresh, ENTRY.node_id, NOW + 1, replay_guard=guard)
    assert len(guard) == 2
    verify_verdict(sign_verdict(ENTRY, verdict(), NOW + 100), ENTRY.node_id, NOW + 100, replay_guard=guard)
    assert len(guard) == 1  # the expired ones were forgotten


def test_signing_a_bad_verdict_is_refused() -> None:
    with pytest.raises(ValueError):
        sign_verdict(ENTRY, verdict(key_id="mk-abcdefghijkl-secret"), NOW)

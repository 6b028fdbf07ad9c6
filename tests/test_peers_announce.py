"""Signed zeroconf announcements: forged, replayed, expired and conflicting ones."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from identity import NodeKey, RecordSigner, ReplayGuard
from peers.announce import (
    RECORD_KIND,
    AnnouncementRejected,
    ConflictDetector,
    announcement_properties,
    parse_announcement,
)

NOW = 1_800_000_000.0


def props_for(key: NodeKey, signer: RecordSigner | None = None, now: float = NOW, boot: str = "boot-a", **kw):
    signer = signer or RecordSigner(key, RECORD_KIND, ttl=600)
    return announcement_properties(signer, key.node_id, name=kw.get("name", "n"), protocol_version=1,
                                   quic_port=kw.get("qp", 4433), api_port=8764, boot_id=boot, now=now)


def test_round_trip_and_txt_strings_fit():
    key = NodeKey.generate()
    props = props_for(key, name="laptop")
    assert all(len(k) + 1 + len(v) <= 255 for k, v in props.items())
    raw = {k.encode(): v.encode() for k, v in props.items()}  # as zeroconf hands them over
    got = parse_announcement(raw, ("10.0.0.2",), now=NOW, replay_guard=ReplayGuard())
    assert got.node_id == key.node_id and got.name == "laptop" and got.quic_port == 4433
    assert got.addresses == ("10.0.0.2",) and got.boot_id == "boot-a"


def test_claiming_another_nodes_id_is_rejected():
    victim, forger = NodeKey.generate(), NodeKey.generate()
    props = props_for(forger)
    props["id"] = str(victim.node_id)
    with pytest.raises(AnnouncementRejected):
        parse_announcement(props, (), now=NOW, replay_guard=ReplayGuard())


def test_plain_fields_are_not_believed():
    key = NodeKey.generate()
    props = props_for(key, qp=4433)
    props["qp"] = "9999"  # an attacker edits the unsigned copy
    got = parse_announcement(props, (), now=NOW, replay_guard=ReplayGuard())
    assert got.quic_port == 4433


def test_unsigned_and_garbage_records_are_rejected():
    key = NodeKey.generate()
    props = props_for(key)
    unsigned = {k: v for k, v in props.items() if not k.startswith("r")}
    with pytest.raises(AnnouncementRejected) as info:
        parse_announcement(unsigned, (), now=NOW, replay_guard=ReplayGuard())
    assert info.value.code == "unsigned"
    props["r0"] = "!!!" + props["r0"][3:]
    with pytest.raises(AnnouncementRejected):
        parse_announcement(props, (), now=NOW, replay_guard=ReplayGuard())


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_flipped_character_is_rejected(data):
    key = NodeKey.from_seed(bytes(32))
    props = props_for(key)
    chunk = data.draw(st.sampled_from([k for k in props if k.startswith("r")]))
    pos = data.draw(st.integers(0, len(props[chunk]) - 1))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    new = data.draw(st.sampled_from([c for c in alphabet if c != props[chunk][pos]]))
    props[chunk] = props[chunk][:pos] + new + props[chunk][pos + 1:]
    try:
        got = parse_announcement(props, (), now=NOW, replay_guard=ReplayGuard())
    except AnnouncementRejected:
        return
    # base64's last character can carry padding bits that decode identically
    assert got is not None and got.node_id == key.node_id and got.quic_port == 4433


def test_replay_of_an_older_announcement_is_rejected():
    key = NodeKey.generate()
    signer = RecordSigner(key, RECORD_KIND, ttl=600)
    old = props_for(key, signer, now=NOW)
    new = props_for(key, signer, now=NOW + 5)
    guard = ReplayGuard()
    assert parse_announcement(new, (), now=NOW + 6, replay_guard=guard) is not None
    assert parse_announcement(new, (), now=NOW + 7, replay_guard=guard) is None  # re-delivery: harmless
    with pytest.raises(AnnouncementRejected) as info:
        parse_announcement(old, (), now=NOW + 8, replay_guard=guard)
    assert info.value.code == "record_replayed"


def test_expired_announcement_is_rejected():
    key = NodeKey.generate()
    with pytest.raises(AnnouncementRejected) as info:
        parse_announcement(props_for(key, now=NOW), (), now=NOW + 3600, replay_guard=ReplayGuard())
    assert info.value.code == "record_expired"


def announced(key: NodeKey, boot: str, seq: int, addr: str):
    return parse_announcement(props_for(key, boot=boot, now=seq / 1e6), (addr,), now=seq / 1e6,
                              replay_guard=ReplayGuard())


def test_restart_is_not_a_conflict_but_alternation_is():
    me, peer = NodeKey.generate(), NodeKey.generate()
    detector = ConflictDetector(me.node_id, "mine", own_start_seq=int(NOW * 1e6))
    t = NOW
    assert detector.observe(announced(peer, "b1", int(t * 1e6), "10.0.0.2"), t) is None
    assert detector.observe(announced(peer, "b2", int((t + 5) * 1e6), "10.0.0.2"), t + 5) is None  # restart
    conflict = detector.observe(announced(peer, "b1", int((t + 9) * 1e6), "10.0.0.3"), t + 9)
    assert conflict is not None and conflict.node_id == peer.node_id
    assert set(conflict.addresses) == {"10.0.0.2", "10.0.0.3"}


def test_our_own_id_from_another_daemon_is_a_conflict_but_our_past_life_is_not():
    me = NodeKey.generate()
    start = time.time()
    detector = ConflictDetector(me.node_id, "mine", own_start_seq=int(start * 1e6))
    stale = announced(me, "previous-life", int((start - 100) * 1e6), "10.0.0.9")
    assert detector.observe(stale, start) is None
    assert detector.observe(announced(me, "mine", int((start + 1) * 1e6), "10.0.0.1"), start + 1) is None
    copy = announced(me, "copied", int((start + 2) * 1e6), "10.0.0.7")
    assert detector.observe(copy, start + 2) is not None

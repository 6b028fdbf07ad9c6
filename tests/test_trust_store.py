"""The trust store: queries, atomic updates, change events, reload and polling."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest

from identity import InvalidNodeId, NodeId, NodeKey
from peers import (
    DEFAULT_ROLES,
    TRUST_FILE_NAME,
    AmbiguousNodeId,
    InvalidRole,
    PeerNotTrusted,
    PeerRevoked,
    PeerTrusted,
    Role,
    TrustDetailsChanged,
    TrustFileError,
    TrustRolesChanged,
    TrustStore,
    parse_roles,
)

A = NodeKey.from_seed(b"\x51" * 32).node_id
B = NodeKey.from_seed(b"\x52" * 32).node_id
C = NodeKey.from_seed(b"\x53" * 32).node_id
WHEN = dt.datetime(2025, 3, 1, 9, 30, 15, 123456, tzinfo=dt.timezone.utc)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state: Path) -> TrustStore:
    return TrustStore.open(state)


def _edit(path: Path, old: str, new: str) -> None:
    """A hand edit in place (same inode), like most editors' plain save."""
    text = path.read_text()
    if old not in text:
        raise ValueError(f"{old!r} not in trust file")
    with path.open("r+") as f:
        f.seek(0)
        f.write(text.replace(old, new, 1))
        f.truncate()


def test_missing_file_is_an_empty_store(store: TrustStore, state: Path) -> None:
    assert len(store) == 0 and store.list() == []
    assert store.roles_of(A) == frozenset()
    assert not store.allows(A, Role.SERVE)
    assert not (state / TRUST_FILE_NAME).exists()


def test_add_get_list_roles_allows(store: TrustStore) -> None:
    changes = store.add(A, roles=["serve", "use"], name="laptop", added_by="meshctl (uid 1000)", now=WHEN)
    assert len(changes) == 1 and isinstance(changes[0], PeerTrusted) and changes[0].node_id == A
    store.add(B, roles=[Role.TENSOR], name="Box", note="GPU")
    entry = store.get(A)
    assert entry is not None
    assert entry.name == "laptop" and entry.added_by == "meshctl (uid 1000)"
    assert entry.added_at == WHEN.replace(microsecond=0)
    assert store.roles_of(A) == {Role.SERVE, Role.USE}
    assert store.allows(A, "serve") and store.allows(A, Role.USE) and not store.allows(A, Role.CACHE)
    assert store.allows(B, Role.TENSOR) and not store.allows(C, Role.TENSOR)
    assert [e.node_id for e in store.list()] == [B, A]  # by name, case-insensitively
    assert A in store and C not in store


def test_changes_survive_a_restart(store: TrustStore, state: Path) -> None:
    store.add(A, roles=DEFAULT_ROLES, name='a "quoted" name', note="multi\nline", now=WHEN)
    store.add(B, roles=[], name="no roles yet")
    reopened = TrustStore.open(state)
    assert reopened.list() == store.list()


def test_file_is_private_and_written_atomically(store: TrustStore, state: Path) -> None:
    store.add(A, roles=["serve"])
    path = state / TRUST_FILE_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    inode = os.stat(path).st_ino
    store.add(B, roles=["use"])
    assert os.stat(path).st_ino != inode  # replaced by rename, never rewritten in place
    assert sorted(p.name for p in state.iterdir()) == [TRUST_FILE_NAME, TRUST_FILE_NAME + ".lock"]


def test_add_on_a_trusted_peer_updates_it(store: TrustStore) -> None:
    store.add(A, roles=["serve"], name="old", added_by="alice", now=WHEN)
    changes = store.add(A, roles=["serve", "cache"], name="new", added_by="bob")
    kinds = {type(c) for c in changes}
    assert kinds == {TrustRolesChanged, TrustDetailsChanged}
    roles_change = next(c for c in changes if isinstance(c, TrustRolesChanged))
    assert roles_change.granted == {Role.CACHE} and roles_change.withdrawn == frozenset()
    entry = store.get(A)
    assert entry is not None and entry.name == "new" and entry.added_by == "alice"
    assert store.add(A, roles=["serve", "cache"]) == ()


def test_update_changes_only_what_is_given(store: TrustStore) -> None:
    store.add(A, roles=["serve", "tensor"], name="n", note="keep me")
    (change,) = store.update(A, roles=["serve"])
    assert isinstance(change, TrustRolesChanged) and change.withdrawn == {Role.TENSOR}
    entry = store.get(A)
    assert entry is not None and entry.note == "keep me" and entry.name == "n"
    with pytest.raises(PeerNotTrusted):
        store.update(B, roles=["serve"])


def test_revoke(store: TrustStore, state: Path) -> None:
    store.add(A, roles=["serve"])
    store.add(B, roles=["use"])
    (change,) = store.revoke(A)
    assert isinstance(change, PeerRevoked) and change.node_id == A and change.previous.roles == {Role.SERVE}
    assert not store.allows(A, Role.SERVE) and store.get(A) is None
    assert A not in TrustStore.open(state)
    with pytest.raises(PeerNotTrusted):
        store.revoke(A)


def test_unknown_role_is_rejected(store: TrustStore) -> None:
    with pytest.raises(InvalidRole, match="sever"):
        store.add(A, roles=["sever"])
    assert len(store) == 0


def test_parse_roles() -> None:
    assert parse_roles("serve, use") == {Role.SERVE, Role.USE}
    assert parse_roles("all") == set(Role)
    assert parse_roles(["TENSOR"]) == {Role.TENSOR}
    assert parse_roles("") == frozenset()
    with pytest.raises(InvalidRole):
        parse_roles("serve,everything")


# --- reload and polling -----------------------------------------------------------------


def test_poll_is_quiet_when_nothing_changed(store: TrustStore) -> None:
    store.add(A, roles=["serve"])
    assert store.poll() is None
    assert store.poll() is None


def test_hand_edit_is_picked_up_as_events(store: TrustStore, state: Path) -> None:
    store.add(A, roles=["serve", "use"], name="a")
    store.add(B, roles=["use"], name="b")
    path = state / TRUST_FILE_NAME
    _edit(path, '"serve", "use"', '"cache", "use"')  # same length: only the content differs
    result = store.poll()
    assert result is not None and result.ok
    (change,) = result.changes
    assert isinstance(change, TrustRolesChanged)
    assert change.withdrawn == {Role.SERVE} and change.granted == {Role.CACHE}
    assert store.allows(A, Role.CACHE) and not store.allows(A, Role.SERVE)
    assert store.poll() is None


def test_reload_reports_revocations_first(store: TrustStore, state: Path) -> None:
    store.add(A, roles=["serve"], name="a")
    path = state / TRUST_FILE_NAME
    other = TrustStore(path)  # e.g. meshctl editing while the daemon holds its own view
    other.reload()
    other.revoke(A)
    other.add(C, roles=["use"], name="c")
    result = store.reload()
    assert [type(c) for c in result.changes] == [PeerRevoked, PeerTrusted]
    assert not store.allows(A, Role.SERVE) and store.allows(C, Role.USE)


def test_broken_edit_keeps_the_previous_state_and_reports_the_line(store: TrustStore, state: Path) -> None:
    store.add(A, roles=["serve"], name="a")
    store.add(B, roles=["use"], name="b")
    path = state / TRUST_FILE_NAME
    lines = path.read_text().splitlines()
    expected_line = next(i for i, line in enumerate(lines, 1) if line == 'roles = ["use"]')
    _edit(path, 'roles = ["use"]', 'roles = ["use", "sudo"]')
    result = store.poll()
    assert result is not None and not result.ok and result.changes == ()
    assert isinstance(result.error, TrustFileError)
    assert result.error.line == expected_line and "sudo" in result.error.message
    assert store.last_error is result.error
    assert store.allows(B, Role.USE) and store.allows(A, Role.SERVE)  # old state in force
    assert store.poll() is None  # reported once, not on every poll
    # Writes refuse to overwrite the broken file (it holds someone's unfinished edit).
    with pytest.raises(TrustFileError):
        store.add(C, roles=["use"])
    assert "sudo" in path.read_text()
    # Fixing it applies the new state.
    _edit(path, '"use", "sudo"', '"tensor"')
    result = store.poll()
    assert result is not None and result.ok and store.last_error is None
    assert store.roles_of(B) == {Role.TENSOR}


def test_syntax_error_is_reported_with_its_line(store: TrustStore, state: Path) -> None:
    store.add(A, roles=["serve"], name="a")
    path = state / TRUST_FILE_NAME
    with path.open("a") as f:
        f.write("\n[peers.broken\n")
    total_lines = len(path.read_text().splitlines())
    result = store.reload()
    assert result.error is not None and result.error.line == total_lines
    assert store.allows(A, Role.SERVE)


def test_invalid_utf8_is_reported_with_its_line(store: TrustStore, state: Path) -> None:
    store.add(A, roles=["serve"], name="a")
    path = state / TRUST_FILE_NAME
    data = path.read_bytes().replace(b'name = "a"', b'name = "\xff"')
    line = data[: data.index(b"\xff")].count(b"\n") + 1
    path.write_bytes(data)
    result = store.reload()
    assert result.error is not None and result.error.line == line and "UTF-8" in result.error.message


def test_open_refuses_a_broken_file(state: Path) -> None:
    state.mkdir(mode=0o700)
    path = state / TRUST_FILE_NAME
    path.write_text(f'[peers.{A}]\nroles = ["root"]\n')
    os.chmod(path, 0o600)
    with pytest.raises(TrustFileError) as info:
        TrustStore.open(state)
    assert info.value.line == 2


def test_file_writable_by_others_is_refused(store: TrustStore, state: Path) -> None:
    store.add(A, roles=["serve"])
    path = state / TRUST_FILE_NAME
    os.chmod(path, 0o666)
    result = store.poll()
    assert result is not None and result.error is not None and "chmod 600" in result.error.message
    assert store.allows(A, Role.SERVE)
    os.chmod(path, 0o644)  # readable by others is fine; writable is not
    result = store.poll()
    assert result is not None and result.ok


def test_deleted_file_revokes_everyone(store: TrustStore, state: Path) -> None:
    store.add(A, roles=["serve"])
    (state / TRUST_FILE_NAME).unlink()
    result = store.poll()
    assert result is not None and [type(c) for c in result.changes] == [PeerRevoked]
    assert len(store) == 0
    assert store.poll() is None


def test_file_created_behind_the_stores_back_is_picked_up(store: TrustStore, state: Path) -> None:
    assert store.poll() is None
    path = state / TRUST_FILE_NAME
    path.write_text(f'[peers.{A}]\nroles = ["use"]\n')
    os.chmod(path, 0o600)
    result = store.poll()
    assert result is not None and [type(c) for c in result.changes] == [PeerTrusted]


def test_writes_include_edits_found_on_disk(store: TrustStore, state: Path) -> None:
    store.add(A, roles=["serve"], name="a")
    _edit(state / TRUST_FILE_NAME, 'name = "a"', 'name = "renamed"')
    changes = store.add(B, roles=["use"])
    assert {type(c) for c in changes} == {TrustDetailsChanged, PeerTrusted}
    entry = store.get(A)
    assert entry is not None and entry.name == "renamed"
    assert 'name = "renamed"' in (state / TRUST_FILE_NAME).read_text()


def test_a_failed_write_does_not_swallow_edits_found_on_disk(store: TrustStore, state: Path) -> None:
    store.add(A, roles=["serve"], name="a")
    store.add(B, roles=["use"], name="b")
    other = TrustStore(state / TRUST_FILE_NAME)
    other.reload()
    other.revoke(B)  # e.g. a hand edit or an offline meshctl
    with pytest.raises(PeerNotTrusted):
        store.revoke(C)  # syncs with disk, then fails
    result = store.poll()
    assert result is not None and [type(c) for c in result.changes] == [PeerRevoked]
    assert result.changes[0].node_id == B


def test_a_write_over_a_newly_broken_file_leaves_the_report_to_poll(store: TrustStore, state: Path) -> None:
    store.add(A, roles=["serve"], name="a")
    _edit(state / TRUST_FILE_NAME, '"serve"', '"root"')
    with pytest.raises(TrustFileError):
        store.add(B, roles=["use"])
    result = store.poll()
    assert result is not None and result.error is not None and "root" in result.error.message


# --- resolving user input ---------------------------------------------------------------


def test_resolve_full_ids_and_unique_prefixes(store: TrustStore) -> None:
    store.add(A, roles=["serve"])
    store.add(B, roles=["serve"])
    assert store.resolve(str(A).lower()) == A
    assert store.resolve(str(C)) == C  # a full id resolves even if not trusted (for add)
    assert store.resolve(A.short(3)) == A
    assert store.resolve(A.compact[:6].lower()) == A
    with pytest.raises(InvalidNodeId, match="check character"):
        store.resolve(str(A)[:-1] + ("A" if str(A)[-1] != "A" else "B"))
    with pytest.raises(InvalidNodeId, match="too short"):
        store.resolve("MESHD-AB")
    with pytest.raises(PeerNotTrusted):
        store.resolve("MESHD-" + ("2222" if not A.compact.startswith("2222") else "3333"))


def test_resolve_reports_ambiguity(store: TrustStore) -> None:
    # Find two ids sharing their first four characters (a birthday search, ~1000 keys).
    seen: dict[str, NodeId] = {}
    for i in range(1_000_000):
        node_id = NodeKey.from_seed(i.to_bytes(32, "big")).node_id
        prefix = node_id.compact[:4]
        if prefix in seen:
            break
        seen[prefix] = node_id
    store.add(seen[prefix], roles=["use"])
    store.add(node_id, roles=["use"])
    with pytest.raises(AmbiguousNodeId, match="matches 2"):
        store.resolve(prefix)
    assert store.resolve(node_id.compact[:12]) == node_id

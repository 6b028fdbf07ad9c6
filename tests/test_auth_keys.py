"""The key store: create, authenticate (wrong / revoked / expired keys), revoke, the file, redaction."""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
from pathlib import Path

import pytest

from meshd.auth import (
    DEFAULT_TENANT,
    KEY_FILE_NAME,
    AmbiguousKey,
    DataClass,
    InvalidKeySpec,
    KeyFileError,
    KeyNotFound,
    KeyStore,
    Limits,
    TenantNotFound,
    TenantRecord,
    check_secret,
    hash_secret,
    parse_bearer,
    parse_expiry,
    parse_models,
    redact,
    split_secret,
)
from meshd.errors import ApiKeyExpired, ApiKeyRevoked, InvalidApiKey, MissingApiKey

NOW = 1_770_000_000.0  # 2026-02-02T02:40:00Z


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state: Path) -> KeyStore:
    return KeyStore.open(state)


def test_create_returns_a_secret_that_authenticates(store: KeyStore) -> None:
    record, secret = store.create("ci", now=NOW, tenant="acme", models=("smollm2",), limits=Limits(rpm=5))
    assert split_secret(secret) == record.key_id
    assert secret.startswith(f"mk-{record.key_id}-")
    found = store.authenticate(secret, now=NOW + 1)
    assert found.key_id == record.key_id
    assert (found.tenant, found.models, found.limits.rpm) == ("acme", ("smollm2",), 5)


def test_only_a_salted_hash_is_stored_with_mode_0600(store: KeyStore, state: Path) -> None:
    record, secret = store.create("ci", now=NOW)
    other, _ = store.create("ci2", now=NOW)
    path = state / KEY_FILE_NAME
    text = path.read_text()
    body = secret.rsplit("-", 1)[1]
    assert secret not in text and body not in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # Per-key salts: two keys never share a salt, so equal secrets would not share a digest.
    salts = {store.get(record.key_id).secret_hash.split("$")[1], store.get(other.key_id).secret_hash.split("$")[1]}
    assert len(salts) == 2


@pytest.mark.parametrize("token", [
    "",
    "mk-",
    "sk-abcdefghijkl",
    "mk-abcdefghijkl-" + "a" * 52,  # well-formed, unknown id
])
def test_malformed_or_unknown_tokens_are_refused(store: KeyStore, token: str) -> None:
    store.create("ci", now=NOW)
    with pytest.raises(InvalidApiKey) as info:
        store.authenticate(token, now=NOW)
    assert type(info.value) is InvalidApiKey
    assert info.value.status == 401 and info.value.code == "invalid_api_key"


def test_a_wrong_secret_for_a_real_key_id_is_refused_without_echoing_it(store: KeyStore) -> None:
    record, secret = store.create("ci", now=NOW)
    body = secret.rsplit("-", 1)[1]
    flipped = ("b" if body[0] != "b" else "c") + body[1:]
    wrong = f"mk-{record.key_id}-{flipped}"
    with pytest.raises(InvalidApiKey) as info:
        store.authenticate(wrong, now=NOW)
    assert type(info.value) is InvalidApiKey
    assert flipped not in info.value.message and record.key_id in info.value.message


def test_revoked_key_is_refused_from_the_next_request(store: KeyStore, state: Path) -> None:
    record, secret = store.create("ci", now=NOW)
    store.authenticate(secret, now=NOW)
    # Revoked by another process (meshctl writing the file): the daemon's store sees it at once.
    KeyStore.open(state).revoke(record.key_id, now=NOW + 5)
    with pytest.raises(ApiKeyRevoked) as info:
        store.authenticate(secret, now=NOW + 5)
    assert info.value.status == 401 and info.value.code == "api_key_revoked"
    assert store.get(record.key_id).revoked_at == dt.datetime.fromtimestamp(NOW + 5, dt.timezone.utc)


def test_revoked_state_is_only_revealed_to_holders_of_the_secret(store: KeyStore) -> None:
    record, _ = store.create("ci", now=NOW)
    store.revoke("ci", now=NOW)
    with pytest.raises(InvalidApiKey) as info:
        store.authenticate(f"mk-{record.key_id}-" + "a" * 52, now=NOW)
    assert type(info.value) is InvalidApiKey


def test_expired_key_is_refused_at_its_expiry(store: KeyStore) -> None:
    expires = dt.datetime.fromtimestamp(NOW + 60, dt.timezone.utc)
    _, secret = store.create("ci", now=NOW, expires_at=expires)
    store.authenticate(secret, now=NOW + 59.999)
    with pytest.raises(ApiKeyExpired) as info:
        store.authenticate(secret, now=NOW + 60)
    assert info.value.code == "api_key_expired"


def test_expiry_in_the_past_is_refused_at_creation(store: KeyStore) -> None:
    with pytest.raises(InvalidKeySpec):
        store.create("ci", now=NOW, expires_at=dt.datetime.fromtimestamp(NOW - 1, dt.timezone.utc))


def test_records_survive_a_round_trip_through_the_file(store: KeyStore, state: Path) -> None:
    expires = dt.datetime.fromtimestamp(NOW + 86400, dt.timezone.utc)
    record, secret = store.create(
        "batch jobs", now=NOW, tenant="acme", models=("llama-*", "smollm2"),
        limits=Limits(rpm=60, tpm=10_000, tokens_per_day=1_000_000), max_data_class=DataClass.INTERNAL,
        expires_at=expires, created_by="alice", note='quotes " and \\ backslashes',
    )
    store.set_tenant(TenantRecord("acme", limits=Limits(tpm=50_000), models=("llama-*",),
                                  max_data_class=DataClass.CONFIDENTIAL, note="the acme team"))
    again = KeyStore.open(state)
    loaded = again.get(record.key_id)
    assert loaded == record
    assert loaded.secret_hash == record.secret_hash
    assert again.tenant("acme") == store.tenant("acme")
    assert again.authenticate(secret, now=NOW).key_id == record.key_id


def test_names_are_unique_among_live_keys_and_resolve(store: KeyStore) -> None:
    first, secret = store.create("ci", now=NOW)
    with pytest.raises(InvalidKeySpec):
        store.create("ci", now=NOW)
    store.revoke("ci", now=NOW)
    second, _ = store.create("ci", now=NOW + 1)
    assert store.resolve("ci").key_id == second.key_id  # the live one
    assert store.resolve(first.key_id).key_id == first.key_id
    assert store.resolve(secret).key_id == first.key_id  # a leaked secret names its key
    store.revoke(second.key_id, now=NOW + 2)
    with pytest.raises(AmbiguousKey):
        store.resolve("ci")
    with pytest.raises(KeyNotFound):
        store.resolve("nope")


def test_revoke_is_idempotent_and_keeps_the_first_time(store: KeyStore) -> None:
    record, _ = store.create("ci", now=NOW)
    first = store.revoke("ci", now=NOW + 1)
    again = store.revoke(record.key_id, now=NOW + 100)
    assert again.revoked_at == first.revoked_at


def test_list_is_in_creation_order_and_can_hide_revoked(store: KeyStore) -> None:
    a, _ = store.create("a", now=NOW)
    b, _ = store.create("b", now=NOW + 1)
    store.revoke("a", now=NOW + 2)
    assert [r.key_id for r in store.list()] == [a.key_id, b.key_id]
    assert [r.key_id for r in store.list(include_revoked=False)] == [b.key_id]
    assert store.get(a.key_id).status(NOW + 3) == "revoked"
    assert store.get(b.key_id).status(NOW + 3) == "active"


def test_tenants_default_and_configured(store: KeyStore) -> None:
    store.create("a", now=NOW)
    store.create("b", now=NOW, tenant="acme")
    assert store.tenant(DEFAULT_TENANT).limits.unlimited
    store.set_tenant(TenantRecord("acme", limits=Limits(rpm=3)))
    assert [t.name for t in store.tenants()] == ["acme", "default"]
    assert store.tenant("acme").limits.rpm == 3
    store.remove_tenant("acme")
    assert store.tenant("acme").limits.unlimited
    with pytest.raises(TenantNotFound):
        store.remove_tenant("acme")


def test_hand_edit_of_a_limit_is_picked_up(store: KeyStore, state: Path) -> None:
    _, secret = store.create("ci", now=NOW, limits=Limits(rpm=5))
    path = state / KEY_FILE_NAME
    path.write_text(path.read_text().replace("rpm = 5", "rpm = 7"))
    assert store.authenticate(secret, now=NOW).limits.rpm == 7


def test_broken_hand_edit_keeps_the_previous_state_and_names_the_line(store: KeyStore, state: Path) -> None:
    record, secret = store.create("ci", now=NOW)
    path = state / KEY_FILE_NAME
    lines = path.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("tenant = "))
    lines[index] = "tenant = 42"
    path.write_text("\n".join(lines) + "\n")
    result = store.reload()
    assert isinstance(result.error, KeyFileError)
    header = next(i for i, line in enumerate(lines) if line.startswith("[keys.")) + 1
    assert result.error.line == header
    assert store.authenticate(secret, now=NOW).key_id == record.key_id  # old state still in force
    with pytest.raises(KeyFileError):
        store.create("other", now=NOW)  # never overwrite a file someone is editing


def test_syntax_error_line_is_reported(state: Path) -> None:
    state.mkdir(mode=0o700)
    path = state / KEY_FILE_NAME
    path.write_text('version = 1\n\n[keys.abcdefghijkl]\nname = "x\n')
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError) as info:
        KeyStore.open(state)
    assert info.value.line == 4


def test_a_group_readable_key_file_is_refused(store: KeyStore, state: Path) -> None:
    store.create("ci", now=NOW)
    os.chmod(state / KEY_FILE_NAME, 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        KeyStore.open(state)


def test_unknown_fields_are_refused(store: KeyStore, state: Path) -> None:
    store.create("ci", now=NOW)
    path = state / KEY_FILE_NAME
    path.write_text(path.read_text().replace('name = "ci"', 'name = "ci"\nrmp = 5'))
    with pytest.raises(KeyFileError, match="rmp"):
        KeyStore.open(state)


@pytest.mark.parametrize("kwargs", [
    {"name": ""},
    {"name": "x" * 65},
    {"name": "bad\nname"},
    {"name": "ok", "tenant": "no spaces"},
    {"name": "ok", "models": ("",)},
])
def test_bad_specs_are_refused(store: KeyStore, kwargs: dict) -> None:
    with pytest.raises(InvalidKeySpec):
        store.create(now=NOW, **kwargs)


@pytest.mark.parametrize("limits", [{"rpm": 0}, {"tpm": -1}, {"tokens_per_day": 1.5}, {"rpm": True}])
def test_bad_limits_are_refused(limits: dict) -> None:
    with pytest.raises(InvalidKeySpec):
        Limits(**limits)


def test_hash_check_is_exact() -> None:
    stored = hash_secret("mk-abcdefghijkl-secret", b"\x01" * 16)
    assert check_secret("mk-abcdefghijkl-secret", stored)
    assert not check_secret("mk-abcdefghijkl-secreT", stored)
    assert not check_secret("mk-abcdefghijkl-secret", stored.replace("blake2b", "sha256"))
    assert not check_secret("mk-abcdefghijkl-secret", "blake2b$zz$00")


def test_parse_bearer() -> None:
    assert parse_bearer("Bearer mk-x") == "mk-x"
    assert parse_bearer("bearer   mk-x ") == "mk-x"
    for bad in (None, "", "Basic abc", "Bearer "):
        with pytest.raises(MissingApiKey) as info:
            parse_bearer(bad)
        assert info.value.status == 401


def test_parse_expiry() -> None:
    assert parse_expiry("2026-03-01", now=NOW) == dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    assert parse_expiry("30d", now=NOW).timestamp() == NOW + 30 * 86400
    assert parse_expiry("12h", now=NOW).timestamp() == NOW + 12 * 3600
    assert parse_expiry("2026-03-01T12:00:00+02:00", now=NOW) == dt.datetime(2026, 3, 1, 10, tzinfo=dt.timezone.utc)
    for bad in ("2020-01-01", "tomorrow", "5y"):
        with pytest.raises(InvalidKeySpec):
            parse_expiry(bad, now=NOW)


def test_parse_models() -> None:
    assert parse_models("a, b,a") == ("a", "b")
    assert parse_models(None) is None and parse_models("*") is None and parse_models(" , ") is None


def test_redact_removes_every_secret_but_keeps_the_key_id() -> None:
    secret = "mk-abcdefghijkl-" + "q" * 52
    text = f"Authorization: Bearer {secret}; again {secret[:30]}"
    cleaned = redact(text)
    assert "q" * 10 not in cleaned
    assert cleaned.count("mk-abcdefghijkl-***") == 2


def test_nothing_secret_in_repr_logs_or_errors(store: KeyStore, state: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    record, secret = store.create("ci", now=NOW, tenant="acme")
    body = secret.rsplit("-", 1)[1]
    outputs = [repr(record), str(record), repr(store.get(record.key_id)), str(record.to_dict(NOW))]
    store.authenticate(secret, now=NOW)
    for attempt in (secret[:-1] + "2", secret + "x", "mk-" + body):
        with pytest.raises(InvalidApiKey) as info:
            store.authenticate(attempt, now=NOW)
        outputs.append(str(info.value))
    with pytest.raises(KeyNotFound) as missing:
        store.resolve(secret.replace(record.key_id, "zzzzzzzzzzzz"))
    outputs.append(str(missing.value))
    store.revoke(secret, now=NOW)
    with pytest.raises(ApiKeyRevoked) as revoked:
        store.authenticate(secret, now=NOW)
    outputs.append(str(revoked.value))
    outputs.append(caplog.text)
    outputs.extend(str(r.__dict__) for r in caplog.records)
    assert caplog.records, "the store should have logged something to check"
    for text in outputs:
        assert body not in text
        assert body[:20] not in text
        assert record.secret_hash.split("$")[2] not in text

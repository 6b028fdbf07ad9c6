"""The key store: API keys and tenants in ``<state dir>/keys.toml``, and request authentication.

The file is the truth, as with the trust store: ``KeyStore`` holds the last
good state read from it and notices changes with one ``stat`` per check. The
daemon's store checks the file on every ``authenticate`` call, so a key
revoked by ``meshctl`` (through the admin API or straight in the file) is
refused from the very next request. A broken hand edit is reported once and
the previous state stays in force.

Secrets: ``create`` returns the secret once; the file keeps
``blake2b$<salt>$<digest>``, a keyed BLAKE2b-256 of the whole secret with a
random 16-byte per-key salt. A slow password KDF buys nothing for a 256-bit
random secret (no dictionary to slow down) and would cost every request
milliseconds; docs/auth.md explains the choice. Digests are compared in
constant time.

Writes take a small ``flock``, pick up edits already on disk, refuse to
overwrite a broken file, and replace the file atomically (0600). Not
thread-safe: use it from the daemon's event loop, or from ``meshctl``.
"""

from __future__ import annotations

import builtins
import datetime as dt
import fcntl
import hashlib
import hmac
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from identity.statedir import PRIVATE_FILE_MODE, StrPath, atomic_write, ensure_state_dir

from ..errors import ApiKeyExpired, ApiKeyRevoked, InvalidApiKey, MissingApiKey
from .errors import AmbiguousKey, InvalidKeySpec, KeyFileError, KeyNotFound, TenantNotFound
from .keyfile import parse_key_file, render_key_file
from .model import (
    DEFAULT_TENANT,
    DataClass,
    KeyRecord,
    Limits,
    TenantRecord,
    new_key_id,
    new_secret,
    redact,
    split_secret,
)

logger = logging.getLogger(__name__)

KEY_FILE_NAME = "keys.toml"
HASH_SCHEME = "blake2b"
_SALT_BYTES = 16  # BLAKE2b's salt parameter is at most 16 bytes
_PERSON = b"meshd-apikey-v1"  # domain separation: these digests mean nothing elsewhere
_NO_LIMITS = Limits()
_RACY_WINDOW = 2.0  # see TrustStore.poll: same-tick edits of equal size are invisible to stat


def hash_secret(secret: str, salt: bytes) -> str:
    digest = hashlib.blake2b(secret.encode("utf-8"), digest_size=32, salt=salt, person=_PERSON).hexdigest()
    return f"{HASH_SCHEME}${salt.hex()}${digest}"


def check_secret(secret: str, stored: str) -> bool:
    """Constant-time check of ``secret`` against a stored ``blake2b$salt$digest``."""
    scheme, _, rest = stored.partition("$")
    salt_hex, _, digest_hex = rest.partition("$")
    try:
        salt = bytes.fromhex(salt_hex)
        expected = bytes.fromhex(digest_hex)
    except ValueError:
        return False
    if scheme != HASH_SCHEME or len(salt) != _SALT_BYTES or len(expected) != 32:
        return False
    actual = hashlib.blake2b(secret.encode("utf-8"), digest_size=32, salt=salt, person=_PERSON).digest()
    return hmac.compare_digest(actual, expected)


def parse_bearer(header: str | None) -> str:
    """The token from an ``Authorization: Bearer <token>`` header value.

    Raises ``MissingApiKey`` when there is none; never puts the value in a message.
    """
    if header is None or not header.strip():
        raise MissingApiKey(
            "You didn't provide an API key. Send it as 'Authorization: Bearer mk-...'."
        )
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise MissingApiKey("The Authorization header must read 'Bearer <API key>'.")
    return token.strip()


@dataclass(frozen=True, slots=True)
class KeyFileReloaded:
    """The key file was read again; ``error`` is set when it was rejected (old state in force)."""

    keys: int
    tenants: int
    error: KeyFileError | None = None


@dataclass(frozen=True, slots=True)
class _Snapshot:
    signature: tuple[int, ...] | None
    digest: bytes
    mtime: float
    read_at: float


class KeyStore:
    """In-memory view of the key file, with change detection, atomic updates and authentication."""

    def __init__(self, path: StrPath) -> None:
        self.path = Path(path)
        self._keys: dict[str, KeyRecord] = {}
        self._tenants: dict[str, TenantRecord] = {}
        self._snapshot: _Snapshot | None = None
        self._error: KeyFileError | None = None

    @classmethod
    def open(cls, state_dir: StrPath) -> KeyStore:
        """The store for a state dir, loaded; a broken file raises ``KeyFileError``."""
        store = cls(ensure_state_dir(state_dir) / KEY_FILE_NAME)
        result = store.reload()
        if result.error is not None:
            raise result.error
        return store

    # --- authentication ---------------------------------------------------------------

    def authenticate(self, token: str, *, now: float, refresh: bool = True) -> KeyRecord:
        """The key record for a bearer token, or ``InvalidApiKey`` / ``ApiKeyRevoked`` / ``ApiKeyExpired``.

        With ``refresh`` (the default) the file is checked for changes first
        (normally one ``stat``), so revocations apply to the next request.
        Revoked and expired are only told apart from "wrong key" once the
        secret has matched: they reveal nothing to someone without the key.
        """
        if refresh:
            self.poll()
        key_id = split_secret(token)
        record = self._keys.get(key_id) if key_id is not None else None
        if record is None or not check_secret(token, record.secret_hash):
            shown = f" ({redact(token)})" if key_id is not None else ""
            logger.debug("api key rejected", extra={"fields": {"key_id": key_id, "reason": "unknown or wrong"}})
            raise InvalidApiKey(f"Incorrect API key provided{shown}.")
        if record.revoked:
            raise ApiKeyRevoked(f"API key {record.key_id} has been revoked.")
        if record.expired(now):
            raise ApiKeyExpired(f"API key {record.key_id} expired at {record.to_dict()['expires_at']}.")
        return record

    # --- queries ------------------------------------------------------------------------

    def get(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

    def list(self, *, include_revoked: bool = True) -> builtins.list[KeyRecord]:
        """Keys in creation order (what ``meshctl keys list`` shows)."""
        records = sorted(self._keys.values(), key=lambda k: (k.created_at, k.key_id))
        return [r for r in records if include_revoked or not r.revoked]

    def resolve(self, text: str) -> KeyRecord:
        """A key from user input: its id, its name, or a whole secret (to revoke a leaked key).

        A name shared by several keys resolves to the only one not revoked, if
        there is exactly one; otherwise ``AmbiguousKey``. ``KeyNotFound`` if none.
        """
        cleaned = text.strip()
        key_id = split_secret(cleaned) or cleaned
        if key_id in self._keys:
            return self._keys[key_id]
        named = [r for r in self._keys.values() if r.name == cleaned]
        live = [r for r in named if not r.revoked]
        if len(live) == 1:
            return live[0]
        if len(named) == 1:
            return named[0]
        if named:
            ids = ", ".join(sorted(r.key_id for r in named))
            raise AmbiguousKey(f"{len(named)} keys are named {cleaned!r} ({ids}); use the key id")
        raise KeyNotFound(f"no key has the id or name {redact(cleaned)!r}")

    def tenant(self, name: str) -> TenantRecord:
        """The tenant's record; a tenant not configured in the file is unrestricted."""
        return self._tenants.get(name) or TenantRecord(name)

    def tenants(self) -> builtins.list[TenantRecord]:
        """Configured tenants and those only named by keys, by name."""
        names = set(self._tenants) | {k.tenant for k in self._keys.values()}
        return [self.tenant(n) for n in sorted(names)]

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def last_error(self) -> KeyFileError | None:
        """The problem with the file on disk, if the state in force is an older one."""
        return self._error

    # --- changes --------------------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        now: float,
        tenant: str = DEFAULT_TENANT,
        models: tuple[str, ...] | None = None,
        limits: Limits = _NO_LIMITS,
        max_data_class: DataClass = DataClass.SECRET,
        expires_at: dt.datetime | None = None,
        created_by: str = "",
        note: str = "",
    ) -> tuple[KeyRecord, str]:
        """Create a key; returns its record and the secret, which is not kept anywhere."""
        if expires_at is not None and expires_at.timestamp() <= now:
            raise InvalidKeySpec("the expiry time must be in the future")
        with self._writing() as (keys, _):
            if any(r.name == name and not r.revoked for r in keys.values()):
                raise InvalidKeySpec(f"a key named {name!r} already exists; revoke it or pick another name")
            key_id = new_key_id()
            while key_id in keys:  # 60 random bits: a clash is astronomically rare, but cheap to rule out
                key_id = new_key_id()
            secret = new_secret(key_id)
            record = KeyRecord(
                key_id=key_id,
                name=name,
                tenant=tenant,
                created_at=dt.datetime.fromtimestamp(now, dt.timezone.utc),
                secret_hash=hash_secret(secret, secrets.token_bytes(_SALT_BYTES)),
                models=models,
                limits=limits,
                max_data_class=max_data_class,
                expires_at=expires_at,
                created_by=created_by,
                note=note,
            )
            keys[key_id] = record
        logger.info("api key created", extra={"fields": {"key_id": key_id, "tenant": tenant}})
        return record, secret

    def revoke(self, text: str, *, now: float) -> KeyRecord:
        """Revoke a key (by id, name or secret); revoking a revoked key changes nothing."""
        with self._writing() as (keys, _):
            record = self.resolve(text)
            if not record.revoked:
                record = replace(record, revoked_at=dt.datetime.fromtimestamp(now, dt.timezone.utc))
                keys[record.key_id] = record
        logger.info("api key revoked", extra={"fields": {"key_id": record.key_id}})
        return record

    def set_tenant(self, tenant: TenantRecord) -> TenantRecord:
        """Configure (or replace) a tenant's limits, models and data class ceiling."""
        with self._writing() as (_, tenants):
            tenants[tenant.name] = tenant
        logger.info("tenant configured", extra={"fields": {"tenant": tenant.name}})
        return tenant

    def remove_tenant(self, name: str) -> None:
        """Drop a tenant's configuration; its keys stay and become unrestricted at tenant level."""
        with self._writing() as (_, tenants):
            if tenants.pop(name, None) is None:
                raise TenantNotFound(f"tenant {name!r} is not configured")
        logger.info("tenant removed", extra={"fields": {"tenant": name}})

    # --- change detection ---------------------------------------------------------------

    def reload(self) -> KeyFileReloaded:
        """Re-read the file now; on error keep the state in force and report why."""
        return self._load(force=True) or KeyFileReloaded(len(self._keys), len(self._tenants))

    def poll(self) -> KeyFileReloaded | None:
        """Cheap check for changes on disk (normally one ``stat``); None when nothing changed."""
        snapshot = self._snapshot
        if snapshot is not None and self._stat_signature() == snapshot.signature:
            racy = snapshot.signature is not None and snapshot.read_at - snapshot.mtime < _RACY_WINDOW
            if not racy:
                return None
        return self._load(force=False)

    def _load(self, *, force: bool) -> KeyFileReloaded | None:
        try:
            signature, data, mtime = self._read()
        except KeyFileError as exc:
            return self._fail(exc, _Snapshot(self._stat_signature(), b"", 0.0, time.time()))
        digest = hashlib.sha256(data).digest()
        snapshot = _Snapshot(signature, digest, mtime, time.time())
        if not force and self._snapshot is not None and digest == self._snapshot.digest:
            self._snapshot = snapshot
            return None
        try:
            keys, tenants = parse_key_file(data.decode("utf-8"), path=self.path)
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            return self._fail(KeyFileError("not valid UTF-8", path=self.path, line=line), snapshot)
        except KeyFileError as exc:
            return self._fail(exc, snapshot)
        self._keys, self._tenants, self._error, self._snapshot = keys, tenants, None, snapshot
        logger.debug("key file loaded", extra={"fields": {"keys": len(keys), "tenants": len(tenants)}})
        return KeyFileReloaded(len(keys), len(tenants))

    def _fail(self, error: KeyFileError, snapshot: _Snapshot) -> KeyFileReloaded:
        # Remember the broken state so poll() reports it once, not on every request.
        if self._error is None or self._error.message != error.message:
            logger.warning("key file rejected; previous keys stay in force",
                           extra={"fields": {"reason": error.message}})
        self._snapshot = snapshot
        self._error = error
        return KeyFileReloaded(len(self._keys), len(self._tenants), error)

    def _read(self) -> tuple[tuple[int, ...] | None, bytes, float]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, b"", 0.0  # no file yet: no keys
        except OSError as exc:
            raise KeyFileError(f"cannot open: {exc.strerror}", path=self.path) from exc
        try:
            st = os.fstat(fd)
            self._check_file(st)
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
        return _signature(st), b"".join(chunks), st.st_mtime

    def _check_file(self, st: os.stat_result) -> None:
        # Whoever can write this file can mint keys; whoever can read it learns the tenants.
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError("not a regular file", path=self.path)
        if st.st_uid != os.geteuid():
            raise KeyFileError(f"owned by uid {st.st_uid}, not by meshd's uid {os.geteuid()}", path=self.path)
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise KeyFileError(
                f"mode {stat.S_IMODE(st.st_mode):04o} gives other users access; run `chmod 600 {self.path}`",
                path=self.path,
            )

    def _stat_signature(self) -> tuple[int, ...] | None:
        try:
            return _signature(os.stat(self.path, follow_symlinks=False))
        except FileNotFoundError:
            return None

    @contextmanager
    def _writing(self) -> Iterator[tuple[dict[str, KeyRecord], dict[str, TenantRecord]]]:
        """Hold the write lock, sync with disk, yield copies to edit, then write them if changed.

        On any failure the in-memory state is put back, so a failed write
        never hides a revocation found on disk.
        """
        with self._write_lock():
            saved = (self._keys, self._tenants, self._snapshot, self._error)
            try:
                self._load(force=False)
                if self._error is not None:
                    raise self._error
                keys, tenants = dict(self._keys), dict(self._tenants)
                yield keys, tenants
                if keys != self._keys or tenants != self._tenants:
                    data = render_key_file(keys.values(), tenants.values()).encode("utf-8")
                    atomic_write(self.path, data, mode=PRIVATE_FILE_MODE)
                    st = os.stat(self.path, follow_symlinks=False)
                    self._snapshot = _Snapshot(_signature(st), hashlib.sha256(data).digest(), st.st_mtime, time.time())
                self._keys, self._tenants = keys, tenants
            except BaseException:
                self._keys, self._tenants, self._snapshot, self._error = saved
                raise

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        ensure_state_dir(self.path.parent)
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        except OSError as exc:
            raise KeyFileError(f"cannot open lock file: {exc.strerror}", path=lock_path) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # writers hold it for milliseconds
            yield
        finally:
            os.close(fd)


def _signature(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


__all__ = [
    "KEY_FILE_NAME",
    "KeyFileReloaded",
    "KeyStore",
    "check_secret",
    "hash_secret",
    "parse_bearer",
]

"""The trust store: which peers this node trusts, for which roles.

The file (``<state dir>/trust.toml``) is the truth; a ``TrustStore`` holds the
last good state read from it. The daemon calls ``poll()`` about once a
second: a ``stat`` when nothing changed, a re-read when something did, and
it gets back the changes as events (``PeerRevoked`` means: close that peer's
connections now). A broken hand edit is reported once, with its line, and
the previous state stays in force until the file is fixed.

Writes (``add``, ``update``, ``revoke``) first pick up any edits already on
disk, refuse to overwrite a broken file, then replace the file atomically
under a small ``flock`` so two writers cannot lose each other's changes.

Not thread-safe: use it from one thread (the daemon's event loop). The file
is tiny, so every call does its I/O synchronously.
"""

from __future__ import annotations

import builtins
import datetime as dt
import fcntl
import hashlib
import logging
import os
import stat
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from identity.errors import InvalidNodeId, StateDirError
from identity.nodeid import ID_LENGTH, PREFIX, NodeId, normalize
from identity.statedir import PRIVATE_FILE_MODE, StrPath, atomic_write, ensure_state_dir

from .trust_file import parse_trust_file, render_trust_file
from .trust_model import (
    AmbiguousNodeId,
    PeerNotTrusted,
    ReloadResult,
    Role,
    TrustChange,
    TrustEntry,
    TrustFileError,
    diff_entries,
)

logger = logging.getLogger(__name__)

TRUST_FILE_NAME = "trust.toml"
# A file modified within this many seconds of our last read may have changed
# again without a visible mtime/size change (coarse timestamps): re-read it.
_RACY_WINDOW = 2.0
_MIN_PREFIX = 4


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What we last read: the file's identity (None if absent) and content hash."""

    signature: tuple[int, ...] | None
    digest: bytes
    mtime: float
    read_at: float


class TrustStore:
    """In-memory view of the trust file, with change detection and atomic updates."""

    def __init__(self, path: StrPath) -> None:
        self.path = Path(path)
        self._entries: dict[NodeId, TrustEntry] = {}
        self._snapshot: _Snapshot | None = None
        self._error: TrustFileError | None = None

    @classmethod
    def open(cls, state_dir: StrPath) -> TrustStore:
        """The store for a state dir, loaded; a broken file raises ``TrustFileError``.

        (At start-up there is no previous good state to fall back to. A caller
        that prefers to start with no trusted peers can use
        ``TrustStore(path).reload()`` and inspect the result instead.)
        """
        store = cls(ensure_state_dir(state_dir) / TRUST_FILE_NAME)
        result = store.reload()
        if result.error is not None:
            raise result.error
        return store

    # --- queries ----------------------------------------------------------------------

    def get(self, node_id: NodeId) -> TrustEntry | None:
        return self._entries.get(node_id)

    def list(self) -> builtins.list[TrustEntry]:
        """Entries sorted by name, then id (the order ``meshctl trust list`` shows)."""
        return sorted(self._entries.values(), key=lambda e: (e.name.casefold(), e.node_id))

    def roles_of(self, node_id: NodeId) -> frozenset[Role]:
        entry = self._entries.get(node_id)
        return entry.roles if entry is not None else frozenset()

    def allows(self, node_id: NodeId, role: Role | str) -> bool:
        entry = self._entries.get(node_id)
        return entry is not None and entry.allows(role)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[TrustEntry]:
        return iter(self.list())

    @property
    def last_error(self) -> TrustFileError | None:
        """The problem with the file on disk, if the state in force is an older one."""
        return self._error

    def resolve(self, text: str) -> NodeId:
        """A node id from user input: a full id, or a unique prefix of a trusted peer's id.

        A full-length id is always parsed strictly (so a typo is an error, never
        a prefix match). Raises ``InvalidNodeId``, ``PeerNotTrusted`` or
        ``AmbiguousNodeId``.
        """
        cleaned = normalize(text)
        if len(cleaned) >= ID_LENGTH:
            return NodeId.parse(text)
        # Short forms are shown with the prefix (MESHD-7Q2K-ABCD), so a leading
        # MESHD is the prefix; an id whose data starts with MESHD needs it twice.
        if cleaned.startswith(PREFIX):
            cleaned = cleaned[len(PREFIX) :]
        if len(cleaned) < _MIN_PREFIX:
            raise InvalidNodeId(f"{text!r} is too short; give at least {_MIN_PREFIX} characters of the id")
        matches = sorted(n for n in self._entries if n.compact.startswith(cleaned))
        if not matches:
            raise PeerNotTrusted(f"no trusted peer has an id starting with {text!r}")
        if len(matches) > 1:
            shown = ", ".join(m.short(3) for m in matches[:5])
            raise AmbiguousNodeId(f"{text!r} matches {len(matches)} trusted peers ({shown}); give more of the id")
        return matches[0]

    # --- change detection -------------------------------------------------------------

    def reload(self) -> ReloadResult:
        """Re-read the file now; on error keep the state in force and report why."""
        return self._load(force=True) or ReloadResult()

    def poll(self) -> ReloadResult | None:
        """Cheap check for changes on disk; None when nothing changed.

        Normally one ``stat``. Within a couple of seconds of a modification the
        file is re-read and hashed too, because a second edit in the same
        timestamp tick with the same size would not show in ``stat``. A broken
        file is reported once per distinct file state, not on every poll.
        """
        snapshot = self._snapshot
        if snapshot is not None and self._stat_signature() == snapshot.signature:
            racy = snapshot.signature is not None and snapshot.read_at - snapshot.mtime < _RACY_WINDOW
            if not racy:
                return None
        return self._load(force=False)

    def _load(self, *, force: bool) -> ReloadResult | None:
        try:
            signature, data, mtime = self._read()
        except TrustFileError as exc:
            return self._fail(exc, signature=self._stat_signature(), digest=b"", mtime=0.0)
        digest = hashlib.sha256(data).digest()
        if not force and self._snapshot is not None and digest == self._snapshot.digest:
            self._snapshot = _Snapshot(signature, digest, mtime, time.time())
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            error = TrustFileError("not valid UTF-8", path=self.path, line=line)
            return self._fail(error, signature=signature, digest=digest, mtime=mtime)
        try:
            entries = parse_trust_file(text, path=self.path)
        except TrustFileError as exc:
            return self._fail(exc, signature=signature, digest=digest, mtime=mtime)
        changes = diff_entries(self._entries, entries)
        self._entries = entries
        self._error = None
        self._snapshot = _Snapshot(signature, digest, mtime, time.time())
        if changes:
            logger.debug("trust file reloaded", extra={"path": str(self.path), "changes": len(changes)})
        return ReloadResult(changes=changes)

    def _fail(
        self, error: TrustFileError, *, signature: tuple[int, ...] | None, digest: bytes, mtime: float
    ) -> ReloadResult:
        # Remember the broken state so poll() reports it once, not every second.
        self._snapshot = _Snapshot(signature, digest, mtime, time.time())
        self._error = error
        logger.debug("trust file rejected", extra={"path": str(self.path), "reason": error.message})
        return ReloadResult(error=error)

    def _read(self) -> tuple[tuple[int, ...] | None, bytes, float]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, b"", 0.0  # no file: nobody is trusted
        except OSError as exc:
            raise TrustFileError(f"cannot open: {exc.strerror}", path=self.path) from exc
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
        # Whoever can write this file can grant themselves every role.
        if not stat.S_ISREG(st.st_mode):
            raise TrustFileError("not a regular file", path=self.path)
        if st.st_uid != os.geteuid():
            raise TrustFileError(f"owned by uid {st.st_uid}, not by meshd's uid {os.geteuid()}", path=self.path)
        if stat.S_IMODE(st.st_mode) & 0o022:
            raise TrustFileError(
                f"mode {stat.S_IMODE(st.st_mode):04o} lets other users change it; run `chmod 600 {self.path}`",
                path=self.path,
            )

    def _stat_signature(self) -> tuple[int, ...] | None:
        try:
            return _signature(os.stat(self.path, follow_symlinks=False))
        except FileNotFoundError:
            return None

    # --- changes ----------------------------------------------------------------------

    def add(
        self,
        node_id: NodeId,
        *,
        roles: Iterable[Role | str],
        name: str | None = None,
        note: str | None = None,
        added_by: str = "",
        now: dt.datetime | None = None,
    ) -> tuple[TrustChange, ...]:
        """Trust a peer, or update roles (and name/note if given) of one already trusted.

        Returns every change applied to the state in force, including hand
        edits picked up from disk first.
        """
        wanted = frozenset(Role.parse(str(r)) for r in roles)
        with self._writing() as (before, entries):
            current = entries.get(node_id)
            if current is None:
                entries[node_id] = TrustEntry(
                    node_id=node_id,
                    name=name or "",
                    roles=wanted,
                    added_at=now or dt.datetime.now(dt.timezone.utc),
                    added_by=added_by,
                    note=note or "",
                )
            else:
                entries[node_id] = _updated(current, roles=wanted, name=name, note=note)
        return self._commit(before, entries)

    def update(
        self,
        node_id: NodeId,
        *,
        roles: Iterable[Role | str] | None = None,
        name: str | None = None,
        note: str | None = None,
    ) -> tuple[TrustChange, ...]:
        """Change what is given of a trusted peer; ``PeerNotTrusted`` if it is not."""
        wanted = None if roles is None else frozenset(Role.parse(str(r)) for r in roles)
        with self._writing() as (before, entries):
            current = entries.get(node_id)
            if current is None:
                raise PeerNotTrusted(f"{node_id} is not trusted")
            entries[node_id] = _updated(current, roles=wanted, name=name, note=note)
        return self._commit(before, entries)

    def revoke(self, node_id: NodeId) -> tuple[TrustChange, ...]:
        """Stop trusting a peer; ``PeerNotTrusted`` if it is not trusted."""
        with self._writing() as (before, entries):
            if entries.pop(node_id, None) is None:
                raise PeerNotTrusted(f"{node_id} is not trusted")
        return self._commit(before, entries)

    @contextmanager
    def _writing(self) -> Iterator[tuple[dict[NodeId, TrustEntry], dict[NodeId, TrustEntry]]]:
        """Hold the write lock, sync with disk, yield (state before, state to edit), write it.

        If anything fails, the in-memory state (and what we know of the file) is
        put back as it was, so the next ``poll()`` still reports the edits found
        on disk: the daemon must not miss a revocation because a write failed.
        """
        with self._write_lock():
            saved = (dict(self._entries), self._snapshot, self._error)
            try:
                self._load(force=False)
                if self._error is not None:
                    raise self._error
                entries = dict(self._entries)
                yield saved[0], entries
                if entries != self._entries:
                    data = render_trust_file(entries.values()).encode("utf-8")
                    atomic_write(self.path, data, mode=PRIVATE_FILE_MODE)
                    st = os.stat(self.path, follow_symlinks=False)
                    digest = hashlib.sha256(data).digest()
                    self._snapshot = _Snapshot(_signature(st), digest, st.st_mtime, time.time())
            except BaseException:
                self._entries, self._snapshot, self._error = saved
                raise

    def _commit(self, before: dict[NodeId, TrustEntry], entries: dict[NodeId, TrustEntry]) -> tuple[TrustChange, ...]:
        self._entries = entries
        changes = diff_entries(before, entries)
        for change in changes:
            logger.info("trust changed", extra={"event": type(change).__name__, "node_id": str(change.node_id)})
        return changes

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        except OSError as exc:
            raise StateDirError(f"cannot open {lock_path}: {exc.strerror}", path=lock_path) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # writers hold it for milliseconds
            yield
        finally:
            os.close(fd)


def _updated(entry: TrustEntry, *, roles: frozenset[Role] | None, name: str | None, note: str | None) -> TrustEntry:
    return TrustEntry(
        node_id=entry.node_id,
        name=entry.name if name is None else name,
        roles=entry.roles if roles is None else roles,
        added_at=entry.added_at,
        added_by=entry.added_by,
        note=entry.note if note is None else note,
    )


def _signature(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


__all__ = ["TRUST_FILE_NAME", "TrustStore"]

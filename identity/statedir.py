"""The state directory: creation, permission checks, atomic writes and the daemon lock.

Everything secret lives in one directory owned by the daemon's user with mode
0700, or 0710 when an admin group may reach the admin socket in it (group
traverse only: members can open a name they know, never list, and every file
keeps its own 0600). Files are replaced atomically (temp file in the same
directory, fsync, rename, fsync of the directory) so a crash never leaves a
half-written key or trust file behind. Permission problems are refused with a one-line message
that says how to fix them; nothing is silently chmod-ed or replaced, because a
loosened mode may mean someone else already read the file.

The lock is an ``flock`` on ``<state dir>/meshd.lock``: the kernel releases it
when the holding process exits, however it exits, so there is no stale-lock
clean-up. The file's content (the holder's PID) is informational only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .errors import InsecurePermissions, StateDirError, StateDirLocked

logger = logging.getLogger(__name__)

LOCK_FILE_NAME = "meshd.lock"
DIR_MODE = 0o700
GROUP_DIR_MODE = 0o710  # DIR_MODE plus group traverse, for the admin group (share_state_dir)
PRIVATE_FILE_MODE = 0o600

StrPath = str | os.PathLike[str]


def ensure_state_dir(path: StrPath) -> Path:
    """Create the state directory (mode 0700) if missing and check an existing one.

    Raises ``InsecurePermissions`` when the directory is accessible to group or
    others, or owned by another user; ``StateDirError`` when it is not a directory.
    """
    directory = Path(path)
    try:
        directory.mkdir(mode=DIR_MODE, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StateDirError(f"cannot create state dir {directory}: {exc.strerror}", path=directory) from exc
    else:
        # mkdir's mode is filtered by the umask; make the intended mode explicit.
        os.chmod(directory, DIR_MODE)
        logger.info("created state dir", extra={"state_dir": str(directory)})
    check_private_dir(directory)
    return directory


def check_private_dir(path: StrPath) -> None:
    """Refuse a state directory that another user could read or write (group traverse is allowed)."""
    directory = Path(path)
    try:
        st = os.stat(directory)
    except FileNotFoundError as exc:
        raise StateDirError(f"state dir {directory} does not exist", path=directory) from exc
    except OSError as exc:
        raise StateDirError(f"cannot stat state dir {directory}: {exc.strerror}", path=directory) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"state dir {directory} is not a directory", path=directory)
    # Group execute alone lets nobody list, read or write anything: it is what
    # share_state_dir sets, so the admin group can reach the admin socket.
    _check_owner_and_mode(directory, st, kind="state dir", fix=f"chmod 700 {directory}",
                          allowed=GROUP_DIR_MODE & 0o077)


def share_state_dir(path: StrPath, gid: int | None) -> None:
    """Let group ``gid`` traverse the state dir (0710, group ``gid``), or with ``None`` stop that (0700).

    Traverse is all the group gets: its members can connect to a socket made
    0660 for that group, and nothing else here is open to them, because every
    other file is 0600 (or public, like the TLS certificate). Changing the
    group needs root or membership of ``gid``; the ``OSError`` says so.
    """
    directory = Path(path)
    check_private_dir(directory)
    if gid is None:
        os.chmod(directory, DIR_MODE)
        return
    os.chown(directory, -1, gid)
    os.chmod(directory, GROUP_DIR_MODE)


def check_private_file(path: Path, st: os.stat_result) -> None:
    """Refuse a secret file that is not a regular file of ours with mode 0600 or stricter."""
    if not stat.S_ISREG(st.st_mode):
        raise StateDirError(f"{path} is not a regular file", path=path)
    _check_owner_and_mode(path, st, kind="file", fix=f"chmod 600 {path}")


def _check_owner_and_mode(path: Path, st: os.stat_result, *, kind: str, fix: str, allowed: int = 0) -> None:
    euid = os.geteuid()
    if st.st_uid != euid:
        raise InsecurePermissions(
            f"refusing {kind} {path}: owned by uid {st.st_uid}, but meshd runs as uid {euid}",
            path=path,
        )
    loose = stat.S_IMODE(st.st_mode) & 0o077 & ~allowed
    if loose:
        raise InsecurePermissions(
            f"refusing {kind} {path}: mode {stat.S_IMODE(st.st_mode):04o} gives group/others "
            f"access; run `{fix}` if the contents are still trusted",
            path=path,
        )


def read_private_file(path: StrPath) -> bytes:
    """Read a secret file after checking (on the open descriptor) that it is private.

    Symlinks are refused (``O_NOFOLLOW``) so the check and the read are about the
    same file. ``FileNotFoundError`` propagates unchanged for callers that create
    the file on first use.
    """
    file_path = Path(path)
    try:
        fd = os.open(file_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateDirError(f"{file_path} is a symlink; refusing to follow it", path=file_path) from exc
        raise StateDirError(f"cannot open {file_path}: {exc.strerror}", path=file_path) from exc
    try:
        check_private_file(file_path, os.fstat(fd))
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def atomic_write(path: StrPath, data: bytes, *, mode: int = PRIVATE_FILE_MODE, exclusive: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically.

    The data goes to a fresh temp file in the same directory (created with
    ``mode`` from the start, so it is never briefly world-readable), is fsync-ed,
    then renamed over ``path``; the directory is fsync-ed so the rename survives
    a crash. With ``exclusive=True`` the final step is a hard link instead of a
    rename and raises ``FileExistsError`` if ``path`` already exists: used to
    create the node key without ever overwriting one.
    """
    target = Path(path)
    directory = target.parent
    tmp = directory / f".{target.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have filtered the creation mode
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, target)
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the state dir lock -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LockHolder:
    """Who holds a state dir lock; ``pid`` is None if it could not be read."""

    pid: int | None


class StateDirLock:
    """An exclusive ``flock`` on ``<state_dir>/meshd.lock`` held for the life of the process.

    ``acquire()`` raises ``StateDirLocked`` (with the holder's PID when known)
    instead of waiting. The lock is released by ``release()``, by leaving the
    ``with`` block, or by the kernel when the process exits. The descriptor is
    close-on-exec, so spawned backends do not inherit the lock; a plain
    ``fork()`` without exec would, which meshd never does.
    """

    def __init__(self, state_dir: StrPath) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_FILE_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> StateDirLock:
        if self._fd is not None:
            return self
        fd = _open_lock_file(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            pid = _read_pid(fd)
            os.close(fd)
            holder = f"pid {pid}" if pid is not None else "a process that is still starting"
            raise StateDirLocked(
                f"state dir {self.state_dir} is in use by another meshd ({holder}); "
                "stop it or use a different state dir",
                path=self.state_dir,
                pid=pid,
            ) from exc
        except OSError as exc:
            os.close(fd)
            raise StateDirError(f"cannot lock {self.path}: {exc.strerror}", path=self.path) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        logger.debug("state dir locked", extra={"state_dir": str(self.state_dir)})
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # Never unlink the lock file: another process may already be blocked on
        # (or about to open) this inode, and unlinking would let two holders exist.
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> StateDirLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"StateDirLock({str(self.state_dir)!r}, held={self.held})"


def lock_state_dir(state_dir: StrPath) -> StateDirLock:
    """Create/check the state dir and take its lock; the daemon's first step."""
    ensure_state_dir(state_dir)
    return StateDirLock(state_dir).acquire()


def probe_lock(state_dir: StrPath) -> LockHolder | None:
    """Return who holds the state dir lock, or None if nobody does (e.g. for ``meshctl``)."""
    path = Path(state_dir) / LOCK_FILE_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateDirError(f"cannot open {path}: {exc.strerror}", path=path) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return LockHolder(pid=_read_pid(fd))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    except OSError as exc:
        raise StateDirError(f"cannot open lock file {path}: {exc.strerror}", path=path) from exc


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


__all__ = [
    "DIR_MODE",
    "GROUP_DIR_MODE",
    "LOCK_FILE_NAME",
    "PRIVATE_FILE_MODE",
    "LockHolder",
    "StateDirLock",
    "atomic_write",
    "check_private_dir",
    "check_private_file",
    "ensure_state_dir",
    "lock_state_dir",
    "probe_lock",
    "read_private_file",
    "share_state_dir",
]

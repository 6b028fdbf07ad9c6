"""State dir creation and permission checks, atomic writes, and the daemon lock."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from identity import (
    InsecurePermissions,
    StateDirError,
    StateDirLock,
    StateDirLocked,
    atomic_write,
    ensure_state_dir,
    lock_state_dir,
    probe_lock,
    read_private_file,
)
from identity.statedir import share_state_dir

REPO = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def loose_umask():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_state_dir_is_created_0700_whatever_the_umask(tmp_path: Path, loose_umask: None) -> None:
    state = tmp_path / "a" / "b" / "state"
    assert ensure_state_dir(state) == state
    assert _mode(state) == 0o700


def test_existing_private_state_dir_is_accepted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chmod(state, 0o700)
    ensure_state_dir(state)
    assert _mode(state) == 0o700


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o701, 0o770, 0o730, 0o711])
def test_state_dir_open_to_others_is_refused_not_fixed(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, mode)
    with pytest.raises(InsecurePermissions, match="chmod 700") as info:
        ensure_state_dir(state)
    assert "\n" not in str(info.value)
    assert _mode(state) == mode


def test_group_traverse_only_is_accepted(tmp_path: Path) -> None:
    # 0710 is what share_state_dir sets for admin.group: group members can reach
    # the admin socket by name but cannot list the directory or open a 0600 file.
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o710)
    ensure_state_dir(state)
    assert _mode(state) == 0o710


def test_share_state_dir_opens_traverse_to_one_group_and_closes_it(tmp_path: Path) -> None:
    state = ensure_state_dir(tmp_path / "state")
    atomic_write(state / "secret", b"s3cret")
    gid = os.getegid()  # a group we may always give files to, root or not
    share_state_dir(state, gid)
    assert _mode(state) == 0o710 and os.stat(state).st_gid == gid
    assert _mode(state / "secret") == 0o600  # files keep their own mode
    lock_state_dir(state).release()  # a shared dir is still a valid state dir
    share_state_dir(state, None)
    assert _mode(state) == 0o700


def test_share_state_dir_refuses_an_insecure_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o750)
    with pytest.raises(InsecurePermissions):
        share_state_dir(state, os.getegid())
    assert _mode(state) == 0o750


def test_state_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_text("x")
    with pytest.raises(StateDirError, match="not a directory"):
        ensure_state_dir(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a file owned by someone else")
def test_state_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 4242, 4242)
    with pytest.raises(InsecurePermissions, match="uid 4242"):
        ensure_state_dir(state)


# --- atomic writes --------------------------------------------------------------------


def test_atomic_write_replaces_content_with_the_requested_mode(tmp_path: Path, loose_umask: None) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    atomic_write(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_atomic_write_replaces_the_inode_rather_than_writing_in_place(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    reader = path.open("rb")  # a reader that opened the old file keeps seeing it whole
    atomic_write(path, b"new")
    assert reader.read() == b"old"
    reader.close()
    assert path.read_bytes() == b"new"


def test_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write(path, object())  # type: ignore[arg-type]  # fails after the temp file exists
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_exclusive_atomic_write_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "key"
    atomic_write(path, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write(path, b"second", exclusive=True)
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


def test_read_private_file_checks_mode_and_refuses_symlinks(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    atomic_write(path, b"s3cret")
    assert read_private_file(path) == b"s3cret"
    os.chmod(path, 0o640)
    with pytest.raises(InsecurePermissions, match="chmod 600"):
        read_private_file(path)
    os.chmod(path, 0o600)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(StateDirError, match="symlink"):
        read_private_file(link)
    with pytest.raises(FileNotFoundError):
        read_private_file(tmp_path / "missing")


# --- the lock ---------------------------------------------------------------------------

_HOLDER = """
import sys
from identity import lock_state_dir
lock = lock_state_dir(sys.argv[1])
print("locked", flush=True)
sys.stdin.readline()
"""


def _spawn_holder(state: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(state)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        pytest.fail(f"lock holder did not start: {line!r}")
    return proc


def test_second_holder_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with _spawn_holder(state) as proc:
        _check_refused_while_held(state, proc)
        proc.communicate("\n", timeout=10)
    # The holder exited normally: the lock is free again.
    assert probe_lock(state) is None
    with lock_state_dir(state) as lock:
        assert lock.held
        assert (state / "meshd.lock").read_text().strip() == str(os.getpid())


def _check_refused_while_held(state: Path, proc: subprocess.Popen[str]) -> None:
    try:
        with pytest.raises(StateDirLocked, match=f"pid {proc.pid}") as info:
            lock_state_dir(state)
        assert info.value.pid == proc.pid
        assert info.value.code == "state_dir_locked"
        assert "\n" not in str(info.value)
        holder = probe_lock(state)
        assert holder is not None and holder.pid == proc.pid
    except BaseException:
        proc.kill()
        raise


def test_lock_is_released_when_the_holder_is_killed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with _spawn_holder(state) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    lock = lock_state_dir(state)
    assert lock.held
    lock.release()


def test_lock_is_exclusive_within_one_process_and_reusable_after_release(tmp_path: Path) -> None:
    state = ensure_state_dir(tmp_path / "state")
    first = StateDirLock(state).acquire()
    with pytest.raises(StateDirLocked):
        StateDirLock(state).acquire()
    first.release()
    assert not first.held
    assert probe_lock(state) is None
    second = StateDirLock(state).acquire()
    assert second.held
    second.release()
    second.release()  # idempotent


def test_probe_on_a_fresh_dir_finds_no_holder(tmp_path: Path) -> None:
    assert probe_lock(tmp_path) is None


def test_lock_refuses_an_insecure_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    with pytest.raises(InsecurePermissions):
        lock_state_dir(state)

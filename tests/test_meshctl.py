"""meshctl against a real daemon: identity, trust changes, and its failure modes."""

from __future__ import annotations

import grp
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from identity import NodeKey, load_node_key
from peers import TRUST_FILE_NAME, TrustStore


def meshctl(state_dir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshd.cli.meshctl", "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, timeout=30)


def new_peer_id() -> str:
    return str(NodeKey.generate().node_id)


@pytest.fixture
def node(daemon_factory):
    return daemon_factory("--no-default-model", "--name", "test-node")


def test_id_is_the_key_on_disk_and_the_served_header(node):
    out = meshctl(node.state_dir, "id")
    assert out.returncode == 0, out.stderr
    node_id, name = out.stdout.split()
    assert node_id == str(load_node_key(node.state_dir / "node_key.pem").node_id)
    assert name == "test-node"
    data = json.loads(meshctl(node.state_dir, "--json", "id").stdout)
    assert data["node_id"] == node_id and data["short_id"] and node_id.startswith(data["short_id"])
    status, health = node.get("/health")
    assert health["node"] == node_id


def test_id_survives_restart(daemon_factory, tmp_path):
    first = daemon_factory("--no-default-model")
    before = meshctl(first.state_dir, "id").stdout.split()[0]
    first.stop()
    again = daemon_factory("--no-default-model", "--state-dir", str(first.state_dir))
    assert again.proc.poll() is None
    assert meshctl(first.state_dir, "id").stdout.split()[0] == before


def test_trust_add_list_show_revoke(node):
    peer = new_peer_id()
    out = meshctl(node.state_dir, "trust", "add", peer, "--name", "laptop", "--roles", "serve,use")
    assert out.returncode == 0, out.stderr
    assert "trusted" in out.stdout and "serve, use" in out.stdout
    listed = json.loads(meshctl(node.state_dir, "trust", "list", "--json").stdout)["entries"]
    assert [(e["node_id"], e["name"], e["roles"]) for e in listed] == [(peer, "laptop", ["serve", "use"])]
    assert listed[0]["added_by"]  # from the socket's peer credentials
    # a lower-case id without dashes is the same peer; adding again updates roles
    out = meshctl(node.state_dir, "trust", "add", peer.replace("-", "").lower(), "--roles", "cache")
    assert out.returncode == 0 and "updated" in out.stdout
    shown = meshctl(node.state_dir, "trust", "show", peer[:16])
    assert shown.returncode == 0 and "cache" in shown.stdout and "laptop" in shown.stdout
    table = meshctl(node.state_dir, "trust", "list").stdout
    assert "NODE ID" in table and peer in table
    out = meshctl(node.state_dir, "trust", "revoke", peer)
    assert out.returncode == 0 and peer in out.stdout
    assert json.loads(meshctl(node.state_dir, "trust", "list", "--json").stdout)["entries"] == []
    out = meshctl(node.state_dir, "trust", "revoke", peer)
    assert out.returncode == 1 and "not trusted" in out.stderr


def test_default_roles_are_all(node):
    peer = new_peer_id()
    meshctl(node.state_dir, "trust", "add", peer)
    entry = json.loads(meshctl(node.state_dir, "trust", "show", peer, "--json").stdout)["entry"]
    assert entry["roles"] == ["serve", "use", "cache", "tensor"]


def test_bad_input_is_exit_2_before_any_traffic(tmp_path, node):
    peer = new_peer_id()
    typo = peer[:-1] + ("A" if peer[-1] != "A" else "B")
    for state in (node.state_dir, tmp_path / "no-daemon-here"):
        out = meshctl(state, "trust", "add", typo)
        assert out.returncode == 2 and "invalid node id" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    out = meshctl(node.state_dir, "trust", "add", peer, "--roles", "serve,fly")
    assert out.returncode == 2 and "fly" in out.stderr
    own = meshctl(node.state_dir, "id").stdout.split()[0]
    out = meshctl(node.state_dir, "trust", "add", own)
    assert out.returncode == 2 and "own id" in out.stderr


def test_daemon_not_running_is_one_line_exit_1(tmp_path):
    out = meshctl(tmp_path, "trust", "list")
    assert out.returncode == 1
    assert out.stderr.strip() == f"meshctl: meshd is not running (no admin socket at {tmp_path / 'meshd.sock'})"


def test_hand_edit_is_picked_up_and_a_broken_edit_keeps_the_old_state(node):
    peer = NodeKey.generate().node_id
    store = TrustStore(node.state_dir / TRUST_FILE_NAME)
    store.reload()
    store.add(peer, roles=["serve"], name="edited")  # writes the file as a person's editor would

    def listed() -> list[str]:
        return [e["node_id"] for e in json.loads(meshctl(node.state_dir, "trust", "list", "--json").stdout)["entries"]]

    deadline = time.monotonic() + 10
    while str(peer) not in listed() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert listed() == [str(peer)]
    path = node.state_dir / TRUST_FILE_NAME
    path.write_text(path.read_text() + "\n[[peer]\nbroken = \n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = meshctl(node.state_dir, "trust", "list")
        if "warning" in out.stdout:
            break
        time.sleep(0.2)
    assert "warning: the trust file has an error" in out.stdout and "line" in out.stdout
    assert listed() == [str(peer)]  # the previous good state is still in force
    assert "trust file rejected" in node.log()


def test_file_permissions(node):
    state = node.state_dir
    admin_socket_set_up(state, 0o700)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "node_key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state / "meshd.sock").st_mode) == 0o600
    meshctl(state, "trust", "add", new_peer_id())
    assert stat.S_IMODE(os.stat(state / TRUST_FILE_NAME).st_mode) == 0o600


def test_key_never_logged(node):
    key_text = (node.state_dir / "node_key.pem").read_text()
    secret_lines = [line for line in key_text.splitlines() if line and not line.startswith(("#", "-----", "node-id"))]
    assert secret_lines
    assert not any(line in node.log() for line in secret_lines)


def test_second_daemon_on_same_state_dir_is_refused(node):
    out = subprocess.run([sys.executable, "-m", "meshd", "start", "--no-default-model", "--api-listen",
                          "127.0.0.1:0", "--state-dir", str(node.state_dir)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert f"pid {node.proc.pid}" in out.stderr and "in use" in out.stderr
    assert meshctl(node.state_dir, "id").returncode == 0  # the first one is unharmed


def test_loose_key_permissions_refuse_start(daemon_factory):
    first = daemon_factory("--no-default-model")
    first.stop()
    os.chmod(first.state_dir / "node_key.pem", 0o644)
    out = subprocess.run([sys.executable, "-m", "meshd", "start", "--no-default-model", "--api-listen",
                          "127.0.0.1:0", "--state-dir", str(first.state_dir)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "node_key.pem" in out.stderr


# --- admin.group: meshctl for members of a group, through a 0710 state dir -------------


@pytest.fixture
def admin_group():
    """A fresh system group, removed afterwards (needs root, like running meshctl as other users)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a group and runs meshctl as other users")
    if shutil.which("groupadd") is None or shutil.which("groupdel") is None:
        pytest.skip("groupadd/groupdel not installed")
    name = f"meshdt{secrets.token_hex(4)}"
    out = subprocess.run(["groupadd", name], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        pytest.skip(f"groupadd {name} failed: {out.stderr.strip()}")
    try:
        yield name, grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], capture_output=True, timeout=30)


def admin_socket_set_up(state: Path, dir_mode: int, timeout: float = 20) -> None:
    """/health answers before the admin socket exists: wait until it is there with its final modes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stat.S_IMODE(os.stat(state).st_mode) == dir_mode and (state / "meshd.sock").is_socket():
                return
        except FileNotFoundError:
            pass
        time.sleep(0.05)


REPO = Path(__file__).resolve().parents[1]
OTHER_USER_ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": "/"}


def _others_can_run(path: str) -> bool:
    real = Path(os.path.realpath(path))
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in (real, *real.parents))


@pytest.fixture
def other_python() -> str:
    """A Python >= 3.11 that users other than root can execute and that imports meshctl.

    The venv's interpreter may link into root's home (pyenv), which others cannot enter.
    """
    candidates = [sys.executable, shutil.which("python3.11"), shutil.which("python3"), "/usr/bin/python3"]
    for candidate in dict.fromkeys(c for c in candidates if c and os.path.exists(c)):
        if not _others_can_run(candidate):
            continue
        probe = subprocess.run([candidate, "-c", "import meshd.cli.meshctl"], capture_output=True, timeout=30,
                               env=OTHER_USER_ENV, cwd="/", user=64201, group=64201)
        if probe.returncode == 0:
            return candidate
    pytest.skip("no Python >= 3.11 that other users can run and that imports meshd.cli.meshctl")


def as_other_user(python: str, uid: int, groups: list[int], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, *argv], capture_output=True, text=True, timeout=30, env=OTHER_USER_ENV,
                          cwd="/", user=uid, group=uid, extra_groups=groups)


def test_admin_group_members_reach_the_socket_and_nothing_else(daemon_factory, admin_group, other_python):
    name, gid = admin_group
    # pytest's own tmp dirs are 0700: the state dir needs a parent other users may traverse.
    parent = Path(tempfile.mkdtemp(prefix="meshd-admin-group-"))
    node = None
    try:
        os.chmod(parent, 0o711)
        state = parent / "state"
        node = daemon_factory("--no-default-model", "--state-dir", str(state), env={"MESHD_ADMIN_GROUP": name})
        admin_socket_set_up(state, 0o710)
        st = os.stat(state)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o710, gid)
        sock = os.stat(state / "meshd.sock")
        assert (stat.S_IMODE(sock.st_mode), sock.st_gid) == (0o660, gid)
        assert stat.S_IMODE(os.stat(state / "node_key.pem").st_mode) == 0o600

        meshctl_id = ("-m", "meshd.cli.meshctl", "--state-dir", str(state), "id")
        member = as_other_user(other_python, 64201, [gid], *meshctl_id)
        assert member.returncode == 0, member.stderr
        assert member.stdout.split()[0] == str(load_node_key(state / "node_key.pem").node_id)
        # Traverse only: a member can neither list the state dir nor read the key.
        probe = ("-c", "import os, sys\n"
                 "for f in (lambda: os.listdir(sys.argv[1]), lambda: open(sys.argv[1] + '/node_key.pem').read()):\n"
                 "    try: f()\n"
                 "    except PermissionError: print('denied')\n"
                 "    else: print('allowed')\n", str(state))
        assert as_other_user(other_python, 64201, [gid], *probe).stdout.split() == ["denied", "denied"]

        outsider = as_other_user(other_python, 64202, [], *meshctl_id)
        assert outsider.returncode == 1 and "permission denied" in outsider.stderr
    finally:
        if node is not None:
            node.stop()
        shutil.rmtree(parent, ignore_errors=True)


def test_without_admin_group_a_shared_state_dir_is_closed_again(daemon_factory, admin_group):
    name, _ = admin_group
    first = daemon_factory("--no-default-model", env={"MESHD_ADMIN_GROUP": name})
    admin_socket_set_up(first.state_dir, 0o710)
    assert stat.S_IMODE(os.stat(first.state_dir).st_mode) == 0o710
    first.stop()
    state = first.state_dir
    daemon_factory("--no-default-model", "--state-dir", str(state))
    admin_socket_set_up(state, 0o700)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "meshd.sock").st_mode) == 0o600


def test_unknown_admin_group_refuses_start_in_one_line(daemon_factory):
    node = daemon_factory("--no-default-model", env={"MESHD_ADMIN_GROUP": "no-such-group-4711"}, ready=False)
    assert node.proc.wait(60) == 1
    log = node.log()
    assert "admin.group: there is no group named 'no-such-group-4711'" in log
    assert "Traceback" not in log

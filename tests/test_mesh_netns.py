"""Multi-host behaviour across Linux network namespaces: real multicast, real UDP."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netns import LabUnavailable, NetnsLab

pytestmark = pytest.mark.netns


@pytest.fixture
def lab_factory():
    labs: list[NetnsLab] = []

    def make(hosts: int) -> NetnsLab:
        try:
            lab = NetnsLab(hosts).__enter__()
        except LabUnavailable as exc:
            pytest.skip(str(exc))
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.destroy()


class NetnsDaemon:
    def __init__(self, host, state_dir: Path, log_path: Path, *args: str) -> None:
        self.host, self.state_dir, self.log_path = host, state_dir, log_path
        # The API listens on the namespace's address, beyond loopback: these tests are about the
        # mesh, not API keys (tests/test_api_auth.py covers those), so they run it open.
        argv = host.argv(sys.executable, "-m", "meshd", "start", "--state-dir", str(state_dir),
                         "--api-listen", f"{host.ip}:8764", "--mesh-listen", "0.0.0.0:8765",
                         "--insecure-no-auth", "--name", host.name, *args)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def meshctl(self, *args: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "meshd.cli.meshctl", "--state-dir", str(self.state_dir),
                              "--json", *args], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        return json.loads(out.stdout)

    def node_id(self) -> str:
        return self.meshctl("id")["node_id"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def netns_daemons(tmp_path):
    started: list[NetnsDaemon] = []

    def start(host, *args: str) -> NetnsDaemon:
        index = len(started)
        daemon = NetnsDaemon(host, tmp_path / f"state-{host.name}-{index}", tmp_path / f"{host.name}-{index}.log",
                             *args)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def wait_until(predicate, timeout: float, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except RuntimeError:
            last = None
        if last:
            return last
        time.sleep(interval)
    return last


def ready(daemon: NetnsDaemon) -> str:
    node_id = wait_until(lambda: daemon.node_id(), 30)
    assert node_id, daemon.log()
    return node_id


def test_three_daemons_discover_each_other_without_configuration(lab_factory, netns_daemons):
    lab = lab_factory(3)
    daemons = [netns_daemons(host, "--no-default-model") for host in lab.hosts]
    ids = [ready(d) for d in daemons]
    started = time.monotonic()
    for daemon, own in zip(daemons, ids):
        others = set(ids) - {own}

        def sees_all() -> bool:
            seen = {p["node_id"] for p in daemon.meshctl("peers")["peers"]}
            return others <= seen

        assert wait_until(sees_all, 20), (daemon.host.name, daemon.meshctl("peers"), daemon.log())
    elapsed = time.monotonic() - started
    peers = {p["node_id"]: p for p in daemons[0].meshctl("peers")["peers"]}
    assert peers[ids[1]]["name"] == "h1" and f"{lab.hosts[1].ip}:8765" in peers[ids[1]]["addresses"]
    assert "mdns" in peers[ids[1]]["sources"]
    print(f"three nodes discovered each other within {elapsed:.1f}s")


FORGER = r"""
import asyncio, base64, socket, sys, time
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
from identity import NodeKey, RecordSigner
from peers.announce import RECORD_KIND, SERVICE_TYPE, announcement_properties

victim, ip = sys.argv[1], sys.argv[2]
forger = NodeKey.generate()
props = announcement_properties(RecordSigner(forger, RECORD_KIND, ttl=600), forger.node_id, name="evil",
                                protocol_version=1, quic_port=9999, api_port=9998, boot_id="f" * 16, now=time.time())
props["id"] = victim  # claim someone else's id with our own signature

async def main():
    zc = AsyncZeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    info = AsyncServiceInfo(SERVICE_TYPE, f"forged-{forger.node_id.compact[:8]}.{SERVICE_TYPE}", port=9999,
                            properties=props, addresses=[socket.inet_aton(ip)], server="forged.local.")
    await zc.async_register_service(info)
    print("registered", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_spoofed_announcement_is_ignored_and_logged(lab_factory, netns_daemons, tmp_path):
    lab = lab_factory(2)
    honest = netns_daemons(lab.hosts[0], "--no-default-model")
    own = ready(honest)
    victim = str(__import__("identity").NodeKey.generate().node_id)
    script = tmp_path / "forge.py"
    script.write_text(FORGER)
    forger = subprocess.Popen(lab.hosts[1].argv(sys.executable, str(script), victim, lab.hosts[1].ip),
                              stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).parent.parent))
    try:
        assert forger.stdout.readline().strip() == "registered"
        assert wait_until(lambda: "ignored announcement" in honest.log(), 20), honest.log()
        peers = honest.meshctl("peers")["peers"]
        assert victim not in {p["node_id"] for p in peers}
        assert all(p["name"] != "evil" for p in peers)
        assert own
    finally:
        forger.kill()
        forger.wait()


FAST = {"MESHD_MESH_HEARTBEAT_S": "1", "MESHD_MESH_PEER_TIMEOUT_S": "4"}


def trust_all(daemons: list[NetnsDaemon], ids: list[str]) -> None:
    for daemon, own in zip(daemons, ids):
        for other in ids:
            if other != own:
                daemon.meshctl("trust", "add", other)


def states(daemon: NetnsDaemon) -> dict[str, str]:
    return {p["node_id"]: p["state"] for p in daemon.meshctl("peers")["peers"]}


def test_trusted_mesh_connects_and_survives_a_node_restart(lab_factory, netns_daemons, monkeypatch):
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)
    lab = lab_factory(3)
    daemons = [netns_daemons(host, "--no-default-model") for host in lab.hosts]
    ids = [ready(d) for d in daemons]
    trust_all(daemons, ids)
    for daemon, own in zip(daemons, ids):
        others = set(ids) - {own}
        assert wait_until(lambda: all(states(daemon).get(o) == "connected" for o in others), 20), \
            (daemon.meshctl("peers"), daemon.log())
    # RTT over the veth bridge is measured
    assert all(p["rtt_ms"] is not None for p in daemons[0].meshctl("peers")["peers"])

    victim = daemons[2]
    victim.proc.kill()  # no goodbye: the others must notice the silence
    victim.proc.wait()
    for daemon in daemons[:2]:
        assert wait_until(lambda: states(daemon).get(ids[2]) == "down", 15), daemon.meshctl("peers")
    again = netns_daemons(lab.hosts[2], "--no-default-model", "--state-dir", str(victim.state_dir))
    again.state_dir = victim.state_dir
    assert ready(again) == ids[2]  # same state dir, same identity
    for daemon in daemons[:2]:
        assert wait_until(lambda: states(daemon).get(ids[2]) == "connected", 20), daemon.meshctl("peers")


def test_untrusted_pair_stays_handshake_only(lab_factory, netns_daemons):
    lab = lab_factory(2)
    a, b = (netns_daemons(host, "--no-default-model") for host in lab.hosts)
    id_a, id_b = ready(a), ready(b)
    a.meshctl("trust", "add", id_b)  # only one side trusts
    assert wait_until(lambda: states(a).get(id_b) == "untrusted", 20), a.meshctl("peers")
    view = next(p for p in a.meshctl("peers")["peers"] if p["node_id"] == id_b)
    assert view["models"] == [] and view["load"] == {}
    assert states(b).get(id_a) == "untrusted"

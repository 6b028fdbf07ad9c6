"""Two real daemons over QUIC on loopback: trust gating, capabilities, revocation."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port


def meshctl(daemon, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "meshd.cli.meshctl", "--state-dir", str(daemon.state_dir),
                          "--json", *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_for(predicate, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout}s")


def peer_view(daemon, node_id: str) -> dict | None:
    return next((p for p in meshctl(daemon, "peers")["peers"] if p["node_id"] == node_id), None)


def wait_state(daemon, node_id: str, states: set[str], timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    view = None
    while time.monotonic() < deadline:
        view = peer_view(daemon, node_id)
        if view and view["state"] in states:
            return view
        time.sleep(0.2)
    raise AssertionError(f"{node_id} never reached {states}; last view {view}\n{daemon.log()}")


@pytest.fixture
def pair(daemon_factory):
    """A (serves the bundled model) and B (no model, dials A statically)."""
    mesh_a = free_port(socket.SOCK_DGRAM)
    a = daemon_factory("--mesh-listen", f"127.0.0.1:{mesh_a}", "--name", "alpha")
    b = daemon_factory("--no-default-model", "--peer", f"127.0.0.1:{mesh_a}", "--name", "beta")
    return a, b, meshctl(a, "id")["node_id"], meshctl(b, "id")["node_id"]


def test_untrusted_peers_get_only_a_refusal_then_connect_once_trusted(pair):
    a, b, id_a, id_b = pair
    view = wait_state(a, id_b, {"untrusted"})
    assert "refused" in view["detail"]
    assert view["models"] == [] and view["rtt_ms"] is None  # nothing but the handshake was exchanged
    table = subprocess.run([sys.executable, "-m", "meshd.cli.meshctl", "--state-dir", str(a.state_dir), "peers"],
                           capture_output=True, text=True).stdout
    assert f"untrusted — run meshctl trust add {id_b}" in table
    meshctl(a, "trust", "add", id_b, "--name", "beta")
    meshctl(b, "trust", "add", id_a, "--name", "alpha")
    view_b = wait_state(b, id_a, {"connected"})
    view_a = wait_state(a, id_b, {"connected"})
    # capabilities crossed: B sees A's model, A sees B's name; heartbeats measured an RTT
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (view_b["models"] and view_b["rtt_ms"] is not None):
        time.sleep(0.2)
        view_b = peer_view(b, id_a)
    assert [m["id"] for m in view_b["models"]] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert view_b["rtt_ms"] is not None and view_b["rtt_ms"] < 100
    assert view_a["name"] == "beta" and "inbound" in view_a["sources"]
    assert view_b["roles"] == ["cache", "serve", "tensor", "use"]


def test_tokens_per_s_and_model_identity_reach_a_peer(pair):
    """A real generation on A shows up in B's view of A as recent tokens/s, beside A's model identity."""
    import hashlib

    import openai

    a, b, id_a, id_b = pair
    meshctl(a, "trust", "add", id_b)
    meshctl(b, "trust", "add", id_a)
    wait_state(b, id_a, {"connected"})
    assert wait_for(lambda: (peer_view(b, id_a) or {}).get("load", {}).get("tokens_per_s") == 0, timeout=15)
    client = openai.OpenAI(base_url=a.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    reply = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt="Once upon a time",
                                      max_tokens=24, temperature=0)
    tokens = reply.usage.completion_tokens
    assert tokens > 0
    # The last minute's completion tokens over 60 s, rounded to one decimal. A capability
    # announcement sent mid-generation carries a partial count, so wait for the settled one.
    expected = round(tokens / 60.0, 1)
    view = wait_for(lambda: (v := peer_view(b, id_a)) and v["load"].get("tokens_per_s", 0) > 0 and v, timeout=15)
    view = wait_for(lambda: (v := peer_view(b, id_a)) and abs(v["load"]["tokens_per_s"] - expected) < 0.051 and v,
                    timeout=15)
    assert view["load"]["tokens_per_s"] == pytest.approx(expected, abs=0.051)
    node = wait_for(lambda: (v := peer_view(b, id_a)["node"]) and v["accelerators"] is not None and v, timeout=15)
    assert node["os"] == "linux" and node["cpu_count"] >= 1 and node["memory_bytes"] > 0
    assert node["accelerators"] == []  # this machine has none, and says so
    (model,) = view["models"]
    assert "streaming" in model["capabilities"] and "resume" in model["capabilities"]
    model = wait_for(lambda: (m := peer_view(b, id_a)["models"][0])["identity"] and m, timeout=30)
    identity = model["identity"]
    assert identity["architecture"] == "llama" and identity["format"] == "gguf"
    assert model["sha256"] == identity["file_sha256"] and len(model["sha256"]) == 64
    from conftest import _bundled_model

    assert model["sha256"] == hashlib.sha256(_bundled_model().read_bytes()).hexdigest()


def test_node_descriptor_is_honest():
    from meshd.mesh.capabilities import cpu_model, detect_accelerators, node_descriptor

    node = node_descriptor(detect_accelerators())
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        names = {line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")}
        assert node["cpu_model"] in names
    assert node["cpu_model"] == cpu_model()
    gpu_nodes = [*Path("/dev").glob("nvidia[0-9]*"), Path("/dev/kfd"), Path("/dev/dxg"), Path("/dev/dri")]
    if not any(p.exists() for p in gpu_nodes) and sys.platform != "darwin":
        # No GPU device here: an RPC-enabled llama.cpp says "offload supported" all the same,
        # and that must not turn into an invented accelerator.
        assert node["accelerators"] == []
    for accelerator in node["accelerators"]:
        assert accelerator["type"] in ("gpu", "igpu") and accelerator["via"] in ("llama.cpp", "mlx", "device")


def test_one_sided_trust_is_refused_with_a_clear_state(pair):
    a, b, id_a, id_b = pair
    meshctl(b, "trust", "add", id_a)  # B trusts A; A does not trust B
    view = wait_state(b, id_a, {"untrusted"})
    assert "peer refused us: untrusted" in view["detail"]
    assert wait_state(a, id_b, {"untrusted"})["detail"].startswith("we refused")


def test_revocation_disconnects_a_live_peer(pair):
    a, b, id_a, id_b = pair
    meshctl(a, "trust", "add", id_b)
    meshctl(b, "trust", "add", id_a)
    wait_state(b, id_a, {"connected"})
    meshctl(a, "trust", "revoke", id_b)
    view = wait_state(b, id_a, {"untrusted", "down"}, timeout=10)
    assert view["state"] in ("untrusted", "down")
    assert wait_state(a, id_b, {"untrusted", "down"}, timeout=10)
    assert "peer revoked" in a.log()


def test_peers_add_reaches_a_static_peer(daemon_factory):
    mesh_a = free_port(socket.SOCK_DGRAM)
    a = daemon_factory("--no-default-model", "--mesh-listen", f"127.0.0.1:{mesh_a}")
    b = daemon_factory("--no-default-model")
    id_a, id_b = meshctl(a, "id")["node_id"], meshctl(b, "id")["node_id"]
    meshctl(a, "trust", "add", id_b)
    meshctl(b, "trust", "add", id_a)
    assert meshctl(b, "peers", "add", f"127.0.0.1:{mesh_a}")["added"] == f"127.0.0.1:{mesh_a}"
    wait_state(b, id_a, {"connected"})
    static = meshctl(b, "peers")["static"]
    assert static == [{"address": f"127.0.0.1:{mesh_a}", "node_id": id_a}]


async def test_garbage_streams_get_a_protocol_error_and_the_daemon_carries_on(daemon_factory, tmp_path):
    """A trusted peer that misbehaves on one stream loses that stream, nothing more."""
    from identity import load_or_create_node_key, load_or_create_tls_identity
    from meshd.config import ListenAddress, MeshConfig
    from meshd.mesh.service import LocalNode, MeshService, new_boot_id
    from meshd.protocol import WireCode
    from peers import TRUST_FILE_NAME, TrustStore

    mesh_port = free_port(socket.SOCK_DGRAM)
    daemon = daemon_factory("--no-default-model", "--mesh-listen", f"127.0.0.1:{mesh_port}")
    daemon_id = meshctl(daemon, "id")["node_id"]
    state = tmp_path / "raw-client"
    key = load_or_create_node_key(state)
    trust = TrustStore(state / TRUST_FILE_NAME)
    trust.reload()
    trust.add(__import__("identity").NodeId.parse(daemon_id), roles=["serve", "use"])
    meshctl(daemon, "trust", "add", str(key.node_id))
    client = MeshService(MeshConfig(listen=ListenAddress("127.0.0.1", 0), discovery=False,
                                    peers=(ListenAddress("127.0.0.1", mesh_port),)),
                         LocalNode(key, "raw", 0, new_boot_id()), trust, load_or_create_tls_identity(state, key=key))
    resets: list[tuple[int, int]] = []
    await client.start()
    try:
        import asyncio

        from meshd.transport import engine

        peer = __import__("identity").NodeId.parse(daemon_id)
        for _ in range(150):
            if peer in client.active:
                break
            await asyncio.sleep(0.1)
        link = client.active[peer]
        original = link._quic_event

        def spy(event, now):  # record resets the daemon sends us, then carry on as usual
            if isinstance(event, engine.events.StreamReset):
                resets.append((event.stream_id, event.error_code))
            original(event, now)

        link._quic_event = spy
        link.quic.send_stream_data(400, b"\xff garbage channel kind", end_stream=False)
        link.quic.send_stream_data(404, b"\x01" + (2**31).to_bytes(4, "big"), end_stream=False)  # oversize frame
        link.process(__import__("time").monotonic())
        for _ in range(50):
            if len(resets) >= 2:
                break
            await asyncio.sleep(0.1)
        codes = dict(resets)
        assert codes.get(400) == WireCode.UNKNOWN_CHANNEL
        assert codes.get(404) in (WireCode.FRAME_TOO_LARGE, WireCode.UNEXPECTED_CHANNEL)
        await asyncio.sleep(0.5)
        assert peer in client.active and not link.closed  # the connection itself survived
        assert peer_view(daemon, str(key.node_id))["state"] == "connected"
        status, health = daemon.get("/health")
        assert status == 200
    finally:
        await client.stop()

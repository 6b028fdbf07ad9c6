"""aioquic and qh3 nodes interoperate: mutual TLS with node certificates, ALPN, data both ways.

In memory (every pairing and datagram size, plus refusals), over real
loopback sockets through the transport layer, and between real daemons
running different engines.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from identity import node_id_from_certificate
from meshd.transport import EngineSettings, EngineUnavailable, InvalidTransportSettings, load_engine
from meshd.transport.engine import ephemeral_identity, handshake_in_memory
from meshd.transport.loopback import connect_pair

pytest.importorskip("qh3", reason="qh3 (meshd[fast]) is not installed")

ENGINES = ("aioquic", "qh3")
PAIRINGS = [(client, server) for client in ENGINES for server in ENGINES]


def run_on(loop: str, coro):  # type: ignore[no-untyped-def]
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


# --- in memory: the TLS layer of every pairing --------------------------------------------


@pytest.mark.parametrize("datagram", [1200, 1452, 8952])
@pytest.mark.parametrize("client,server", PAIRINGS)
def test_mutual_tls_handshake_in_every_pairing(client: str, server: str, datagram: int) -> None:
    client_tls, server_tls = ephemeral_identity(), ephemeral_identity()
    seen_by_client, seen_by_server = handshake_in_memory(
        load_engine(client), load_engine(server), client_tls=client_tls, server_tls=server_tls,
        settings=EngineSettings(engine=client, max_datagram_size=datagram))
    # each side retrieved the other's Ed25519 certificate, and it proves the other's node id
    assert node_id_from_certificate(seen_by_client, now=time.time()) == server_tls.node_id
    assert node_id_from_certificate(seen_by_server, now=time.time()) == client_tls.node_id


def _without_client_certificate(tls):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    return replace(tls, certificate=None, private_key=None)


@pytest.mark.parametrize("server", ENGINES)
def test_a_client_without_a_certificate_gets_no_mutual_session(server: str) -> None:
    # aioquic's client answers a certificate request with an empty Certificate.
    # qh3's server refuses that in TLS; aioquic's completes without one, and
    # the link then refuses the peer ("presented no certificate").
    with pytest.raises(EngineUnavailable):
        handshake_in_memory(load_engine("aioquic"), load_engine(server),
                            client_tls=_without_client_certificate(ephemeral_identity()))


@pytest.mark.parametrize("client,server", PAIRINGS)
def test_a_certificate_without_its_key_fails_the_handshake(client: str, server: str) -> None:
    """CertificateVerify must be signed by the certificate's key: possession, not just presentation."""
    from dataclasses import replace

    honest, thief = ephemeral_identity(), ephemeral_identity()
    forged = replace(thief, certificate=honest.certificate)  # honest's certificate, thief's key
    with pytest.raises(EngineUnavailable):
        handshake_in_memory(load_engine(client), load_engine(server), client_tls=forged)
    with pytest.raises(EngineUnavailable):
        handshake_in_memory(load_engine(client), load_engine(server), server_tls=forged)


def test_qh3_server_requests_the_client_certificate_with_ed25519_only() -> None:
    from qh3 import tls as qtls

    from meshd.transport.qh3_tls import certificate_request_message

    request = qtls.pull_certificate_request(qtls.Buffer(data=certificate_request_message()))
    assert request.request_context == b""
    assert request.signature_algorithms == [qtls.SignatureAlgorithm.ED25519]


# --- real sockets: the transport layer, both engines on each side --------------------------


async def _exchange(client: str, server: str, datagram: int) -> dict:
    pair = await connect_pair(EngineSettings(engine=client, max_datagram_size=datagram),
                              EngineSettings(engine=server, max_datagram_size=datagram))
    try:
        client_link, server_link = pair.client.link, pair.server.link
        assert client_link.endpoint.engine.name == client and server_link.endpoint.engine.name == server
        rtt = await pair.ping()
        transfer = await pair.bulk(3 * 1024 * 1024 + 17, stall_s=15)
        return {"client_sees": client_link.node_id, "server_sees": server_link.node_id, "rtt": rtt,
                "transfer": transfer, "client_id": pair.client.tls.node_id, "server_id": pair.server.tls.node_id}
    finally:
        await pair.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("client,server", PAIRINGS)
def test_engines_interoperate_over_loopback(client: str, server: str, loop: str) -> None:
    result = run_on(loop, _exchange(client, server, 1452))
    assert result["client_sees"] == result["server_id"]
    assert result["server_sees"] == result["client_id"]
    assert 0 < result["rtt"] < 1.0
    transfer = result["transfer"]
    assert transfer.ok and not transfer.stalled, transfer


@pytest.mark.parametrize("client,server", [("aioquic", "qh3"), ("qh3", "aioquic")])
def test_mixed_datagram_sizes_interoperate(client: str, server: str) -> None:
    """Each side sends its own size: a jumbo-frame node and a 1200-byte node still talk."""

    async def main() -> object:
        pair = await connect_pair(EngineSettings(engine=client, max_datagram_size=8952),
                                  EngineSettings(engine=server, max_datagram_size=1200))
        try:
            return await pair.bulk(2 * 1024 * 1024, stall_s=15)
        finally:
            await pair.close()

    transfer = asyncio.run(main())
    assert transfer.ok, transfer


# --- engine choice -------------------------------------------------------------------------


def _engine_in_subprocess(env: dict[str, str], prelude: str = "", code: str = "") -> subprocess.CompletedProcess:
    code = prelude + (code or "import meshd.transport as t; print(t.ENGINE_NAME)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


@pytest.mark.parametrize("choice", ["auto", "qh3", "aioquic", "", "quiche"])
def test_the_import_time_default_is_qh3_whatever_the_environment_says(choice: str) -> None:
    # MESHD_QUIC_ENGINE is configuration (mesh.engine), read by meshd.config, not by the transport.
    out = _engine_in_subprocess({"MESHD_QUIC_ENGINE": choice})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "qh3"


def test_the_default_falls_back_to_aioquic_without_qh3_and_an_explicit_qh3_fails_clearly() -> None:
    hide_qh3 = "import sys; sys.modules['qh3'] = None\n"
    out = _engine_in_subprocess({}, hide_qh3)
    assert out.returncode == 0 and out.stdout.strip() == "aioquic", out.stderr
    out = _engine_in_subprocess({}, hide_qh3, "from meshd.transport import EngineSettings; EngineSettings(engine='qh3')")
    assert out.returncode != 0
    assert "InvalidTransportSettings: engine: qh3 is not installed" in out.stderr.strip().splitlines()[-1]


def test_a_misspelt_engine_is_an_error_not_a_silent_default() -> None:
    with pytest.raises(InvalidTransportSettings):
        EngineSettings(engine="quiche")


# --- real daemons on different engines ------------------------------------------------------


def _meshctl(daemon, *args: str) -> dict:  # type: ignore[no-untyped-def]
    out = subprocess.run([sys.executable, "-m", "meshd.cli.meshctl", "--state-dir", str(daemon.state_dir),
                          "--json", *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _wait_connected(daemon, node_id: str, timeout: float = 30) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    view = None
    while time.monotonic() < deadline:
        view = next((p for p in _meshctl(daemon, "peers")["peers"] if p["node_id"] == node_id), None)
        if view and view["state"] == "connected" and view["rtt_ms"] is not None:
            return view
        time.sleep(0.3)
    raise AssertionError(f"{node_id} never connected with a measured RTT; last view {view}\n{daemon.log()}")


def test_daemons_on_different_engines_connect_both_ways(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """aioquic A <- qh3 B <- aioquic C: a qh3 node dials an aioquic node, an aioquic node dials a qh3 node."""
    import socket

    from conftest import free_port

    port_a, port_b = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    a = daemon_factory("--no-default-model", "--mesh-listen", f"127.0.0.1:{port_a}",
                       env={"MESHD_QUIC_ENGINE": "aioquic"})
    b = daemon_factory("--no-default-model", "--mesh-listen", f"127.0.0.1:{port_b}", "--peer", f"127.0.0.1:{port_a}",
                       env={"MESHD_QUIC_ENGINE": "qh3"})
    c = daemon_factory("--no-default-model", "--peer", f"127.0.0.1:{port_b}", env={"MESHD_QUIC_ENGINE": "aioquic"})
    # MESHD_QUIC_ENGINE reaches the transport through the daemon's configuration (mesh.engine)
    for daemon, engine in ((a, "aioquic"), (b, "qh3"), (c, "aioquic")):
        bound = [line for line in daemon.log().splitlines() if "quic endpoint bound" in line]
        assert bound and f"engine={engine}" in bound[0], daemon.log()
    ids = {name: _meshctl(d, "id")["node_id"] for name, d in (("a", a), ("b", b), ("c", c))}
    for left, right in (("a", "b"), ("b", "c")):
        _meshctl({"a": a, "b": b, "c": c}[left], "trust", "add", ids[right])
        _meshctl({"a": a, "b": b, "c": c}[right], "trust", "add", ids[left])
    assert _wait_connected(b, ids["a"])["rtt_ms"] < 100  # qh3 dialled aioquic
    assert _wait_connected(a, ids["b"])
    assert _wait_connected(c, ids["b"])["rtt_ms"] < 100  # aioquic dialled qh3
    assert _wait_connected(b, ids["c"])

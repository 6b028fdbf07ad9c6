"""Split tunnels over real QUIC on loopback: bytes both ways, trust, backpressure, loss.

The worker's local end here is a TCP echo server, named as such: these tests
are about the tunnel, not the model (tests/test_split_netns.py runs llama.cpp).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import shutil
from collections.abc import Iterable
from typing import Any

import pytest

from identity import TlsIdentity
from meshd.protocol import ROLES
from meshd.split.tunnel import Tunnels
from meshd.transport.endpoint import QuicEndpoint
from meshd.transport.engine import ephemeral_identity
from meshd.transport.loopback import trusting_endpoint
from meshd.transport.settings import EngineSettings


class EchoServer:
    """The fake local end: echoes every byte; ``drop()`` cuts every connection like a killed process."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.server: Any = None

    async def start(self) -> int:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(echo, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    def drop(self) -> None:
        for writer in self.writers:
            writer.transport.abort()


@dataclasses.dataclass
class Node:
    tls: TlsIdentity
    endpoint: QuicEndpoint
    tunnels: Tunnels
    lost: list[tuple[str, str]]
    released: list[str]
    port: int = 0


async def make_node(*, grants: Iterable[str] = ROLES, local_port: int | None = None) -> Node:
    lost: list[tuple[str, str]] = []
    released: list[str] = []

    async def connect_local(peer: str, model: str | None) -> Any:
        return await asyncio.open_connection("127.0.0.1", local_port)

    tunnels = Tunnels(connect_local if local_port else None, released.append, lambda p, why: lost.append((p, why)))
    tls = ephemeral_identity()
    endpoint = trusting_endpoint(EngineSettings(), tunnels.handle, tls=tls, roles=grants)
    node = Node(tls, endpoint, tunnels, lost, released)
    node.port = (await endpoint.listen("127.0.0.1", 0))[1]
    return node


async def pair(*, worker_grants: Iterable[str] = ROLES, serve: bool = True) -> tuple[Node, Node, Any, EchoServer]:
    echo = EchoServer()
    port = await echo.start()
    host = await make_node()
    worker = await make_node(grants=worker_grants, local_port=port if serve else None)
    link = host.endpoint.dial("127.0.0.1", worker.port, expected=worker.tls.node_id)
    await asyncio.wait_for(link.connected, 10)
    return host, worker, link, echo


async def tunnel_port(host: Node, link: Any) -> int:
    server = await host.tunnels.listen(lambda: link, "m")
    return server.sockets[0].getsockname()[1]


def close(*nodes: Node) -> None:
    for node in nodes:
        node.tunnels.close()
        node.endpoint.close()


async def test_bytes_cross_both_ways_intact() -> None:
    host, worker, link, _ = await pair()
    try:
        port = await tunnel_port(host, link)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = os.urandom(24 << 20)

        async def send() -> None:
            for i in range(0, len(payload), 1 << 20):
                writer.write(payload[i:i + (1 << 20)])
                await writer.drain()

        sender = asyncio.ensure_future(send())
        echoed = hashlib.sha256()
        got = 0
        while got < len(payload):
            chunk = await asyncio.wait_for(reader.read(1 << 20), 30)
            assert chunk, "tunnel closed early"
            echoed.update(chunk)
            got += len(chunk)
        await sender
        assert echoed.hexdigest() == hashlib.sha256(payload).hexdigest()
        assert worker.tunnels.open_count == 1
        writer.close()  # a clean close on the host's side ends the worker's local connection too
        for _ in range(100):
            if worker.tunnels.open_count == 0 and host.tunnels.open_count == 0:
                break
            await asyncio.sleep(0.05)
        assert (worker.tunnels.open_count, host.tunnels.open_count) == (0, 0)
        assert worker.released == [str(host.tls.node_id)]
        assert host.lost == []  # we closed first: nothing was lost
    finally:
        close(host, worker)


@pytest.mark.parametrize("refusal", [
    # The worker grants the host every role but `tensor`: its session refuses the channel (forbidden).
    {"worker_grants": [r for r in ROLES if r != "tensor"]},
    # The worker trusts the host but is not a worker (split.worker = false): not_accepting.
    {"serve": False},
], ids=["no_tensor_trust", "not_a_worker"])
async def test_a_refused_tunnel_carries_nothing(refusal: dict) -> None:
    host, worker, link, echo = await pair(**refusal)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", await tunnel_port(host, link))
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed without a byte
        assert echo.writers == [] and worker.released == []  # no local connection was ever made
    finally:
        close(host, worker)


async def test_losing_the_local_end_reaches_the_host_as_a_loss() -> None:
    host, worker, link, echo = await pair()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", await tunnel_port(host, link))
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        echo.drop()  # as if the RPC worker process were killed
        assert await asyncio.wait_for(reader.read(), 10) == b""
        for _ in range(100):
            if host.lost:
                break
            await asyncio.sleep(0.05)
        assert [peer for peer, _ in host.lost] == [str(worker.tls.node_id)]
        assert host.lost[0][1] in ("ended", "tunnel_broken")
    finally:
        close(host, worker)


async def test_listener_is_loopback_only() -> None:
    host, worker, link, _ = await pair()
    try:
        server = await host.tunnels.listen(lambda: link, "m")
        assert {s.getsockname()[0] for s in server.sockets} == {"127.0.0.1"}
    finally:
        close(host, worker)


async def test_no_connected_peer_closes_the_connection() -> None:
    host, worker, link, _ = await pair()
    try:
        server = await host.tunnels.listen(lambda: None, "m")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        close(host, worker)


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])


async def test_only_our_own_user_may_use_the_host_listener() -> None:
    if os.geteuid() != 0 or not shutil.which("python3", path="/usr/bin"):
        pytest.skip("needs root and /usr/bin/python3 to connect as another user")
    host, worker, link, echo = await pair()
    try:
        port = await tunnel_port(host, link)
        probe = ("import socket\ns = socket.create_connection(('127.0.0.1', %d)); s.sendall(b'x'); s.settimeout(10)\n"
                 "try:\n    print(repr(s.recv(10)))\nexcept ConnectionResetError:\n    print('reset')" % port)
        proc = await asyncio.create_subprocess_exec(
            "/usr/bin/python3", "-c", probe, user=65534, cwd="/", stdout=asyncio.subprocess.PIPE)  # nobody
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert out.strip() in (b"b''", b"reset")  # closed at once: nothing tunnelled
        assert echo.writers == []
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # we (root) still may
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        writer.close()
    finally:
        close(host, worker)

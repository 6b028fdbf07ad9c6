"""API keys across a hop: the entry node charges the quota once and signs a verdict the serving peer checks."""

from __future__ import annotations

import socket
import time

import openai
import pytest

from conftest import free_port
from test_api_auth import CHAT, client, create_key
from test_mesh_loopback import meshctl, wait_state


def joined(daemon_factory):
    """Entry E (no model) and server S (SmolLM2), trusting each other fully and connected."""
    mesh_s = free_port(socket.SOCK_DGRAM)
    server = daemon_factory("--mesh-listen", f"127.0.0.1:{mesh_s}", "--name", "server")
    entry = daemon_factory("--no-default-model", "--peer", f"127.0.0.1:{mesh_s}", "--name", "entry")
    id_s, id_e = meshctl(server, "id")["node_id"], meshctl(entry, "id")["node_id"]
    meshctl(server, "trust", "add", id_e)
    meshctl(entry, "trust", "add", id_s)
    wait_state(entry, id_s, {"connected"})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not meshctl(entry, "models")["models"]:
        time.sleep(0.2)
    return entry, server, id_s


def test_forwarded_request_is_charged_once_and_the_peer_checks_the_verdict(daemon_factory):
    entry, server, id_s = joined(daemon_factory)
    _, server_key = create_key(server.state_dir, "server-own")  # the server now requires keys itself
    with pytest.raises(openai.AuthenticationError):
        client(server, None).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=1)

    key_id, secret = create_key(entry.state_dir, "two-a-minute", "--rpm", "2")
    for _ in range(2):
        raw = client(entry, secret).chat.completions.with_raw_response.create(
            model="smollm2", messages=CHAT, max_tokens=2, temperature=0)
        assert raw.headers["x-meshd-node"] == id_s  # served by the peer, on the entry node's verdict
    with pytest.raises(openai.RateLimitError):
        client(entry, secret).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=2)
    assert server.log().count("serving request for peer") == 2


def test_a_peer_that_requires_keys_refuses_an_anonymous_forward(daemon_factory):
    entry, server, _ = joined(daemon_factory)
    create_key(server.state_dir, "server-own")
    # The entry node runs open on loopback: it forwards without a verdict, and the server says no.
    with pytest.raises(openai.PermissionDeniedError) as info:
        client(entry, None).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=1)
    assert info.value.body["code"] == "verdict_missing"
    assert "serving request for peer" in server.log()

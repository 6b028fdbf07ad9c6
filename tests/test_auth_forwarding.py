"""API keys across a hop: the entry node charges the quota once and signs a verdict the serving peer checks."""

from __future__ import annotations

import openai
import pytest

from test_api_auth import CHAT, client, create_key
from test_routing_loopback import join_entry_and_server


def test_forwarded_request_is_charged_once_and_the_peer_checks_the_verdict(daemon_factory):
    entry, server, _, id_s = join_entry_and_server(daemon_factory)
    create_key(server.state_dir, "server-own")  # the server now requires keys itself
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
    entry, server, _, _ = join_entry_and_server(daemon_factory)
    create_key(server.state_dir, "server-own")
    # The entry node runs open on loopback: it forwards without a verdict, and the server says no.
    with pytest.raises(openai.PermissionDeniedError) as info:
        client(entry, None).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=1)
    assert info.value.body["code"] == "verdict_missing"
    assert "serving request for peer" in server.log()

"""Routing between two real daemons on loopback: forwarding, headers, data classes, meshctl."""

from __future__ import annotations

import socket
import time

import openai
import pytest

from conftest import free_port
from test_mesh_loopback import meshctl, wait_state


def join_entry_and_server(daemon_factory) -> tuple:
    """E has no model; S serves SmolLM2; they trust each other fully and E sees S's model."""
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
    return entry, server, id_e, id_s


@pytest.fixture
def entry_and_server(daemon_factory):
    return join_entry_and_server(daemon_factory)


def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_request_to_a_modelless_node_is_served_by_the_peer(entry_and_server):
    entry, server, id_e, id_s = entry_and_server
    messages = [{"role": "user", "content": "Name a colour."}]
    raw = client(entry).chat.completions.with_raw_response.create(
        model="smollm2", messages=messages, max_tokens=12, temperature=0)
    assert raw.headers["x-meshd-node"] == id_s
    assert raw.headers["x-meshd-route"] == "peer:" + id_s[:15]
    forwarded = raw.parse().choices[0].message.content
    direct = client(server).chat.completions.create(model="smollm2", messages=messages, max_tokens=12,
                                                    temperature=0).choices[0].message.content
    assert forwarded == direct
    streamed = client(entry).chat.completions.create(model="smollm2", messages=messages, max_tokens=12,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct
    assert chunks[-1].usage.completion_tokens > 0
    assert "serving request for peer" in server.log()
    deadline = time.monotonic() + 5  # the trace is logged when the response is closed
    while time.monotonic() < deadline and entry.log().count("route finished") < 2:
        time.sleep(0.1)
    finished = [line for line in entry.log().splitlines() if "route finished" in line]
    assert len(finished) == 2 and all("outcome=served" in line for line in finished), finished
    models = [m.id for m in client(entry).models.list().data]
    assert models == ["SmolLM2-135M-Instruct.Q4_1"]


def test_embeddings_and_completions_cross_the_hop(entry_and_server):
    entry, server, _, id_s = entry_and_server
    emb = client(entry).embeddings.create(model="smollm2", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 576
    text = client(entry).completions.create(model="smollm2", prompt="One, two,", max_tokens=4, temperature=0)
    assert text.choices[0].text


def test_secret_never_leaves_the_node(entry_and_server):
    entry, server, _, _ = entry_and_server
    with pytest.raises(openai.PermissionDeniedError) as info:
        client(entry).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2, extra_headers={"X-Meshd-Data-Class": "secret"})
    assert info.value.body["code"] == "data_class_forbidden"
    assert "serving request for peer" not in server.log()
    # the server answers its own secret requests locally
    raw = client(server).chat.completions.with_raw_response.create(
        model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        extra_headers={"X-Meshd-Data-Class": "secret"})
    assert raw.headers["x-meshd-route"] == "local"
    with pytest.raises(openai.BadRequestError):
        client(entry).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2, extra_headers={"X-Meshd-Data-Class": "top-secret"})


def test_meshctl_models_and_route(entry_and_server):
    entry, server, id_e, id_s = entry_and_server
    models = meshctl(entry, "models")["models"]
    assert [(m["model"], m["location"], m["node"]) for m in models] == [
        ("SmolLM2-135M-Instruct.Q4_1", "peer", id_s)]
    route = meshctl(entry, "route", "--model", "smollm2")
    assert route["chosen"]["target"] == id_s and route["strategy"] == "local-first"
    assert {"score", "tokens_per_s", "speed_source", "recent_failures"} <= set(route["chosen"])
    secret = meshctl(entry, "route", "--model", "smollm2", "--data-class", "secret")
    assert secret["error"]["code"] == "data_class_forbidden"
    local = meshctl(server, "route", "--model", "smollm2")
    assert local["chosen"]["target"] == "local"


def test_unknown_model_is_404_across_the_mesh(entry_and_server):
    entry, _, _, _ = entry_and_server
    with pytest.raises(openai.NotFoundError):
        client(entry).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])

"""Routing across network namespaces with real llama.cpp on every serving node."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request

import openai
import pytest

from test_mesh_netns import FAST, lab_factory, netns_daemons, ready, states, wait_until  # noqa: F401

pytestmark = pytest.mark.netns

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


def api(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{daemon.host.ip}:8764/v1", api_key="x", max_retries=0, timeout=120)


def metric(daemon, name: str) -> float:
    with urllib.request.urlopen(f"http://{daemon.host.ip}:8764/metrics", timeout=10) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def three_nodes(lab_factory, netns_daemons, monkeypatch, model_path):  # noqa: F811
    """A: no model (entry); B and C serve SmolLM2. A trusts B and C with serve; B and C trust A with use."""
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)
    lab = lab_factory(3)
    a = netns_daemons(lab.hosts[0], "--no-default-model")
    b = netns_daemons(lab.hosts[1])
    c = netns_daemons(lab.hosts[2])
    ids = [ready(d) for d in (a, b, c)]
    return lab, (a, b, c), ids


def connect(entry, servers, ids, serve_roles=("serve",)):
    for server, server_id in zip(servers, ids[1:]):
        entry.meshctl("trust", "add", server_id, "--roles", ",".join(serve_roles))
        server.meshctl("trust", "add", ids[0], "--roles", "use")
    for server_id in ids[1:]:
        assert wait_until(lambda: states(entry).get(server_id) == "connected", 20), entry.meshctl("peers")
    assert wait_until(lambda: len(entry.meshctl("models")["models"]) == len(servers), 15)


def test_entry_node_routes_streams_and_keeps_secrets(three_nodes):
    lab, (a, b, c), ids = three_nodes
    connect(a, (b, c), ids)
    raw = api(a).chat.completions.with_raw_response.create(model="smollm2", messages=STORY, max_tokens=16,
                                                          temperature=0)
    served_by = raw.headers["x-meshd-node"]
    assert served_by in ids[1:] and raw.headers["x-meshd-route"].startswith("peer:")
    stream = api(a).chat.completions.create(model="smollm2", messages=STORY, max_tokens=16, temperature=0,
                                            stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == raw.parse().choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError):
        api(a).chat.completions.create(model="smollm2", messages=STORY, max_tokens=4,
                                       extra_headers={"X-Meshd-Data-Class": "secret"})
    local = api(b).chat.completions.with_raw_response.create(
        model="smollm2", messages=STORY, max_tokens=4, extra_headers={"X-Meshd-Data-Class": "secret"})
    assert local.headers["x-meshd-route"] == "local" and local.headers["x-meshd-node"] == ids[1]


def test_peer_without_serve_trust_never_receives_a_request(three_nodes):
    lab, (a, b, c), ids = three_nodes
    a.meshctl("trust", "add", ids[1], "--roles", "serve")
    a.meshctl("trust", "add", ids[2], "--roles", "use,cache")  # C is trusted, but not to serve
    for server in (b, c):
        server.meshctl("trust", "add", ids[0], "--roles", "use")
    for server_id in ids[1:]:
        assert wait_until(lambda: states(a).get(server_id) == "connected", 20)
    for _ in range(4):
        raw = api(a).chat.completions.with_raw_response.create(model="smollm2", messages=STORY, max_tokens=2)
        assert raw.headers["x-meshd-node"] == ids[1]
    assert "serving request for peer" not in c.log()
    assert metric(c, 'meshd_tokens_total{kind="completion",model="SmolLM2-135M-Instruct.Q4_1"}') == 0
    route = a.meshctl("route", "--model", "smollm2")
    assert [x["target"] for x in route["candidates"]] == [ids[1]]
    assert any(x["target"] == ids[2] and "serve" in x["why"] for x in route["excluded"])


def test_kill_9_of_the_serving_peer_mid_stream_is_invisible_to_the_client(three_nodes):
    lab, (a, b, c), ids = three_nodes
    connect(a, (b, c), ids)
    # Resume needs both servers' model identity (file sha256), which each announces once it has
    # hashed its GGUF in the background after start-up.
    assert wait_until(lambda: all(m["identity"] for m in a.meshctl("models")["models"]), 30), a.meshctl("models")
    settings = dict(model="smollm2", messages=STORY, max_tokens=120, temperature=0)
    expected = api(a).chat.completions.create(**settings).choices[0].message.content
    raw = api(a).chat.completions.with_raw_response.create(**settings, stream=True)
    serving = {ids[1]: b, ids[2]: c}[raw.headers["x-meshd-node"]]
    text, killed_after = [], None
    for chunk in raw.parse():  # the official client: any exception here fails the test
        text.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        if killed_after is None and len("".join(text)) > 40:
            serving.proc.kill()
            killed_after = len("".join(text))
    assert killed_after is not None and killed_after < len(expected)
    assert "".join(text) == expected
    assert "route attempt failed" in a.log()
    # the final trace of the request is an event too: served, after a failover from the killed node
    def finished_lines() -> list[str]:
        return [line for line in a.log().splitlines() if "route finished" in line]

    # Logged when the response is closed: the streamed request's line follows the first request's.
    assert wait_until(lambda: len(finished_lines()) >= 2, 10), finished_lines()
    finished = finished_lines()[-1]
    killed_id = raw.headers["x-meshd-node"]
    assert "outcome=served" in finished and f"failures=peer:{killed_id[:15]}" in finished, finished


def test_client_disconnect_stops_generation_on_the_serving_peer(three_nodes):
    lab, (a, b, c), ids = three_nodes
    connect(a, (b, c), ids)
    body = json.dumps({"model": "smollm2", "messages": STORY, "max_tokens": 2000, "temperature": 0,
                       "stream": True}).encode()
    sock = socket.create_connection((a.host.ip, 8764), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    seen = b""
    while seen.count(b"data: ") < 5:
        seen += sock.recv(65536)
    node = re.search(rb"x-meshd-node: (\S+)", seen, re.I).group(1).decode()
    server = {ids[1]: b, ids[2]: c}[node]
    assert metric(server, "meshd_backend_running_requests") == 1
    sock.close()
    started = time.monotonic()
    assert wait_until(lambda: metric(server, "meshd_backend_running_requests") == 0, 5, 0.05)
    print(f"generation on the serving peer stopped {time.monotonic() - started:.2f}s after the disconnect")
    assert "peer cancelled a request" in server.log()

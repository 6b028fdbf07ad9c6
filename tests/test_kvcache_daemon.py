"""KV-cache mobility through real daemons on loopback: [kvcache] on, `meshctl drain`, the next turn elsewhere.

The issue's scenario end to end with the bundled SmolLM2: a long conversation
is served on A; `meshctl drain` on A hands its cached conversation to B over a
`cache` channel and A exits 0; B's next turn of that conversation prefills only
the new tokens (usage.prompt_tokens_details.cached_tokens) and its greedy text
equals what a node without any cache produces.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import openai

from conftest import free_port
from test_mesh_loopback import meshctl, wait_for, wait_state

PARAGRAPH = ("The lighthouse keeper wrote down the weather every hour: wind from the west, a grey sea, "
             "three fishing boats returning before noon, gulls on the rocks and rain after dark. ")


def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x", max_retries=0, timeout=120)


def described(daemon) -> bool:
    """The local model's identity (file sha256) is known: caches are bound to it."""
    return any(m["location"] == "local" and m["identity"] for m in meshctl(daemon, "models")["models"])


def sees_peer_model(daemon, node_id: str) -> bool:
    return any(m["node"] == node_id and m["identity"] for m in meshctl(daemon, "models")["models"])


def chat(daemon, messages: list[dict], served_by: str | None = None) -> tuple[str, object]:
    raw = client(daemon).chat.completions.with_raw_response.create(model="smollm2", messages=messages,
                                                                   max_tokens=24, temperature=0)
    if served_by is not None:
        assert raw.headers["x-meshd-node"] == served_by
    response = raw.parse()
    return response.choices[0].message.content, response.usage


def connected_kv_pair(daemon_factory, tmp_path, first: str, second: str, *,
                      first_grants: str | None = None, second_grants: str | None = None):
    """Two daemons with [kvcache] on: ``first`` listens, ``second`` dials it, each trusts the other
    (every role unless ``*_grants`` names them), both connected and their models described.
    Returns (first, second, first's id, second's id, the config file)."""
    config = tmp_path / "kv.toml"
    # Long first-token timeout: a long prefill on 2 shared CPUs must not fail over to the peer.
    config.write_text("[kvcache]\nenabled = true\n[routing]\nfirst_token_timeout_s = 600.0\n")
    mesh = free_port(socket.SOCK_DGRAM)
    a = daemon_factory("--config", str(config), "--mesh-listen", f"127.0.0.1:{mesh}", "--name", first)
    b = daemon_factory("--config", str(config), "--peer", f"127.0.0.1:{mesh}", "--name", second)
    id_a, id_b = meshctl(a, "id")["node_id"], meshctl(b, "id")["node_id"]
    meshctl(a, "trust", "add", id_b, *(["--roles", first_grants] if first_grants else []))
    meshctl(b, "trust", "add", id_a, *(["--roles", second_grants] if second_grants else []))
    wait_state(b, id_a, {"connected"})
    wait_for(lambda: described(a) and described(b), timeout=60)
    return a, b, id_a, id_b, config


def test_drain_moves_the_conversation_and_the_next_turn_hits_the_cache(daemon_factory, tmp_path):
    a, b, id_a, id_b, _ = connected_kv_pair(daemon_factory, tmp_path, "alpha", "beta")  # all roles, `cache` too
    reference = daemon_factory("--name", "reference")  # [kvcache] off: every request prefills in full
    wait_for(lambda: sees_peer_model(a, id_b), timeout=20)

    turn1 = [{"role": "system", "content": "You answer briefly."},
             {"role": "user", "content": PARAGRAPH * 10 + "\nWhat came from the west?"}]
    answer1, usage1 = chat(a, turn1, served_by=id_a)
    assert usage1.prompt_tokens > 300
    assert not usage1.prompt_tokens_details  # A's cache was empty: a full prefill
    # A announces the conversation it now holds (prefix hash of its token ids, bound to the weights).
    announced = wait_for(lambda: [m.get("kv_prefixes") for p in meshctl(b, "peers")["peers"] if p["node_id"] == id_a
                                  for m in p["models"] if m.get("kv_prefixes")], timeout=30)
    assert announced[0][0]["token_count"] >= usage1.prompt_tokens
    turn2 = [*turn1, {"role": "assistant", "content": answer1}, {"role": "user", "content": "And after dark?"}]
    expected, expected_usage = chat(reference, turn2)

    drained = subprocess.run([sys.executable, "-m", "meshd.cli.meshctl", "--state-dir", str(a.state_dir),
                              "--json", "drain"], capture_output=True, text=True, timeout=300)
    assert drained.returncode == 0, drained.stderr + a.log()
    report = json.loads(drained.stdout)
    assert report["kvcache"] and not report["failed"], report
    assert [m["peer"] for m in report["moved"]] == [id_b]
    assert report["moved"][0]["tokens"] >= usage1.prompt_tokens
    assert a.proc.wait(30) == 0, a.log()
    assert "draining" in a.log() and "kv cache received" in b.log()

    answer2, usage2 = chat(b, turn2, served_by=id_b)
    assert usage2.prompt_tokens == expected_usage.prompt_tokens
    cached = usage2.prompt_tokens_details.cached_tokens
    # Everything up to the new user turn came from A's cache: only its few tokens were prefilled.
    assert cached >= usage1.prompt_tokens, (cached, usage1.prompt_tokens)
    assert usage2.prompt_tokens - cached < 40, (usage2.prompt_tokens, cached)
    assert answer2 == expected


def test_drain_without_kvcache_just_stops(daemon_factory):
    node = daemon_factory("--name", "plain")
    result = meshctl(node, "drain")
    assert result == {"moved": [], "failed": [], "kvcache": False}
    assert node.proc.wait(30) == 0, node.log()


def test_sigterm_drains_when_configured(daemon_factory, tmp_path):
    config = tmp_path / "kv.toml"
    config.write_text("[kvcache]\nenabled = true\ndrain_on_sigterm = true\n")
    node = daemon_factory("--config", str(config), "--name", "lonely")
    wait_for(lambda: described(node), timeout=60)
    chat(node, [{"role": "user", "content": PARAGRAPH * 2}])
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(60) == 0, node.log()
    log = node.log()
    # No peer may take it: reported (not silently dropped), and the node still exits cleanly.
    assert "reason=SIGTERM" in log and "cached conversation not handed over" in log, log
    assert "moved=0 failed=1" in log, log


def test_entry_prefers_the_peer_holding_the_conversation(daemon_factory, tmp_path):
    """E serves the model too, but S holds the conversation's cache: E routes the next turn to S."""
    server, entry, id_s, id_e, _ = connected_kv_pair(daemon_factory, tmp_path, "server", "entry")
    wait_for(lambda: sees_peer_model(entry, id_s), timeout=20)

    turn1 = [{"role": "user", "content": PARAGRAPH * 4 + "\nWhat came from the west?"}]
    answer1, _ = chat(server, turn1, served_by=id_s)
    wait_for(lambda: [m for p in meshctl(entry, "peers")["peers"] if p["node_id"] == id_s
                      for m in p["models"] if m.get("kv_prefixes")], timeout=30)
    turn2 = [*turn1, {"role": "assistant", "content": answer1}, {"role": "user", "content": "And after dark?"}]
    raw = client(entry).chat.completions.with_raw_response.create(model="smollm2", messages=turn2,
                                                                  max_tokens=8, temperature=0)
    assert raw.headers["x-meshd-node"] == id_s
    assert raw.headers["x-meshd-route"].startswith("peer:" + id_s[:15] + "; cache=prefer;node=" + id_s[:15])
    usage = raw.parse().usage  # the serving peer's cache hit, reported across the hop
    assert usage.prompt_tokens_details.cached_tokens > 100, usage
    assert "routing to the holder of the prompt's kv cache" in entry.log()


def test_a_cache_held_by_a_peer_is_pulled_when_the_request_stays_here(daemon_factory, tmp_path):
    """H holds the conversation but is trusted by E with `cache` only (not to serve): E pulls the
    cache before serving the next turn itself, and prefills only the new tokens."""
    holder, entry, id_h, id_e, config = connected_kv_pair(daemon_factory, tmp_path, "holder", "entry",
                                                         first_grants="use,cache", second_grants="cache")
    # What one node alone produces: it served turn 1 and restores its own cache for turn 2,
    # the same evaluation pattern as a pulled cache (a fresh full prefill may differ in the last bits).
    alone = daemon_factory("--config", str(config), "--name", "alone")
    wait_for(lambda: described(alone), timeout=60)

    # The entry learns its own prefill speed from a first request of its own.
    warm = [{"role": "user", "content": PARAGRAPH * 2 + "\nWhat is the weather?"}]
    chat(entry, warm, served_by=id_e)
    turn1 = [{"role": "user", "content": PARAGRAPH * 6 + "\nWhat came from the west?"}]
    answer1, _ = chat(holder, turn1, served_by=id_h)
    wait_for(lambda: [m for p in meshctl(entry, "peers")["peers"] if p["node_id"] == id_h
                      for m in p["models"] if m.get("kv_prefixes")], timeout=30)
    turn2 = [*turn1, {"role": "assistant", "content": answer1}, {"role": "user", "content": "And after dark?"}]
    assert chat(alone, turn1)[0] == answer1
    expected, expected_usage = chat(alone, turn2)
    raw = client(entry).chat.completions.with_raw_response.create(model="smollm2", messages=turn2,
                                                                  max_tokens=24, temperature=0)
    assert raw.headers["x-meshd-node"] == id_e  # served here: the holder may not serve for us
    assert "; cache=pull;node=" + id_h[:15] in raw.headers["x-meshd-route"], raw.headers["x-meshd-route"]
    assert "link=assumed" in raw.headers["x-meshd-route"]  # no earlier pull measured this link
    reply = raw.parse()
    cached = reply.usage.prompt_tokens_details.cached_tokens
    assert cached > 200 and reply.usage.prompt_tokens == expected_usage.prompt_tokens
    assert cached == expected_usage.prompt_tokens_details.cached_tokens
    assert reply.choices[0].message.content == expected
    assert "kv cache pulled before serving" in entry.log()

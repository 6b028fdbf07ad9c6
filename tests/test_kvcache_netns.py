"""KV-cache mobility across network namespaces: a conversation moves between hosts over veth.

The issue's drain scenario with real daemons on two hosts: A serves a long
conversation, `meshctl drain` hands its KV cache to B over a `cache` channel,
and B's next turn prefills only the new tokens, with the greedy text a node
that served both turns itself produces.
"""

from __future__ import annotations

import openai
import pytest

from test_mesh_netns import FAST, lab_factory, netns_daemons, ready, states, wait_until  # noqa: F401

pytestmark = pytest.mark.netns

PARAGRAPH = ("The lighthouse keeper wrote down the weather every hour: wind from the west, a grey sea, "
             "three fishing boats returning before noon, gulls on the rocks and rain after dark. ")


def chat(daemon, messages):
    client = openai.OpenAI(base_url=f"http://{daemon.host.ip}:8764/v1", api_key="x", max_retries=0, timeout=300)
    raw = client.chat.completions.with_raw_response.create(model="smollm2", messages=messages, max_tokens=24,
                                                           temperature=0)
    reply = raw.parse()
    return reply.choices[0].message.content, reply.usage, raw.headers["x-meshd-node"]


def described(daemon) -> bool:
    return any(m["location"] == "local" and m["identity"] for m in daemon.meshctl("models")["models"])


def test_drain_hands_the_conversation_to_the_other_host(lab_factory, netns_daemons, monkeypatch, tmp_path):  # noqa: F811
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)
    config = tmp_path / "kv.toml"
    config.write_text("[kvcache]\nenabled = true\n[routing]\nfirst_token_timeout_s = 600.0\n")
    lab = lab_factory(3)
    a = netns_daemons(lab.hosts[0], "--config", str(config))
    b = netns_daemons(lab.hosts[1], "--config", str(config))
    alone = netns_daemons(lab.hosts[2], "--config", str(config))  # serves both turns itself
    ids = [ready(d) for d in (a, b, alone)]
    a.meshctl("trust", "add", ids[1], "--roles", "cache")
    b.meshctl("trust", "add", ids[0], "--roles", "cache")
    assert wait_until(lambda: states(a).get(ids[1]) == "connected", 20), a.meshctl("peers")
    assert wait_until(lambda: described(a) and described(b) and described(alone), 60)
    assert wait_until(lambda: any(m["node"] == ids[1] and m["identity"] for m in a.meshctl("models")["models"]), 20)

    turn1 = [{"role": "user", "content": PARAGRAPH * 8 + "\nWhat came from the west?"}]
    answer1, usage1, node = chat(a, turn1)
    assert node == ids[0] and usage1.prompt_tokens > 300
    turn2 = [*turn1, {"role": "assistant", "content": answer1}, {"role": "user", "content": "And after dark?"}]
    assert chat(alone, turn1)[0] == answer1
    expected, expected_usage, _ = chat(alone, turn2)

    report = a.meshctl("drain")
    assert [m["peer"] for m in report["moved"]] == [ids[1]] and not report["failed"], report
    assert a.proc.wait(30) == 0
    assert "kv cache received" in b.log()
    answer2, usage2, node = chat(b, turn2)
    assert node == ids[1]
    cached = usage2.prompt_tokens_details.cached_tokens
    assert cached >= usage1.prompt_tokens and usage2.prompt_tokens - cached < 40, usage2
    assert cached == expected_usage.prompt_tokens_details.cached_tokens
    assert answer2 == expected

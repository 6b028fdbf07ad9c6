"""Layer split across network namespaces: real llama.cpp RPC, carried only inside QUIC.

Host A runs the llama context of a split SmolLM2; worker B holds layers in its
llama.cpp RPC server child. A and B trust each other with ``tensor``.
"""

from __future__ import annotations

import socket
from pathlib import Path

import openai
import pytest
from test_mesh_netns import FAST, lab_factory, netns_daemons, ready, states, wait_until  # noqa: F401

from meshd.backends.base import ChatMessage, GenerationRequest, SamplingParams

pytestmark = pytest.mark.netns

PROMPT = [{"role": "user", "content": "Tell me about the sea and the ships that sail on it."}]
MAX_TOKENS = 48


def api(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{daemon.host.ip}:8764/v1", api_key="x", max_retries=0, timeout=120)


def write_config(tmp: Path, model_path: Path, mode: str, **split: object) -> Path:
    lines = ["[[models]]", f'path = "{model_path}"', 'id = "smollm2-split"', f'split = "{mode}"', "n_ctx = 2048",
             "", "[split]", *(f"{k} = {v}" for k, v in split.items())]
    path = tmp / f"split-{mode}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(model_path) -> str:
    """What one node alone produces: the engine the daemon runs, in this process."""
    from meshd.backends.llama_engine import LlamaEngine

    engine = LlamaEngine(model_path, 2048)
    engine.load()
    request = GenerationRequest(model="m", params=SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                                messages=tuple(ChatMessage(m["role"], m["content"]) for m in PROMPT))
    parts: list[str] = []
    engine.generate(request, lambda e: parts.append(e.text), __import__("threading").Event())
    engine.close()
    return "".join(parts)


@pytest.fixture
def split_pair(lab_factory, netns_daemons, monkeypatch, tmp_path, model_path):  # noqa: F811
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)

    def start(mode: str = "always", worker_roles: str = "tensor", **split: object):
        lab = lab_factory(2)
        config = write_config(tmp_path, model_path, mode, plan_wait_s=3, **split)
        a = netns_daemons(lab.hosts[0], "--config", str(config))
        b = netns_daemons(lab.hosts[1], "--no-default-model")
        ids = [ready(a), ready(b)]
        a.meshctl("trust", "add", ids[1], "--roles", "tensor")
        b.meshctl("trust", "add", ids[0], "--roles", worker_roles)
        assert wait_until(lambda: states(a).get(ids[1]) == "connected", 20), a.meshctl("peers")
        return lab, a, b, ids

    return start


def model_state(daemon) -> dict:
    models = {m.id: m for m in api(daemon).models.list().data}
    return models["smollm2-split"].model_extra["meshd"]


def wait_split_ready(a) -> dict:
    state = wait_until(lambda: (s := model_state(a))["state"] == "ready" and s, 60)
    assert state, f"{model_state(a)}\n{a.log()[-3000:]}"
    return state


def chat(daemon, **extra) -> str:
    reply = api(daemon).chat.completions.create(model="smollm2-split", messages=PROMPT, max_tokens=MAX_TOKENS,
                                                temperature=0, **extra)
    return reply.choices[0].message.content


def test_split_across_two_hosts_matches_one_node(split_pair, reference):
    lab, a, b, ids = split_pair("always")
    state = wait_split_ready(a)
    remote = [d for d in state["split"]["devices"] if d["device"].startswith("RPC")]
    assert remote and remote[0]["model_buffer_mib"] > 1, state  # the worker really holds layers
    assert chat(a) == reference
    stream = api(a).chat.completions.create(model="smollm2-split", messages=PROMPT, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reference
    worker = b.meshctl("split")["worker_process"]
    assert worker["running"] and worker["rss_bytes"] > 30 << 20, worker
    plan = a.meshctl("plan", "--model", "smollm2-split")
    assert [p["node"] for p in plan["current"]["placements"]] == ["local", ids[1]]
    assert all(p["layers"] > 0 for p in plan["current"]["placements"])
    assert plan["current"]["head"] == "host"  # room left here: the logits never cross the tunnel
    # The RPC server listens on B's loopback only: from A's namespace and from here, nothing answers.
    for argv in (a.host.argv("python3", "-c", f"import socket; socket.create_connection(('{b.host.ip}', "
                                              f"{worker['port']}), timeout=3)"),):
        import subprocess

        assert subprocess.run(argv, capture_output=True, timeout=20).returncode != 0
    with pytest.raises(OSError):
        socket.create_connection((b.host.ip, worker["port"]), timeout=3)


def test_a_budget_too_small_for_the_model_is_served_with_a_peer(split_pair, reference):
    lab, a, b, ids = split_pair("auto", memory_budget_mb=70)
    wait_split_ready(a)
    plan = a.meshctl("plan", "--model", "smollm2-split")["current"]
    local, worker = plan["placements"]
    assert 0 < local["layers"] < 30 and worker["layers"] == 30 - local["layers"]
    assert local["bytes"] <= 70 << 20
    assert chat(a) == reference


def test_killing_the_worker_mid_request_replans_and_completes(split_pair, reference):
    lab, a, b, ids = split_pair("always")
    wait_split_ready(a)
    assert chat(a) == reference  # warm: the worker process is running
    pid = b.meshctl("split")["worker_process"]["pid"]
    stream = api(a).chat.completions.create(model="smollm2-split", messages=PROMPT, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True)
    text, killed = [], False
    for chunk in stream:
        text.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        if not killed and len("".join(text)) > 20:
            import os
            import signal

            os.kill(pid, signal.SIGKILL)
            killed = True
    assert killed and "".join(text) == reference
    assert a.proc.poll() is None and b.proc.poll() is None  # neither daemon went down
    assert model_state(a)["split"]["restarts"] >= 1
    assert "split tunnel lost" in a.log()


def test_a_lost_worker_with_no_room_left_gives_a_clean_error(split_pair):
    lab, a, b, ids = split_pair("auto", memory_budget_mb=70)
    wait_split_ready(a)
    pid = b.meshctl("split")["worker_process"]["pid"]
    import os
    import signal

    os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIStatusError) as caught:
        chat(a)
    assert caught.value.status_code in (502, 503), caught.value
    body = caught.value.body if isinstance(caught.value.body, dict) else {}
    assert body.get("code") in ("split_unavailable", "split_worker_lost"), caught.value.body
    assert a.proc.poll() is None and b.proc.poll() is None


def test_a_peer_without_tensor_trust_cannot_start_a_worker(split_pair):
    lab, a, b, ids = split_pair("always", worker_roles="use")
    assert wait_until(lambda: "split model not loaded yet" in a.log(), 30), a.log()[-3000:]
    status = b.meshctl("split")
    assert status["worker_process"]["starts"] == 0 and status["tunnels"] == 0
    assert model_state(a)["state"] == "loading"
    assert a.proc.poll() is None

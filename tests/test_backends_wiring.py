"""Backends from the config file in a real daemon: an upstream, vLLM refusal, doctor, model identity."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest

from test_backend_upstream import LlamaServer


@pytest.fixture(scope="module")
def upstream(model_path, tmp_path_factory):
    server = LlamaServer(model_path, tmp_path_factory.mktemp("upstream") / "server.log")
    yield server
    server.stop()


def test_daemon_serves_an_upstream_from_its_config_file(daemon_factory, upstream, tmp_path):
    config = tmp_path / "meshd.toml"
    config.write_text(
        "[[upstreams]]\n"
        'name = "llama-server"\n'
        f'base_url = "http://127.0.0.1:{upstream.port}/v1"\n'
        'dialect = "llama.cpp"\n'
        "embedding_batch = 1\n"
        'models = { "remote-smol" = "smol" }\n'
    )
    daemon = daemon_factory("--config", str(config))
    client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["remote-smol"]  # no bundled model beside it
    raw = client.chat.completions.with_raw_response.create(
        model="remote-smol", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0)
    assert raw.headers["x-meshd-route"] == "local" and raw.headers["x-meshd-model"] == "remote-smol"
    assert raw.parse().choices[0].message.content
    chunks = list(client.chat.completions.create(model="remote-smol", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens > 0


def test_upstream_model_identity_reaches_a_peer_with_unknowns_marked(daemon_factory, upstream, tmp_path):
    import socket
    import time

    from conftest import free_port
    from test_mesh_loopback import meshctl, peer_view, wait_state

    config = tmp_path / "meshd.toml"
    config.write_text(
        "[[upstreams]]\n"
        'name = "llama-server"\n'
        f'base_url = "http://127.0.0.1:{upstream.port}/v1"\n'
        'dialect = "llama.cpp"\n'
        'models = { "remote-smol" = "smol" }\n'
    )
    mesh_a = free_port(socket.SOCK_DGRAM)
    a = daemon_factory("--config", str(config), "--mesh-listen", f"127.0.0.1:{mesh_a}")
    b = daemon_factory("--no-default-model", "--peer", f"127.0.0.1:{mesh_a}")
    id_a, id_b = meshctl(a, "id")["node_id"], meshctl(b, "id")["node_id"]
    meshctl(a, "trust", "add", id_b)
    meshctl(b, "trust", "add", id_a)
    wait_state(b, id_a, {"connected"})
    deadline = time.monotonic() + 30
    model = None
    while time.monotonic() < deadline:
        models = (peer_view(b, id_a) or {}).get("models") or []
        if models and models[0].get("identity"):
            model = models[0]
            break
        time.sleep(0.3)
    assert model is not None, a.log()
    identity = model["identity"]
    assert (model["id"], model["backend"], model["state"]) == ("remote-smol", "upstream:llama-server", "ready")
    assert (identity["id"], identity["backend"], identity["upstream_model"]) == ("remote-smol", "upstream", "smol")
    # llama-cpp-python's /v1/models says nothing else about the model: every other field stays unknown.
    unknown = ("architecture", "family", "parameter_count", "quantization", "tokenizer_hash", "file_sha256",
               "file_size", "format")
    assert all(k in identity and identity[k] is None for k in unknown), identity
    assert model["sha256"] is None
    assert {"chat", "completion", "embeddings", "streaming"} <= set(model["capabilities"])
    # the local view (meshctl models) lists it with its identity unknown rather than made up
    local = [m for m in meshctl(a, "models")["models"] if m["location"] == "local"]
    assert [(m["model"], m["identity"]) for m in local] == [("remote-smol", None)]
    assert local[0]["descriptor"]["upstream_model"] == "smol" and local[0]["descriptor"]["file_sha256"] is None
    seen_from_b = [m for m in meshctl(b, "models")["models"] if m["location"] == "peer"]
    assert seen_from_b[0]["descriptor"] == identity


def test_vllm_without_a_gpu_or_vllm_is_rejected_at_start(tmp_path):
    config = tmp_path / "meshd.toml"
    config.write_text('[[vllm]]\nmodel = "Qwen/Qwen2.5-0.5B-Instruct"\n')
    out = subprocess.run([sys.executable, "-m", "meshd", "start", "--config", str(config), "--state-dir",
                          str(tmp_path / "s"), "--api-listen", "127.0.0.1:0", "--no-discovery",
                          "--mesh-listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    # start-up log lines (state dir, key) come first; the refusal is one line, no traceback
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("meshd: vLLM") and "Traceback" not in out.stderr


def test_doctor_finds_a_local_llama_server_and_prints_the_snippet(upstream, tmp_path):
    out = subprocess.run([sys.executable, "-m", "meshd", "doctor", "--state-dir", str(tmp_path / "s"),
                          "--api-listen", "127.0.0.1:0", "--mesh-listen", "127.0.0.1:0",
                          "--probe", f"llama-server={upstream.port}", "--json"],
                         capture_output=True, text=True, timeout=60)
    checks = json.loads(out.stdout)
    found = [c for c in checks["checks"] if c["name"] == "runtime llama-server"]
    assert found and found[0]["status"] == "ok", checks
    assert "[[upstreams]]" in found[0]["hint"] and f"127.0.0.1:{upstream.port}" in found[0]["hint"]


def test_model_identity_reaches_meshctl_models(daemon_factory, model_path):
    import hashlib
    import time

    daemon = daemon_factory()
    expected = hashlib.sha256(model_path.read_bytes()).hexdigest()
    deadline = time.monotonic() + 30
    identity = None
    while time.monotonic() < deadline and not identity:
        out = subprocess.run([sys.executable, "-m", "meshd.cli.meshctl", "--state-dir", str(daemon.state_dir),
                              "--json", "models"], capture_output=True, text=True, timeout=30)
        identity = json.loads(out.stdout)["models"][0]["identity"]
        time.sleep(0.3)
    assert identity == expected


async def test_missing_gguf_is_one_clear_warning_and_identity_stays_unknown(model_path, tmp_path, monkeypatch, caplog):
    import logging

    from meshd.backends.llama_cpp import LlamaCppBackend
    from meshd.catalog import ModelCatalog
    from meshd.config import ModelSpec, ServingConfig
    from meshd.daemon import describe_backend
    from meshd.modelid import FileFactsCache

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    backend = LlamaCppBackend([ModelSpec(id="smol", path=model_path)], ServingConfig(),
                              FileFactsCache(tmp_path / "facts.json"))
    catalog = ModelCatalog([backend])
    warned: set[str] = set()
    caplog.set_level(logging.WARNING, logger="meshd.daemon")
    await describe_backend(backend, catalog, warned)
    await describe_backend(backend, catalog, warned)
    warnings = [r for r in caplog.records if "cannot describe models" in r.getMessage()]
    assert len(warnings) == 1 and "meshd[llama]" in warnings[0].getMessage()
    (_, info), = catalog.models()
    assert info.details.get("identity") is None and info.details.get("sha256") is None
    monkeypatch.delitem(sys.modules, "gguf")
    await describe_backend(backend, catalog, warned)  # installed again: described on the next round
    (_, info), = catalog.models()
    assert info.details["identity"]["format"] == "gguf" and len(info.details["sha256"]) == 64


def test_token_rate_is_a_sliding_minute():
    from meshd.backends.admission import TokenRate

    rate = TokenRate()
    rate.add(30, now=100.0)
    rate.add(30, now=100.5)
    rate.add(60, now=130.0)
    assert rate.per_second(now=131.0) == 2.0  # 120 tokens over the last 60 s
    assert rate.per_second(now=160.5) == 1.0  # the first second's 60 have left the window
    assert rate.per_second(now=190.5) == 0.0


def test_health_from_model_states():
    from meshd.backends.base import ModelInfo, health_of

    ready, loading = ModelInfo("a", state="ready"), ModelInfo("b", state="loading")
    failed = ModelInfo("c", state="failed", error="file missing")
    assert health_of([ready]).status == "ok" and health_of([ready]).reason is None
    assert health_of([ready, loading]).status == "starting"
    assert health_of([ready, failed]).to_dict() == {"status": "degraded", "reason": "c: file missing"}
    assert health_of([failed]).status == "down" and health_of([]).status == "down"

"""The daemon as a service manager sees it: signals, readiness, queueing, disconnects."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

LONG = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "max_tokens": 2000, "temperature": 0, "stream": True}


def open_stream(daemon, payload: dict = LONG) -> socket.socket:
    """Start a streaming request on a raw socket and read until tokens flow."""
    body = json.dumps(payload).encode()
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    seen = b""
    while seen.count(b"data: ") < 4:
        chunk = sock.recv(65536)
        assert chunk, seen
        seen += chunk
    assert b" 200 " in seen.split(b"\r\n", 1)[0]
    return sock


def metric(daemon, name: str) -> float:
    status, text = daemon.get("/metrics")
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_stops_generation_and_next_request_runs(daemon_factory):
    daemon = daemon_factory()
    sock = open_stream(daemon)
    assert metric(daemon, "meshd_backend_running_requests") == 1
    sock.close()
    # 2000 tokens would take ~25 s at this machine's speed; cancellation takes a token or two.
    assert wait_for(lambda: metric(daemon, "meshd_backend_running_requests") == 0, timeout=5)
    assert "generation cancelled" in daemon.log()
    client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x", max_retries=0, timeout=30)
    reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4)
    assert reply.choices[0].message.content


def test_health_answers_while_a_long_generation_runs(daemon_factory):
    daemon = daemon_factory()
    sock = open_stream(daemon)
    try:
        for _ in range(5):
            status, body = daemon.get("/health", timeout=2)
            assert status == 200 and body["status"] == "ok"
        assert metric(daemon, "meshd_backend_running_requests") == 1  # still generating
    finally:
        sock.close()


def test_queue_full_is_429_with_retry_after(daemon_factory):
    daemon = daemon_factory("--max-queue", "0")
    sock = open_stream(daemon)
    try:
        client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2)
        assert info.value.body["code"] == "queue_full"
        assert int(info.value.response.headers["retry-after"]) >= 1
    finally:
        sock.close()


def test_queued_requests_run_in_turn(daemon_factory):
    daemon = daemon_factory("--max-queue", "4")
    client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
    results: list[str] = []

    def ask() -> None:
        reply = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=8, temperature=0)
        results.append(reply.choices[0].message.content)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4 and len(set(results)) == 1  # serialised on one context, same greedy text


def test_sigterm_during_stream_exits_zero_within_grace(daemon_factory):
    daemon = daemon_factory("--shutdown-grace", "2")
    sock = open_stream(daemon)
    started = time.monotonic()
    daemon.proc.send_signal(15)
    rc = daemon.proc.wait(timeout=20)
    elapsed = time.monotonic() - started
    sock.close()
    assert rc == 0, daemon.log()
    assert elapsed < 2 + 8  # grace plus generous slack for cancellation and unloading
    log = daemon.log()
    assert "stopping reason=SIGTERM" in log and "stopped" in log


def test_sd_notify_ready_and_stopping(daemon_factory, tmp_path):
    path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(30)
    daemon = daemon_factory(env={"NOTIFY_SOCKET": path})
    assert listener.recv(256) == b"READY=1"
    daemon.stop()
    assert listener.recv(256) == b"STOPPING=1"
    assert daemon.proc.returncode == 0
    listener.close()


def test_sigint_also_stops_cleanly(daemon_factory):
    daemon = daemon_factory()
    daemon.proc.send_signal(2)
    assert daemon.proc.wait(timeout=20) == 0


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "meshd", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_help_and_version():
    out = run_cli("--help")
    assert out.returncode == 0 and "start" in out.stdout
    out = run_cli("start", "--help")
    assert out.returncode == 0
    for flag in ("--config", "--state-dir", "--api-listen", "--model", "--no-default-model", "--log-level"):
        assert flag in out.stdout
    from meshd import __version__

    assert run_cli("version").stdout.strip() == f"meshd {__version__}"


@pytest.mark.parametrize(
    "args, env, key",
    [
        (["--api-listen", "nonsense"], {}, "api.listen"),
        ([], {"MESHD_API_LISTEN": "localhost:99999"}, "api.listen"),
        ([], {"MESHD_MAX_QUEUE": "lots"}, "serving.max_queue"),
        (["--model", "/does/not/exist.gguf"], {}, "models[0].path"),
    ],
)
def test_invalid_config_is_one_line_and_exit_2(tmp_path, args, env, key):
    out = run_cli("start", "--state-dir", str(tmp_path / "s"), *args, env=env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], out.stderr


def test_invalid_config_file_names_the_key(tmp_path):
    cfg = tmp_path / "meshd.toml"
    cfg.write_text('[api]\nlisten = "127.0.0.1:1"\nmax_body_bites = 5\n')
    out = run_cli("start", "--config", str(cfg), "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and "api.max_body_bites: unknown setting" in out.stderr
    cfg.write_text("this is = not [toml")
    out = run_cli("start", "--config", str(cfg))
    assert out.returncode == 2 and "not valid TOML" in out.stderr


def test_port_in_use_is_a_clear_error(daemon_factory, tmp_path):
    first = daemon_factory()
    out = run_cli("start", "--api-listen", f"127.0.0.1:{first.port}", "--state-dir", str(tmp_path / "other"))
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{first.port}" in out.stderr

"""`meshd doctor` as a library: each check against the real host, and a real runtime to find."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

from identity import KEY_FILE_NAME, lock_state_dir
from meshd.backends.upstream import parse_upstream_table
from meshd.doctor import (
    CheckResult,
    DoctorOptions,
    RuntimeProbe,
    check_llama_rpc,
    check_native,
    check_packages,
    check_port,
    check_state_dir,
    exit_code,
    render_json,
    render_text,
    run_checks,
    upstream_snippet,
)


@pytest.fixture(scope="module")
def llama_server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    pytest.importorskip("uvicorn", reason="llama_cpp.server needs llama-cpp-python[server] extras")
    port = free_port()
    log = tmp_path_factory.mktemp("doctor") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model_path),
                                 "--host", "127.0.0.1", "--port", str(port), "--model_alias", "smol",
                                 "--n_ctx", "256"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log.read_text()) from None
                time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


async def test_finds_a_running_runtime_and_prints_its_config(llama_server: int, tmp_path: Path) -> None:
    empty_port = free_port()
    options = DoctorOptions(
        state_dir=tmp_path / "state",
        api_listen=("127.0.0.1", free_port()),
        mesh_listen=("127.0.0.1", free_port()),
        probes=(RuntimeProbe("llama-test", llama_server, "llama.cpp"), RuntimeProbe("nobody", empty_port)),
    )
    results = by_name(await run_checks(options))
    found = results["runtime llama-test"]
    assert found.status == "ok" and found.data["found"] and found.data["models"] == ["smol"]
    # The snippet is valid TOML that the upstream backend's own parser accepts.
    table = tomllib.loads(found.data["snippet"])["upstreams"][0]
    assert table == {"name": "llama-test", "base_url": f"http://127.0.0.1:{llama_server}/v1",
                     "dialect": "llama.cpp", "models": ["smol"]}
    config = parse_upstream_table("upstreams[0]", table)
    assert config.model_map == {"smol": "smol"}
    assert "nothing answers" in results["runtime nobody"].message and not results["runtime nobody"].data["found"]
    text = render_text(list(results.values()))
    assert "[[upstreams]]" in text and f"127.0.0.1:{llama_server}/v1" in text
    assert results["api port"].status == "ok" and results["mesh port"].status == "ok"


async def test_a_port_that_answers_something_else(tmp_path: Path) -> None:
    # Python's http.server answers 404 on /v1/models: found, but not a model runtime.
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        results = by_name(await run_checks(DoctorOptions(
            state_dir=tmp_path, api_listen=None, mesh_listen=None, probes=(RuntimeProbe("web", port),))))
    finally:
        proc.terminate()
        proc.wait(5)
    assert "not as an OpenAI-compatible server (HTTP 404)" in results["runtime web"].message
    assert results["runtime web"].hint is None


def test_state_dir_permissions(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    (dir_check,) = [r for r in check_state_dir(state) if r.name == "state dir"]
    assert dir_check.status == "fail" and "0755" in dir_check.message and dir_check.hint.startswith("chmod 700")
    state.chmod(0o700)
    key = state / KEY_FILE_NAME
    key.write_text("not really a key")
    key.chmod(0o644)
    results = by_name(check_state_dir(state))
    assert results["state dir"].status == "ok"
    assert results["node key"].status == "fail" and "0644" in results["node key"].message
    assert exit_code(list(results.values())) == 1
    key.chmod(0o600)
    results = by_name(check_state_dir(state))
    assert results["node key"].status == "ok" and exit_code(list(results.values())) == 0
    missing = by_name(check_state_dir(tmp_path / "absent"))
    assert missing["state dir"].status == "ok" and "first start" in missing["state dir"].message


def test_ports_in_use(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        busy = check_port("api port", "127.0.0.1", port, socket.SOCK_STREAM, running_pid=None)
        assert busy.status == "fail" and "in use" in busy.message
        # The same port while a meshd holds the state dir lock is its own listener.
        mine = check_port("api port", "127.0.0.1", port, socket.SOCK_STREAM, running_pid=1234)
        assert mine.status == "ok" and "1234" in mine.message
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        taken = check_port("mesh port", "127.0.0.1", udp.getsockname()[1], socket.SOCK_DGRAM, None)
        assert taken.status == "fail" and "/udp" in taken.message
    assert check_port("api port", "127.0.0.1", free_port(), socket.SOCK_STREAM, None).status == "ok"


async def test_running_daemon_lock_makes_busy_ports_fine(tmp_path: Path) -> None:
    state = tmp_path / "state"
    lock = lock_state_dir(state)  # what a running meshd holds
    try:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            results = by_name(await run_checks(DoctorOptions(
                state_dir=state, api_listen=("127.0.0.1", listener.getsockname()[1]), mesh_listen=None, probes=())))
    finally:
        lock.release()
    assert results["api port"].status == "ok" and "running meshd" in results["api port"].message


def test_native_extension_and_rpc_reports_match_the_install() -> None:
    native = check_native()
    try:
        import meshd_native
    except ImportError:
        assert native.status == "warn" and "not available" in native.message
    else:
        assert native.data["implementation"] == meshd_native.IMPLEMENTATION
        assert (native.status == "ok") == (meshd_native.IMPLEMENTATION == "native")
    rpc = check_llama_rpc()
    spec = importlib.util.find_spec("llama_cpp")
    present = spec is not None and (Path(spec.origin).parent / "lib" / "libggml-rpc.so").is_file()
    assert (rpc.status == "ok") == present and rpc.data["rpc"] == present


def test_package_versions_are_the_installed_ones() -> None:
    results = by_name(check_packages())
    assert results["package aiohttp"].message == importlib.metadata.version("aiohttp")
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        assert results["package vllm"].status == "ok" and "not installed" in results["package vllm"].message


def test_renderings_and_exit_code() -> None:
    results = [
        CheckResult("python", "ok", "3.11"),
        CheckResult("multicast", "warn", "no interface", hint="use static peers"),
        CheckResult("state dir", "fail", "mode 0755", hint="chmod 700 /x"),
    ]
    assert exit_code(results) == 1 and exit_code(results[:2]) == 0
    text = render_text(results)
    lines = text.splitlines()
    assert lines[0].startswith("[ ok ] python") and lines[1].startswith("[warn] multicast")
    assert any(line.startswith("[FAIL] state dir") for line in lines)
    assert lines[-1] == "1 ok, 1 warnings, 1 failures"
    decoded = json.loads(render_json(results))
    assert decoded["ok"] is False and [c["status"] for c in decoded["checks"]] == ["ok", "warn", "fail"]
    assert decoded["checks"][2]["hint"] == "chmod 700 /x"


def test_snippet_quotes_awkward_names() -> None:
    snippet = upstream_snippet('my "box"', "http://127.0.0.1:1234/v1", ["a\\b", "qwen2.5:7b"], "openai")
    table = tomllib.loads(snippet)["upstreams"][0]
    assert table["name"] == 'my "box"' and table["models"] == ["a\\b", "qwen2.5:7b"]

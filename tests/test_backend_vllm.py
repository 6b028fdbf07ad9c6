"""vLLM: refusing to exist without vLLM or a GPU, and supervising a real child server.

The child is llama-cpp-python's server (``python -m llama_cpp.server``): it
speaks the same OpenAI API as ``vllm serve``, so the backend's command is
pointed at it. A few supervision details (backoff growth, SIGTERM-ignoring
children) use Python's own ``http.server`` or a tiny script as the child:
those tests are about process handling, not the API.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

from meshd.backends.base import ChatMessage, GenerationRequest, SamplingParams, TextGenerated
from meshd.backends.supervisor import (
    ChildExited,
    ChildNotReady,
    ChildReady,
    ChildStarted,
    ChildStopped,
    ProcessSupervisor,
    RestartScheduled,
    SupervisorConfig,
    SupervisorEvent,
    backoff_delay,
)
from meshd.backends.vllm import VllmBackend, VllmConfig, detect_gpus, preflight, vllm_upstream
from meshd.errors import BackendError, BackendUnavailable, ServiceUnavailable, UpstreamUnavailable


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting for a parent that is not ours to reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat_line.rsplit(")", 1)[1].split()[0] == "Z"


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --- refusal -------------------------------------------------------------------------


def test_missing_vllm_is_refused_at_construction(tmp_path: Path) -> None:
    empty_path = str(tmp_path)  # a PATH with no `vllm` on it
    with pytest.raises(BackendUnavailable, match="vLLM is not installed") as info:
        VllmBackend(VllmConfig(model="Qwen/Qwen2.5-0.5B-Instruct"), path=empty_path)
    assert info.value.code == "vllm_not_installed" and info.value.status == 503


def test_no_gpu_is_refused(tmp_path: Path) -> None:
    bin_dir, dev_dir = tmp_path / "bin", tmp_path / "dev"
    bin_dir.mkdir()
    dev_dir.mkdir()
    # Stand-in executable named `vllm`, only so the check gets past "installed".
    fake = bin_dir / "vllm"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    config = VllmConfig(model="Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(BackendUnavailable, match="needs a GPU") as info:
        preflight(config, path=str(bin_dir), dev_dir=dev_dir)
    assert info.value.code == "no_gpu"
    (dev_dir / "nvidia0").touch()
    (dev_dir / "nvidiactl").touch()  # a control node, not a GPU
    assert preflight(config, path=str(bin_dir), dev_dir=dev_dir) == ["nvidia0"]
    assert detect_gpus(dev_dir) == ["nvidia0"]


def test_this_host_without_vllm_or_gpu_is_refused() -> None:
    """Where vllm or a GPU is missing (the test machines), the default config cannot start."""
    if shutil.which("vllm") and detect_gpus():
        pytest.skip("this host has vllm and a GPU")
    with pytest.raises(BackendUnavailable):
        VllmBackend(VllmConfig(model="Qwen/Qwen2.5-0.5B-Instruct"))


def test_vllm_upstream_preset() -> None:
    config = vllm_upstream("gpu-box", "http://10.0.0.5:8000/v1", {"qwen": "Qwen/Qwen2.5-7B-Instruct"})
    assert config.dialect == "vllm" and config.model_map == {"qwen": "Qwen/Qwen2.5-7B-Instruct"}


def test_backoff_delay_doubles_and_caps() -> None:
    assert [backoff_delay(n, 0.5, 3.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


# --- a real server under supervision --------------------------------------------------


async def test_supervised_llama_server_lifecycle(model_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("uvicorn", reason="llama_cpp.server needs llama-cpp-python[server] extras")
    caplog.set_level(logging.INFO, logger="meshd.child")
    events: list[SupervisorEvent] = []
    config = VllmConfig(
        model=str(model_path), id="smol", require_gpu=False, ready_timeout_s=60, backoff_initial_s=0.5,
        command=(sys.executable, "-m", "llama_cpp.server", "--model", "{model}", "--host", "{host}",
                 "--port", "{port}", "--model_alias", "{served_name}"),
        extra_args=("--n_ctx", "256"),
    )
    backend = VllmBackend(config, on_event=events.append)
    assert backend.models()[0].state == "loading"
    assert backend.health().status == "starting"
    request = GenerationRequest(model="smol", params=SamplingParams(max_tokens=4, temperature=0.0),
                                messages=(ChatMessage("user", "hi"),))
    with pytest.raises(ServiceUnavailable):
        backend.generate(request)
    await backend.start()
    try:
        first_pid = backend.supervisor.pid
        assert backend.models()[0].state == "ready"
        texts = [e.text async for e in backend.generate(request) if isinstance(e, TextGenerated)]
        assert "".join(texts)
        assert backend.health().status == "ok" and backend.load().tokens_per_s > 0
        assert "streaming" in backend.capabilities().names() and not backend.capabilities().resume
        (descriptor,) = await backend.descriptors()
        assert (descriptor.id, descriptor.backend, descriptor.upstream_model) == ("smol", "vllm", "smol")
        assert descriptor.file_sha256 is None and descriptor.architecture is None  # the server does not say
        # Its output is in our log, line by line.
        child_lines = [r.getMessage() for r in caplog.records if r.name == "meshd.child"]
        assert any(f"127.0.0.1:{backend.port}" in line for line in child_lines), child_lines[-5:]

        os.kill(first_pid, signal.SIGKILL)
        await until(lambda: not backend.supervisor.ready, what="the supervisor to notice")
        assert backend.models()[0].state == "loading"
        assert backend.health().status in ("down", "starting")  # restart scheduled, or starting again
        with pytest.raises(ServiceUnavailable, match="not ready"):
            backend.generate(request)
        # Straight to the adapter while the server is down: a typed failure, remembered ...
        with pytest.raises(UpstreamUnavailable):
            [e async for e in backend.upstream.generate(request)]
        assert backend.upstream.models()[0].state == "failed"
        await until(lambda: backend.supervisor.ready, what="the restart")
        second_pid = backend.supervisor.pid
        assert second_pid != first_pid and gone(first_pid)
        kinds = [type(e) for e in events]
        assert kinds == [ChildStarted, ChildReady, ChildExited, RestartScheduled, ChildStarted, ChildReady]
        exited, scheduled = events[2], events[3]
        assert isinstance(exited, ChildExited) and exited.returncode == -signal.SIGKILL
        assert isinstance(scheduled, RestartScheduled) and scheduled.delay_s == 0.5
        # ... and forgotten once the restarted server answers, without waiting for a request.
        await until(lambda: backend.models()[0].state == "ready", what="the model to be ready again")
        texts = [e.text async for e in backend.generate(request) if isinstance(e, TextGenerated)]
        assert "".join(texts)
    finally:
        await backend.close()
    assert isinstance(events[-1], ChildStopped) and not events[-1].killed
    assert gone(second_pid) and group_gone(second_pid)
    with socket.socket() as sock:
        # Nothing listens there any more (REUSEADDR only looks past TIME_WAIT, as a server would).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", backend.port))


# --- supervision details with trivial children ---------------------------------------


async def test_backoff_grows_across_quick_crashes() -> None:
    port = free_port()
    timed: list[tuple[float, SupervisorEvent]] = []
    supervisor = ProcessSupervisor(SupervisorConfig(
        name="http", argv=(sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"),
        ready_url=f"http://127.0.0.1:{port}/", ready_poll_s=0.05, backoff_initial_s=0.2, backoff_max_s=0.5,
        backoff_reset_s=30,
    ), on_event=lambda event: timed.append((time.monotonic(), event)))
    await supervisor.start()
    try:
        for _ in range(3):
            pid = supervisor.pid
            os.kill(pid, signal.SIGKILL)
            await until(lambda: supervisor.ready and supervisor.pid != pid, what="restart")
    finally:
        await supervisor.stop()
    delays = [e.delay_s for _, e in timed if isinstance(e, RestartScheduled)]
    assert delays == [0.2, 0.4, 0.5]
    assert supervisor.restarts == 3
    # Each restart really waited its delay after the crash.
    for index, (when, event) in enumerate(timed):
        if isinstance(event, RestartScheduled):
            restarted = next(t for t, e in timed[index:] if isinstance(e, ChildStarted))
            assert restarted - when >= event.delay_s * 0.95


async def test_first_start_failure_raises_with_output() -> None:
    events: list[SupervisorEvent] = []
    supervisor = ProcessSupervisor(SupervisorConfig(
        name="bad", argv=(sys.executable, "-c", "import sys; print('error: no such model xyz'); sys.exit(3)"),
        ready_url=f"http://127.0.0.1:{free_port()}/",
    ), on_event=events.append)
    with pytest.raises(BackendError, match="(?s)exited with code 3.*no such model xyz"):
        await supervisor.start()
    assert not any(isinstance(e, RestartScheduled) for e in events)
    assert supervisor.state == "stopped"


async def test_child_never_ready_is_killed() -> None:
    events: list[SupervisorEvent] = []
    supervisor = ProcessSupervisor(SupervisorConfig(
        name="mute", argv=(sys.executable, "-c", "import time; time.sleep(60)"),
        ready_url=f"http://127.0.0.1:{free_port()}/", ready_timeout_s=0.5, ready_poll_s=0.05,
    ), on_event=events.append)
    started = time.monotonic()
    with pytest.raises(BackendError, match="not ready in time"):
        await supervisor.start()
    assert time.monotonic() - started < 10
    pid = next(e.pid for e in events if isinstance(e, ChildStarted))
    assert any(isinstance(e, ChildNotReady) for e in events)
    assert gone(pid)


async def test_stop_kills_what_ignores_sigterm_and_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    events: list[SupervisorEvent] = []
    supervisor = ProcessSupervisor(SupervisorConfig(
        name="stubborn", argv=(sys.executable, "-c", script), ready_url=None, stop_timeout_s=0.5,
    ), on_event=events.append)
    await supervisor.start()
    pid = supervisor.pid
    await until(lambda: pid_file.exists() and pid_file.read_text().strip().isdigit(), what="grandchild")
    grandchild = int(pid_file.read_text())
    assert not gone(grandchild)
    await supervisor.stop()
    stopped = events[-1]
    assert isinstance(stopped, ChildStopped) and stopped.killed
    assert gone(pid)
    await until(lambda: gone(grandchild), timeout=5, what="grandchild to die")  # reaped by init

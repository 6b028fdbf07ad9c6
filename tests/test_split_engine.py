"""Layer split, llama.cpp side: real RPC server and host child processes over loopback.

The reference for every split run is a LlamaEngine in this process on the same
model and prompt: at temperature 0 the split (and a resumed split) must give
bit-identical text and token ids.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from conftest import free_port

from meshd.backends.base import (
    ChatMessage,
    GenerationFinished,
    GenerationRequest,
    SamplingParams,
    TextGenerated,
)
from meshd.errors import (
    BackendError,
    ContextLengthExceeded,
    RateLimited,
    ServiceUnavailable,
)
from meshd.split import hostwire

N_CTX = 512
THREADS = 2

CHAT = GenerationRequest("smollm2", SamplingParams(max_tokens=24, temperature=0.0),
                         messages=(ChatMessage("user", "Name three colours of the rainbow."),))
COMPLETION = GenerationRequest("smollm2", SamplingParams(max_tokens=24, temperature=0.0),
                               prompt="The three most common metals are")


@pytest.fixture(scope="module")
def rpc_ready(model_path: Path) -> Path:
    from meshd.split.rpclib import rpc_support

    missing = rpc_support()
    if missing is not None:
        pytest.skip(f"llama.cpp RPC is not usable here: {missing}")
    return model_path


@pytest.fixture(scope="module")
def reference(rpc_ready: Path) -> Iterator[dict[str, tuple[str, tuple[int, ...], GenerationFinished]]]:
    """Each prompt's greedy output from a LlamaEngine in this process, plus the layer count."""
    from meshd.backends.llama_engine import LlamaEngine

    engine = LlamaEngine(rpc_ready, N_CTX, THREADS)
    engine.load()
    import llama_cpp

    out = {"chat": run(engine, CHAT), "completion": run(engine, COMPLETION)}
    out["n_layer"] = llama_cpp.llama_model_n_layer(engine._llama._model.model)  # type: ignore[assignment]
    engine.close()
    yield out


def run(engine, request, on_delta=None, cancelled=None) -> tuple[str, tuple[int, ...], GenerationFinished]:
    deltas: list[TextGenerated] = []

    def emit(delta: TextGenerated) -> None:
        deltas.append(delta)
        if on_delta is not None:
            on_delta(deltas)

    done = engine.generate(request, emit, cancelled or threading.Event())
    return "".join(d.text for d in deltas), tuple(i for d in deltas for i in d.token_ids), done


@pytest.fixture
def rpc_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    from meshd.split.rpc_server import spawn_rpc_server, wait_listening

    port = free_port()
    proc = spawn_rpc_server(port, tmp_path / "cache", THREADS, tmp_path / "rpc.log")
    try:
        wait_listening(port, proc, 30)
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.kill()
        proc.wait()


class Planner:
    """plan_for that records its calls: the first plan, then what to do after a loss."""

    def __init__(self, first, after_loss=None) -> None:
        self.first, self.after_loss, self.calls = first, after_loss, []

    def __call__(self, lost: bool):
        self.calls.append(lost)
        if not lost:
            return self.first
        if isinstance(self.after_loss, Exception):
            raise self.after_loss
        return self.after_loss


def split_engine(model_path: Path, tmp_path: Path, planner: Planner):
    from meshd.split.engine import SplitEngine

    return SplitEngine(model_path, N_CTX, THREADS, planner, tmp_path / "host.log")


def kill_after(proc: subprocess.Popen, tokens: int):
    """An on_delta that SIGKILLs ``proc`` once ``tokens`` completion tokens were delivered."""

    def on_delta(deltas: list[TextGenerated]) -> None:
        if proc.poll() is None and sum(len(d.token_ids) for d in deltas) >= tokens:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    return on_delta


# --- split equals local ---------------------------------------------------------


def test_half_the_layers_remote_gives_the_local_output(rpc_ready, reference, rpc_server, tmp_path) -> None:
    from meshd.split.engine import HostPlan

    endpoint, _ = rpc_server
    engine = split_engine(rpc_ready, tmp_path, Planner(HostPlan((endpoint,), 15, summary="local 16, rpc 15")))
    engine.load()
    try:
        remote = [d for d in engine.devices if d["endpoint"] == endpoint]
        assert len(remote) == 1 and remote[0]["device"] == f"RPC0[{endpoint}]"
        assert remote[0]["model_buffer_mib"] > 0
        local = [d for d in engine.devices if d["device"] == "CPU"]
        assert local and local[0]["model_buffer_mib"] > 0
        assert engine.context_length == N_CTX and engine.embedding_length == 576
        for name, request in (("chat", CHAT), ("completion", COMPLETION)):
            text, ids, done = run(engine, request)
            ref_text, ref_ids, ref_done = reference[name]
            assert (text, ids) == (ref_text, ref_ids), name
            assert (done.prompt_tokens, done.completion_tokens) == (ref_done.prompt_tokens, ref_done.completion_tokens)
        assert engine.prompt_tokens(CHAT)[1] == ["<|im_end|>"]
        assert engine.restarts == 0 and engine.alive()
    finally:
        engine.close()
    assert not engine.alive()


def test_all_layers_remote_gives_the_local_output(rpc_ready, reference, rpc_server, tmp_path) -> None:
    from meshd.split.engine import HostPlan

    endpoint, _ = rpc_server
    everything = reference["n_layer"] + 1  # n_gpu_layers counts the output layer too
    engine = split_engine(rpc_ready, tmp_path, Planner(HostPlan((endpoint,), everything)))
    engine.load()
    try:
        assert engine.ready["n_gpu_layers_max"] == everything
        buffers = {d["device"]: d["model_buffer_mib"] for d in engine.devices}
        # Only the token embeddings stay on the CPU.
        assert buffers[f"RPC0[{endpoint}]"] > buffers.get("CPU", 0.0)
        text, ids, _ = run(engine, CHAT)
        assert (text, ids) == reference["chat"][:2]
    finally:
        engine.close()


def test_the_output_head_kept_home_gives_the_local_output(rpc_ready, reference, rpc_server, tmp_path) -> None:
    """head_on_host: the head's weights load into this process, not the RPC server; same greedy text."""
    from meshd.split.engine import HostPlan
    from meshd.split.shape import model_shape

    endpoint, _ = rpc_server
    shape = model_shape(rpc_ready)
    engine = split_engine(rpc_ready, tmp_path, Planner(HostPlan((endpoint,), 16, head_on_host=True)))
    engine.load()
    try:
        remote = next(d for d in engine.devices if d["endpoint"] == endpoint)["model_buffer_mib"] * (1 << 20)
        # 15 repeating layers went to the server (llama.cpp offloads the head's slot first), the head did not.
        assert 14 * shape.layer_bytes < remote < 15 * shape.layer_bytes + shape.output_bytes / 2, (remote, shape)
        for name, request in (("chat", CHAT), ("completion", COMPLETION)):
            text, ids, _ = run(engine, request)
            assert (text, ids) == reference[name][:2], name
    finally:
        engine.close()


# --- losses ---------------------------------------------------------------------------


def test_a_killed_rpc_server_is_replanned_and_the_request_resumes(rpc_ready, reference, rpc_server, tmp_path) -> None:
    from meshd.split.engine import HostPlan

    endpoint, proc = rpc_server
    planner = Planner(HostPlan((endpoint,), 15), after_loss=HostPlan((), 0, summary="all local"))
    engine = split_engine(rpc_ready, tmp_path, planner)
    engine.load()
    try:
        text, ids, done = run(engine, CHAT, on_delta=kill_after(proc, 4))
        assert proc.returncode == -signal.SIGKILL  # it really died mid-request
        ref_text, ref_ids, ref_done = reference["chat"]
        assert (text, ids) == (ref_text, ref_ids)
        assert (done.finish_reason, done.prompt_tokens, done.completion_tokens) == (
            ref_done.finish_reason, ref_done.prompt_tokens, ref_done.completion_tokens)
        assert planner.calls == [False, True]
        assert engine.restarts == 1 and engine.plan.summary == "all local"
        assert all(d["endpoint"] is None for d in engine.devices)
        assert run(engine, COMPLETION)[:2] == reference["completion"][:2]  # the new child serves on
    finally:
        engine.close()


def test_no_plan_after_a_loss_raises_the_planners_error(rpc_ready, rpc_server, tmp_path) -> None:
    from meshd.split.engine import HostPlan

    endpoint, proc = rpc_server
    planner = Planner(HostPlan((endpoint,), 15),
                      after_loss=ServiceUnavailable("no peer holds the layers", code="split_unavailable"))
    engine = split_engine(rpc_ready, tmp_path, planner)
    engine.load()
    try:
        with pytest.raises(ServiceUnavailable) as caught:
            run(engine, CHAT, on_delta=kill_after(proc, 2))
        assert caught.value.code == "split_unavailable"
        assert planner.calls == [False, True] and not engine.alive()
    finally:
        engine.close()


def test_a_plan_that_keeps_failing_ends_in_split_worker_lost(rpc_ready, rpc_server, tmp_path) -> None:
    from meshd.split.engine import HostPlan

    endpoint, proc = rpc_server
    plan = HostPlan((endpoint,), 15)
    planner = Planner(plan, after_loss=plan)  # the same dead server, every time
    engine = split_engine(rpc_ready, tmp_path, planner)
    engine.load()
    try:
        with pytest.raises(BackendError) as caught:
            run(engine, CHAT, on_delta=kill_after(proc, 2))
        assert caught.value.code == "split_worker_lost" and caught.value.status >= 500
        assert planner.calls == [False, True, True]  # two recoveries, then give up
    finally:
        engine.close()


def test_an_unreachable_rpc_server_fails_the_load_typed(rpc_ready, tmp_path) -> None:
    from meshd.split.engine import HostPlan

    dead = f"127.0.0.1:{free_port()}"
    engine = split_engine(rpc_ready, tmp_path, Planner(HostPlan((dead,), 15)))
    with pytest.raises(BackendError) as caught:
        engine.load()
    assert caught.value.code == "split_load_failed"
    assert "Failed to connect" in caught.value.message  # the child's last words, from its log
    assert not engine.alive()


# --- requests through the child --------------------------------------------------------


def test_cancel_stops_the_child_and_it_serves_the_next_request(rpc_ready, reference, rpc_server, tmp_path) -> None:
    from meshd.split.engine import HostPlan

    endpoint, _ = rpc_server
    engine = split_engine(rpc_ready, tmp_path, Planner(HostPlan((endpoint,), 15)))
    engine.load()
    try:
        cancelled = threading.Event()
        _, ids, done = run(engine, COMPLETION, on_delta=lambda deltas: cancelled.set(), cancelled=cancelled)
        assert done.finish_reason == "cancelled"
        assert len(ids) < len(reference["completion"][1])
        assert run(engine, COMPLETION)[:2] == reference["completion"][:2]
    finally:
        engine.close()


def test_a_typed_error_in_the_child_arrives_typed(rpc_ready, rpc_server, tmp_path) -> None:
    from meshd.split.engine import HostPlan

    endpoint, _ = rpc_server
    engine = split_engine(rpc_ready, tmp_path, Planner(HostPlan((endpoint,), 15)))
    engine.load()
    try:
        too_long = GenerationRequest("smollm2", SamplingParams(max_tokens=4), prompt="word " * (N_CTX + 10))
        with pytest.raises(ContextLengthExceeded) as caught:
            run(engine, too_long)
        assert caught.value.param == "prompt" and caught.value.status == 400
        assert engine.alive() and engine.restarts == 0
    finally:
        engine.close()


def test_embeddings_are_refused(rpc_ready, tmp_path) -> None:
    from meshd.errors import InvalidRequest
    from meshd.split.engine import HostPlan

    engine = split_engine(rpc_ready, tmp_path, Planner(HostPlan((), 0)))
    with pytest.raises(InvalidRequest):
        engine.embed(["hello"])


# --- rpc_server -----------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["0.0.0.0:50052", "192.168.1.10:50052", "[::1]:50052", "localhost:50052", "127.0.0.1"])
def test_rpc_server_refuses_anything_but_loopback(endpoint, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshd.split.rpc_server", "--endpoint", endpoint, "--cache-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "refusing" in result.stderr or "not HOST:PORT" in result.stderr


# --- hostwire -------------------------------------------------------------------------


def test_an_oversize_frame_is_rejected() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(struct.pack(">I", hostwire.MAX_FRAME + 1))
        with pytest.raises(BackendError) as caught:
            hostwire.recv_msg(right)
        assert caught.value.code == "split_protocol_error"
        with pytest.raises(BackendError):
            hostwire.send_msg(left, {"text": "x" * (hostwire.MAX_FRAME + 1)})


def test_frames_round_trip_and_eof_reads_as_none() -> None:
    left, right = socket.socketpair()
    with right:
        with left:
            hostwire.send_msg(left, {"op": "text", "text": "héllo", "token_ids": [1, 2]})
            left.sendall(struct.pack(">I", 10) + b"\x81")  # a frame cut short by the peer's death
        assert hostwire.recv_msg(right) == {"op": "text", "text": "héllo", "token_ids": [1, 2]}
        assert hostwire.recv_msg(right) is None


def test_errors_round_trip_as_their_own_class() -> None:
    left, right = socket.socketpair()
    with left, right:
        hostwire.send_msg(left, hostwire.error_to_wire(ContextLengthExceeded("too long", param="messages")))
        hostwire.send_msg(left, hostwire.error_to_wire(RateLimited("slow", limit="tokens", scope="key",
                                                                   retry_after=1.0)))
        hostwire.send_msg(left, hostwire.error_to_wire(RuntimeError("llama_decode returned -3")))
        first, second, third = (hostwire.error_from_wire(hostwire.recv_msg(right)) for _ in range(3))
    assert type(first) is ContextLengthExceeded
    assert (first.message, first.param, first.code, first.status) == ("too long", "messages",
                                                                      "context_length_exceeded", 400)
    # RateLimited needs constructor extras the wire does not carry: a BackendError keeps code and text.
    assert type(second) is BackendError and second.code == "rate_limit_exceeded" and second.retry_after == 1.0
    assert type(third) is BackendError and "llama_decode returned -3" in third.message


def test_requests_round_trip() -> None:
    request = GenerationRequest(
        "smollm2",
        SamplingParams(max_tokens=7, temperature=0.2, stop=("\n", "END"), seed=3,
                       response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}),
        messages=(ChatMessage("system", "be brief"), ChatMessage("user", "hi")),
        request_id="r1", resume_token_ids=(5, 6), resume_text="ab",
    )
    wire = msgpack.unpackb(msgpack.packb(hostwire.request_to_wire(request)), raw=False)
    assert hostwire.request_from_wire(wire) == request
    plain = GenerationRequest("m", SamplingParams(), prompt="x")
    assert hostwire.request_from_wire(hostwire.request_to_wire(plain)) == plain


def test_the_rpc_server_dies_with_its_parent(rpc_ready, tmp_path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from pathlib import Path\n"
            "from meshd.split.rpc_server import spawn_rpc_server, wait_listening\n"
            f"port = {free_port()}\n"
            f"proc = spawn_rpc_server(port, Path({str(tmp_path / 'cache')!r}), 1, Path({str(tmp_path / 'rpc.log')!r}))\n"
            "wait_listening(port, proc, 30)\n"
            "print(proc.pid, flush=True)\n"
            "time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True,
    )
    child = int(parent.stdout.readline())
    assert _running(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan may wait a moment for its new parent to reap it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status

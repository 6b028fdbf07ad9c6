"""The OpenAI-compatible upstream backend, against real servers.

The upstream is llama-cpp-python's own server (``python -m llama_cpp.server``)
serving the bundled SmolLM2: the stand-in for vLLM, Ollama or LM Studio. A
running meshd daemon serves as a second upstream, one that streams usage.
Only the timeout tests use a fake: a tiny aiohttp server that is slow on
purpose, because those tests are about the clock, not the model.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import free_port
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.backends.base import (
    ChatMessage,
    EmbeddingRequest,
    GenerationFinished,
    GenerationRequest,
    SamplingParams,
    TextGenerated,
)
from meshd.backends.openai_wire import SseDecoder, error_from_response, pool_embedding, request_body
from meshd.backends.upstream import UpstreamBackend, UpstreamConfig, UpstreamFinished, parse_upstream_table
from meshd.config import ConfigError
from meshd.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    QueueFull,
    UnsupportedParameter,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, seed=7)


def chat(text: str, params: SamplingParams = GREEDY, model: str = "smol") -> GenerationRequest:
    return GenerationRequest(model=model, params=params, messages=(ChatMessage("user", text),))


async def collect(stream: AsyncIterator) -> tuple[list[TextGenerated], GenerationFinished]:
    deltas = []
    async for event in stream:
        if isinstance(event, TextGenerated):
            deltas.append(event)
        else:
            return deltas, event
    raise AssertionError("stream ended without GenerationFinished")


# --- a real llama.cpp server ---------------------------------------------------------


class LlamaServer:
    def __init__(self, model: Path, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                "--port", str(self.port), "--model_alias", "smol", "--n_ctx", "512", "--embedding", "true",
                # Off, so a second request never interrupts the first: cancellation must come from us.
                "--interrupt_requests", "false"]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 60) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama server exited:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(self.log())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    pytest.importorskip("uvicorn", reason="llama_cpp.server needs llama-cpp-python[server] extras")
    srv = LlamaServer(model_path, tmp_path_factory.mktemp("llama-server") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def make_config(base_url: str, **overrides: object) -> UpstreamConfig:
    settings_: dict = {"name": "llama", "base_url": base_url, "model_map": {"smol": "smol"}, "dialect": "llama.cpp",
                       "embedding_batch": 1, "refresh_s": 0, "timeout_s": 30}
    settings_.update(overrides)
    return UpstreamConfig(**settings_)


@pytest.fixture
async def backend(server: LlamaServer) -> AsyncIterator[UpstreamBackend]:
    b = UpstreamBackend(make_config(server.base_url))
    await b.start()
    yield b
    await b.close()


async def direct(base_url: str, path: str, body: dict) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.post(base_url + path, json=body) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


# --- against the real server ---------------------------------------------------------


async def warm(server: LlamaServer, text: str) -> None:
    """Send the request once first. llama-cpp-python's server reuses the KV of the previous
    prompt's common prefix, and greedy output evaluated that way differs from a cold
    evaluation (on SmolLM2 from the third token); after one identical request, every
    repeat is evaluated the same way, so ours and the reference can be compared."""
    await direct(server.base_url, "/chat/completions", {
        "model": "smol", "messages": [{"role": "user", "content": text}],
        "max_tokens": 16, "temperature": 0.0, "top_p": 0.95, "seed": 7})


async def test_stream_passes_tokens_through_and_counts_usage(server: LlamaServer, backend: UpstreamBackend) -> None:
    await warm(server, "Name three colours.")
    deltas, finished = await collect(backend.generate(chat("Name three colours.")))
    reference = await direct(server.base_url, "/chat/completions", {
        "model": "smol", "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 16, "temperature": 0.0, "top_p": 0.95, "seed": 7,
    })
    assert "".join(d.text for d in deltas) == reference["choices"][0]["message"]["content"]
    # Token by token: llama-cpp-python streams one token per chunk.
    assert len(deltas) == reference["usage"]["completion_tokens"]
    # It sends no usage in streams, so meshd counted and says so.
    assert isinstance(finished, UpstreamFinished) and finished.usage_counted
    assert finished.completion_tokens == reference["usage"]["completion_tokens"]
    assert finished.prompt_tokens == 0
    assert finished.finish_reason == "length" and finished.ttft_s is not None
    assert backend.load().in_flight == 0 and backend.load().queued == 0


async def test_non_stream_mode_keeps_upstream_usage(server: LlamaServer) -> None:
    b = UpstreamBackend(make_config(server.base_url, stream=False))
    await warm(server, "Say hello.")
    try:
        deltas, finished = await collect(b.generate(chat("Say hello.")))
    finally:
        await b.close()
    reference = await direct(server.base_url, "/chat/completions", {
        "model": "smol", "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16, "temperature": 0.0, "top_p": 0.95, "seed": 7,
    })
    assert "".join(d.text for d in deltas) == reference["choices"][0]["message"]["content"]
    assert isinstance(finished, UpstreamFinished) and not finished.usage_counted
    assert (finished.prompt_tokens, finished.completion_tokens) == (
        reference["usage"]["prompt_tokens"], reference["usage"]["completion_tokens"])


async def test_text_completion_goes_to_completions(server: LlamaServer, backend: UpstreamBackend) -> None:
    request = GenerationRequest(model="smol", params=GREEDY, prompt="The capital of France is")
    deltas, finished = await collect(backend.generate(request))
    reference = await direct(server.base_url, "/completions", {
        "model": "smol", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0.0,
        "top_p": 0.95, "seed": 7,
    })
    assert "".join(d.text for d in deltas) == reference["choices"][0]["text"]
    assert finished.completion_tokens == reference["usage"]["completion_tokens"]


async def test_embeddings_are_pooled_like_in_process_llama(backend: UpstreamBackend, model_path: Path) -> None:
    import llama_cpp

    inputs = ("hello world", "the cat sat on the mat")
    result = await backend.embed(EmbeddingRequest(model="smol", inputs=inputs))
    assert len(result.vectors) == 2 and result.prompt_tokens > 0
    local = llama_cpp.Llama(str(model_path), n_ctx=512, embedding=True, verbose=False,
                            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    try:
        for text, vector in zip(inputs, result.vectors):
            expected = local.embed(text)
            norm = math.sqrt(sum(v * v for v in expected))
            cosine = sum(a * b / norm for a, b in zip(expected, vector))
            assert math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-6)
            assert cosine > 0.9999, (text, cosine)
    finally:
        local.close()


async def test_descriptor_from_a_bare_listing_marks_unknowns(backend: UpstreamBackend) -> None:
    (descriptor,) = await backend.descriptors()
    assert descriptor.id == "smol" and descriptor.upstream_model == "smol"
    # llama-cpp-python's /v1/models says nothing about the model: nothing is invented.
    assert (descriptor.architecture, descriptor.parameter_count, descriptor.quantization,
            descriptor.file_sha256, descriptor.context_length) == (None, None, None, None, None)


async def test_protocol_capabilities_health_and_tokens_per_s(backend: UpstreamBackend, server: LlamaServer) -> None:
    from meshd.backends.base import Backend

    assert isinstance(backend, Backend)
    caps = backend.capabilities()
    assert {"chat", "completion", "embeddings", "streaming", "json_object"} <= set(caps.names())
    assert not caps.resume  # the OpenAI API cannot continue from given tokens
    assert backend.health().status == "ok" and backend.health().reason is None
    before = backend.load().tokens_per_s
    _, finished = await collect(backend.generate(chat("Count to five")))
    assert finished.completion_tokens > 0
    assert backend.load().tokens_per_s == pytest.approx(before + finished.completion_tokens / 60.0)
    down = UpstreamBackend(make_config(f"http://127.0.0.1:{free_port()}/v1", refresh_s=0))
    await down.start()
    try:
        health = down.health()
        assert health.status == "down" and "cannot connect" in (health.reason or "")
    finally:
        await down.close()


async def test_unknown_upstream_model_is_a_mapped_error(server: LlamaServer) -> None:
    b = UpstreamBackend(make_config(server.base_url, model_map={"smol": "smol", "ghost": "no-such-model"}))
    await b.start()
    try:
        states = {m.id: m for m in b.models()}
        assert states["smol"].state == "ready"
        assert states["ghost"].state == "failed" and "no-such-model" in (states["ghost"].error or "")
        with pytest.raises(ModelNotFound, match="does not list model 'no-such-model'.*smol"):
            b.generate(chat("hi", model="ghost"))
        with pytest.raises(ModelNotFound):
            await b.embed(EmbeddingRequest(model="ghost", inputs=("x",)))
        with pytest.raises(ModelNotFound):
            b.generate(chat("hi", model="not-configured"))
    finally:
        await b.close()


async def test_upstream_http_errors_keep_their_status(server: LlamaServer, backend: UpstreamBackend) -> None:
    too_long = GenerationRequest(model="smol", params=GREEDY, prompt="hello " * 700)
    whole = UpstreamBackend(make_config(server.base_url, stream=False))
    try:
        with pytest.raises(ContextLengthExceeded, match="HTTP 400.*maximum context length"):
            await collect(whole.generate(too_long))
    finally:
        await whole.close()
    # Streaming, llama-cpp-python answers 200 and ends the stream empty: an error all the same.
    with pytest.raises(UpstreamError, match="ended the stream without finishing"):
        await collect(backend.generate(too_long))

    wrong_path = UpstreamBackend(make_config(server.base_url.replace("/v1", "/nope/v1")))
    await wrong_path.start()
    try:
        assert wrong_path.models()[0].state == "failed"
        with pytest.raises(UpstreamError, match="HTTP 404") as info:
            await collect(wrong_path.generate(chat("hi")))
        assert info.value.upstream_status == 404 and info.value.status == 502
    finally:
        await wrong_path.close()


async def test_connection_refused_is_typed() -> None:
    b = UpstreamBackend(make_config(f"http://127.0.0.1:{free_port()}/v1"))
    await b.start()
    try:
        assert b.models()[0].state == "failed"
        with pytest.raises(UpstreamUnavailable, match="cannot connect") as info:
            await collect(b.generate(chat("hi")))
        assert info.value.status == 503 and info.value.upstream_status is None
        with pytest.raises(UpstreamUnavailable):
            await b.embed(EmbeddingRequest(model="smol", inputs=("x",)))
        assert b.load().in_flight == 0 and b.load().queued == 0
    finally:
        await b.close()


async def test_closing_the_stream_stops_the_upstream(server: LlamaServer) -> None:
    # repeat_penalty < 1 makes SmolLM repeat itself instead of stopping: a long generation.
    long = GenerationRequest(model="smol", prompt="a a a a a a a a a a a a",
                             params=SamplingParams(max_tokens=450, temperature=0.0, repeat_penalty=0.5))
    b = UpstreamBackend(make_config(server.base_url))
    try:
        stream = b.generate(long)
        for _ in range(10):  # past the prompt: the rate below is decoding only
            assert isinstance(await anext(stream), TextGenerated)
        started = time.perf_counter()
        for _ in range(20):
            assert isinstance(await anext(stream), TextGenerated)
        rate = 20 / (time.perf_counter() - started)  # tokens/s on this machine, right now
        await stream.aclose()
        assert b.load().in_flight == 0
        # The server runs one request at a time: had it kept generating the other
        # 420 tokens, this short request would wait for them.
        asked = time.perf_counter()
        deltas, finished = await collect(b.generate(chat("hi", SamplingParams(max_tokens=4, temperature=0.0))))
        waited = time.perf_counter() - asked
        assert finished.completion_tokens >= 1
        assert waited < 0.5 * (420 / rate), (waited, rate)
        deadline = time.monotonic() + 5
        while "Disconnected from client" not in server.log() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "Disconnected from client" in server.log()
    finally:
        await b.close()


def test_resume_is_refused_at_admission() -> None:
    b = UpstreamBackend(make_config("http://127.0.0.1:9/v1"))
    resumed = GenerationRequest(model="smol", params=GREEDY, prompt="x", resume_token_ids=(1, 2), resume_text="ab")
    with pytest.raises(InvalidRequest) as info:
        b.generate(resumed)
    assert info.value.code == "resume_unsupported" and b.load().queued == 0


async def test_admission_happens_at_call_time(server: LlamaServer) -> None:
    b = UpstreamBackend(make_config(server.base_url, max_in_flight=1, max_queue=0))
    try:
        first = b.generate(chat("hi"))
        assert b.load().queued == 1
        with pytest.raises(QueueFull):
            b.generate(chat("hi"))  # refused before anything is sent
        await first.aclose()  # closed before it ever ran: the ticket is still returned
        assert (b.load().in_flight, b.load().queued) == (0, 0)
        deltas, finished = await collect(b.generate(chat("hi", SamplingParams(max_tokens=2, temperature=0.0))))
        assert finished.completion_tokens >= 1
    finally:
        await b.close()


async def test_meshd_daemon_as_upstream_streams_usage(shared_daemon) -> None:
    status, listing = shared_daemon.get("/v1/models")
    model = listing["data"][0]["id"]
    b = UpstreamBackend(UpstreamConfig(name="meshd", base_url=shared_daemon.base_url + "/v1",
                                       model_map={"peer": model}, dialect="llama.cpp", refresh_s=0))
    await b.start()
    try:
        deltas, finished = await collect(b.generate(chat("Count to five.", model="peer")))
    finally:
        await b.close()
    reference = await direct(shared_daemon.base_url + "/v1", "/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "Count to five."}],
        "max_tokens": 16, "temperature": 0.0, "seed": 7,
    })
    assert "".join(d.text for d in deltas) == reference["choices"][0]["message"]["content"]
    assert isinstance(finished, UpstreamFinished) and not finished.usage_counted
    assert (finished.prompt_tokens, finished.completion_tokens) == (
        reference["usage"]["prompt_tokens"], reference["usage"]["completion_tokens"])


# --- a deliberately slow fake upstream: the tests are about timeouts ------------------


@pytest.fixture
async def slow_fake_upstream() -> AsyncIterator[str]:
    """FAKE upstream: answers /v1/models, then stalls on completions (before or mid-stream)."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "smol", "object": "model"}]})

    async def stall_before_headers(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({})

    async def stall_mid_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await asyncio.sleep(30)
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", stall_mid_stream)
    app.router.add_post("/v1/completions", stall_before_headers)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


async def test_slow_upstream_times_out_before_headers(slow_fake_upstream: str) -> None:
    b = UpstreamBackend(make_config(slow_fake_upstream, timeout_s=0.5))
    await b.start()
    try:
        started = time.perf_counter()
        with pytest.raises(UpstreamTimeout, match="sent nothing for 0.5s") as info:
            await collect(b.generate(GenerationRequest(model="smol", params=GREEDY, prompt="x")))
        assert 0.4 < time.perf_counter() - started < 5
        assert info.value.status == 504
        assert b.models()[0].state == "failed"  # the router sees it unhealthy until it recovers
    finally:
        await b.close()


async def test_slow_upstream_times_out_mid_stream(slow_fake_upstream: str) -> None:
    b = UpstreamBackend(make_config(slow_fake_upstream, timeout_s=0.5))
    try:
        stream = b.generate(chat("hi"))
        first = await anext(stream)
        assert first == TextGenerated("Hel")
        with pytest.raises(UpstreamTimeout):
            await anext(stream)
        assert b.load().in_flight == 0
    finally:
        await b.close()


# --- the wire format, without sockets ------------------------------------------------


def test_request_body_sends_extensions_only_when_moved() -> None:
    plain = request_body(chat("hi"), "m", "llama.cpp", stream=True, include_usage=True)
    assert plain["stream_options"] == {"include_usage": True}
    assert plain["messages"] == [{"role": "user", "content": "hi"}]
    assert not {"top_k", "min_p", "repeat_penalty", "repetition_penalty"} & set(plain)
    moved = SamplingParams(top_k=5, min_p=0.1, repeat_penalty=1.2)
    llama = request_body(chat("hi", moved), "m", "llama.cpp", stream=False, include_usage=True)
    assert (llama["top_k"], llama["min_p"], llama["repeat_penalty"]) == (5, 0.1, 1.2)
    assert "stream_options" not in llama
    vllm = request_body(chat("hi", moved), "m", "vllm", stream=True, include_usage=False)
    assert vllm["repetition_penalty"] == 1.2 and "repeat_penalty" not in vllm and "stream_options" not in vllm
    with pytest.raises(UnsupportedParameter) as info:
        request_body(chat("hi", SamplingParams(top_k=5)), "m", "openai", stream=True, include_usage=True)
    assert info.value.param == "top_k"


_payloads = st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                             min_size=1), max_size=8)


@given(_payloads, st.booleans(), st.booleans())
@settings(max_examples=200, deadline=None)
def test_sse_decoder_recovers_every_payload(payloads: list[str], crlf: bool, pings: bool) -> None:
    end = "\r\n" if crlf else "\n"
    wire_text = "".join((f": ping{end}" if pings else "") + f"data: {p}{end}{end}" for p in payloads)
    decoder = SseDecoder()
    lines = wire_text.encode().splitlines(keepends=True)
    got = [d for d in (decoder.feed_line(line) for line in lines) if d is not None]
    assert got == payloads


@pytest.mark.parametrize(("status", "body", "expected", "code"), [
    (404, {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "code": 404}},
     ModelNotFound, "model_not_found"),  # vLLM
    (404, {"error": "model 'x' not found"}, ModelNotFound, "model_not_found"),  # Ollama
    (404, {"detail": "Not Found"}, UpstreamError, "upstream_error"),  # a wrong path
    (400, {"error": {"message": "This model's maximum context length is 512 tokens", "code": None}},
     ContextLengthExceeded, "context_length_exceeded"),
    (422, {"detail": [{"loc": ["body", "temperature"], "msg": "bad"}]}, InvalidRequest, "invalid_request"),
    (401, {"error": {"message": "Invalid API key"}}, UpstreamError, "upstream_auth_failed"),
    (429, {"error": {"message": "slow down"}}, QueueFull, "upstream_busy"),
    (503, {"error": {"message": "loading"}}, UpstreamUnavailable, "upstream_unavailable"),
    (504, {}, UpstreamTimeout, "upstream_timeout"),
    (500, {}, UpstreamError, "upstream_error"),
])
def test_error_mapping(status: int, body: dict, expected: type, code: str) -> None:
    error = error_from_response("gpu-box", status, json.dumps(body).encode(), {"Retry-After": "3"})
    assert type(error) is expected and error.code == code
    assert f"upstream 'gpu-box' returned HTTP {status}" in error.message
    if isinstance(error, UpstreamError):
        assert error.upstream_status == status
    if status == 429:
        assert error.retry_after == 3


@given(st.lists(st.lists(st.floats(-100, 100), min_size=4, max_size=4), min_size=1, max_size=6))
@settings(max_examples=200, deadline=None)
def test_pool_embedding_is_the_unit_mean(rows: list[list[float]]) -> None:
    mean = [sum(r[i] for r in rows) / len(rows) for i in range(4)]
    norm = math.sqrt(sum(v * v for v in mean))
    vector, tokens = pool_embedding(rows)
    assert tokens == len(rows)
    if norm > 1e-6:
        assert all(math.isclose(a, b / norm, abs_tol=1e-9) for a, b in zip(vector, mean))
    single, none = pool_embedding(mean)
    assert none == 0 and single == pytest.approx(vector, abs=1e-9)


def test_parse_upstream_table() -> None:
    listed = parse_upstream_table("upstreams[0]", {"name": "ollama", "base_url": "http://127.0.0.1:11434/v1",
                                                   "models": ["llama3.1:8b"], "dialect": "ollama"})
    assert listed.model_map == {"llama3.1:8b": "llama3.1:8b"} and listed.dialect == "ollama"
    mapped = parse_upstream_table("upstreams[1]", {"name": "gpu", "base_url": "https://gpu:8000/v1",
                                                   "models": {"qwen": "Qwen/Qwen2.5-7B-Instruct"},
                                                   "api_key_env": "GPU_KEY", "timeout_s": 60},
                                  env={"GPU_KEY": "sk-1"})
    assert mapped.model_map == {"qwen": "Qwen/Qwen2.5-7B-Instruct"} and mapped.api_key == "sk-1"
    assert mapped.timeout_s == 60
    for bad, key in [({"name": "x", "base_url": "http://h/v1", "models": ["m"], "colour": "red"}, "colour"),
                     ({"name": "x", "base_url": "ftp://h", "models": ["m"]}, "base_url"),
                     ({"name": "x", "base_url": "http://h/v1", "models": []}, "models"),
                     ({"name": "x", "base_url": "http://h/v1", "models": ["m"], "dialect": "klingon"}, "dialect"),
                     ({"name": "x", "base_url": "http://h/v1", "models": ["m"], "stream": "yes"}, "stream"),
                     ({"name": "x", "base_url": "http://h/v1", "models": ["m"], "api_key_env": "NOPE"}, "api_key_env")]:
        with pytest.raises(ConfigError) as info:
            parse_upstream_table("upstreams[2]", bad, env={})
        assert key in info.value.key

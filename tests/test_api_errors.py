"""Every error case of the HTTP API, in OpenAI's error shape, over plain HTTP."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


def call(daemon, method: str, path: str, body: bytes | dict | None = None,
         headers: dict | None = None) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, json.loads(raw), dict(resp.getheaders())


def assert_openai_error(body: dict, code: str, param: str | None = None) -> None:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["code"], str) and error["code"] == code
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param


def test_malformed_json_is_400(shared_daemon):
    status, body, _ = call(shared_daemon, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400
    assert_openai_error(body, "invalid_json")


def test_non_object_json_is_400(shared_daemon):
    status, body, _ = call(shared_daemon, "POST", "/v1/chat/completions", b"[1, 2]")
    assert status == 400
    assert_openai_error(body, "invalid_json")


@pytest.mark.parametrize(
    "payload, param",
    [
        ({"model": "smollm2"}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "smollm2", "messages": []}, "messages"),
        ({"model": "smollm2", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": "smollm2", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature"),
        ({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}, "stop"),
        ({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
        ({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
          "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
          "response_format": {"type": "xml"}}, "response_format"),
        ({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, "frobnicate"),
    ],
)
def test_invalid_fields_are_400_with_param(shared_daemon, payload, param):
    status, body, _ = call(shared_daemon, "POST", "/v1/chat/completions", payload)
    assert status == 400, body
    assert body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
    ],
)
def test_unsupported_parameters_are_refused(shared_daemon, extra, param):
    payload = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], **extra}
    status, body, _ = call(shared_daemon, "POST", "/v1/chat/completions", payload)
    assert status == 400
    assert_openai_error(body, "unsupported_parameter", param)


def test_default_valued_parameters_are_accepted(shared_daemon):
    payload = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "n": 1,
               "logprobs": False, "user": "someone", "max_tokens": 1}
    status, body, _ = call(shared_daemon, "POST", "/v1/chat/completions", payload)
    assert status == 200, body


def test_completion_errors(shared_daemon):
    status, body, _ = call(shared_daemon, "POST", "/v1/completions", {"model": "smollm2", "prompt": 42})
    assert status == 400
    assert_openai_error(body, "invalid_request", "prompt")
    status, body, _ = call(shared_daemon, "POST", "/v1/completions", {"model": "smollm2", "prompt": "x", "echo": True})
    assert status == 400
    assert_openai_error(body, "unsupported_parameter", "echo")


def test_embedding_errors(shared_daemon):
    status, body, _ = call(shared_daemon, "POST", "/v1/embeddings", {"model": "smollm2", "input": []})
    assert status == 400
    assert_openai_error(body, "invalid_request", "input")
    status, body, _ = call(shared_daemon, "POST", "/v1/embeddings",
                           {"model": "smollm2", "input": "x", "encoding_format": "hex"})
    assert status == 400
    assert_openai_error(body, "invalid_request", "encoding_format")
    status, body, _ = call(shared_daemon, "POST", "/v1/embeddings", {"model": "nope", "input": "x"})
    assert status == 404
    assert_openai_error(body, "model_not_found", "model")


def test_body_over_limit_is_413(shared_daemon):
    # The shared daemon runs with MESHD_API_MAX_BODY_BYTES=65536.
    payload = {"model": "smollm2", "messages": [{"role": "user", "content": "x" * 70000}]}
    status, body, _ = call(shared_daemon, "POST", "/v1/chat/completions", payload)
    assert status == 413
    assert_openai_error(body, "request_too_large")


def test_prompt_over_context_is_400(shared_daemon):
    # 4096-token context; each " apple" is one token. Stays under the 64 KiB body limit.
    prompt = " apple" * 6000
    status, body, _ = call(shared_daemon, "POST", "/v1/completions", {"model": "smollm2", "prompt": prompt})
    assert status == 400
    assert_openai_error(body, "context_length_exceeded", "prompt")
    status, body, _ = call(shared_daemon, "POST", "/v1/chat/completions",
                           {"model": "smollm2", "messages": [{"role": "user", "content": prompt}],
                            "stream": True})
    assert status == 400  # detected before the stream starts, so the status still says so
    assert_openai_error(body, "context_length_exceeded", "messages")


def test_unknown_route_and_wrong_method(shared_daemon):
    status, body, _ = call(shared_daemon, "GET", "/v1/nothing-here")
    assert status == 404
    assert_openai_error(body, "not_found")
    status, body, _ = call(shared_daemon, "GET", "/v1/chat/completions")
    assert status == 405
    assert_openai_error(body, "method_not_allowed")


def test_health_and_metrics(shared_daemon):
    status, body, _ = call(shared_daemon, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    assert list(body["models"].values()) == ["ready"]
    call(shared_daemon, "POST", "/v1/chat/completions",
         {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    conn = http.client.HTTPConnection("127.0.0.1", shared_daemon.port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    assert 'meshd_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'meshd_http_requests_total{route="/v1/chat/completions",status="400"}' in text
    assert "meshd_time_to_first_token_seconds_bucket" in text
    assert "meshd_request_duration_seconds_bucket" in text
    assert 'meshd_tokens_total{kind="completion"' in text
    assert "meshd_requests_in_flight" in text
    assert "meshd_backend_queued_requests" in text


def metric(daemon, name: str) -> float:
    status, text = daemon.get("/metrics")
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


def test_embedding_queue_full_is_429_with_retry_after(daemon_factory):
    # One embedding running and none waiting (--max-queue 0): the next is refused at once,
    # as a generation would be, instead of waiting in an unbounded executor queue.
    daemon = daemon_factory("--max-queue", "0")
    # Seconds of work (the embedding context also loads on first use): far longer than the
    # few milliseconds the refused request takes.
    body = json.dumps({"model": "smollm2", "input": [f"sentence number {i} about bicycles and rivers" * 4
                                                     for i in range(8)]}).encode()
    busy = socket.create_connection(("127.0.0.1", daemon.port), timeout=120)
    try:
        busy.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while metric(daemon, "meshd_backend_running_requests") < 1:
            assert time.monotonic() < deadline, "the long embedding never started"
            time.sleep(0.02)
        status, reply, headers = call(daemon, "POST", "/v1/embeddings", {"model": "smollm2", "input": "x"})
        still_running = metric(daemon, "meshd_backend_running_requests")
    finally:
        busy.close()
    assert still_running == 1, "the long embedding ended too soon to prove anything; make it longer"
    assert status == 429, reply
    assert_openai_error(reply, "queue_full")
    assert int(headers["Retry-After"]) >= 1
    # The abandoned embedding frees its turn once its thread finishes; then one more fits.
    deadline = time.monotonic() + 300
    while metric(daemon, "meshd_backend_running_requests") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    status, reply, _ = call(daemon, "POST", "/v1/embeddings", {"model": "smollm2", "input": "x"})
    assert status == 200, reply


class _WrongShapeUpstream(BaseHTTPRequestHandler):
    """A real OpenAI-compatible server that lists its model, then answers every
    request with valid JSON of the wrong shape (a list, not an object)."""

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "wrong-shape", "object": "model"}]})
        else:
            self._send(404, {"error": {"message": "no such route"}})

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(200, ["not", "an", "object"])

    def _send(self, status: int, payload: object) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def wrong_shape_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _WrongShapeUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_an_upstream_answer_of_the_wrong_shape_is_a_typed_502(daemon_factory, wrong_shape_upstream, tmp_path):
    config = tmp_path / "meshd.toml"
    config.write_text(
        "[[upstreams]]\n"
        'name = "wrong-shape"\n'
        f'base_url = "http://127.0.0.1:{wrong_shape_upstream}/v1"\n'
        "stream = false\n"
        'models = ["wrong-shape"]\n'
    )
    daemon = daemon_factory("--no-default-model", "--config", str(config))
    for path, payload in (
        ("/v1/embeddings", {"model": "wrong-shape", "input": "hello"}),
        ("/v1/chat/completions", {"model": "wrong-shape", "messages": [{"role": "user", "content": "hi"}]}),
    ):
        status, body, _ = call(daemon, "POST", path, payload)
        assert status == 502, (path, body)
        assert_openai_error(body, "upstream_error")
        assert "not an object" in body["error"]["message"]
    assert "unhandled error" not in daemon.log()
    status, health, _ = call(daemon, "GET", "/health")
    assert status == 200 and health["status"] == "ok"


class ExplodingDispatcher:
    """FAKE routing layer for one test: it fails with a plain bug-like exception, so the request
    reaches the API's outermost boundary. The test is about that boundary, not about a model."""

    class router:  # noqa: N801 - the attribute the API reads
        @staticmethod
        def data_class(header: str | None) -> str:
            return "internal"

    def generate(self, request, data_class, ticket=None):
        raise AttributeError("'list' object has no attribute 'get' (a bug, for this test)")


async def test_internal_error_is_500_in_openai_shape_without_traceback(caplog):
    import aiohttp

    from meshd.api import ApiMetrics, ApiServer, NodeFacts
    from meshd.backends.base import BackendLoad
    from meshd.catalog import ModelCatalog
    from meshd.config import ApiConfig, ListenAddress

    api = ApiServer(ApiConfig(listen=ListenAddress("127.0.0.1", 0)), ModelCatalog([]),
                    ApiMetrics(lambda: BackendLoad(0, 0)), NodeFacts("node", 0), 1.0, ExplodingDispatcher())
    await api.start()
    try:
        host, port = api.bound
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://{host}:{port}/v1/chat/completions",
                                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}) as resp:
                status, body, content_type = resp.status, await resp.json(), resp.headers["Content-Type"]
    finally:
        await api.stop()
    assert status == 500 and content_type.startswith("application/json")
    assert_openai_error(body, "internal_error")
    assert body["error"]["type"] == "server_error" and body["error"]["message"] == "Internal server error"
    assert "Traceback" not in json.dumps(body) and "AttributeError" not in json.dumps(body)
    assert any(r.exc_info and "unhandled error" in r.getMessage() for r in caplog.records)  # the operator's copy

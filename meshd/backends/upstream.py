"""An OpenAI-compatible upstream server as a backend: vLLM, Ollama, LM Studio, llama-server.

Requests are mapped to the upstream's /v1/chat/completions or /v1/completions
(``openai_wire`` decides the bodies and meanings), streamed back chunk by
chunk, and closed with the upstream's usage when it gives one. Transport
failures are typed (``UpstreamUnavailable``, ``UpstreamTimeout``) so a router
can fail over; closing the returned iterator closes the HTTP response, which
is how the upstream learns to stop generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..config import ConfigError
from ..errors import (
    InvalidRequest,
    MeshdError,
    ModelNotFound,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..modelid import ModelDescriptor, describe_upstream
from . import openai_wire as wire
from .admission import Admission, AdmittedStream, MeteredStream, Ticket, TokenRate
from .base import (
    BackendCapabilities,
    BackendHealth,
    BackendLoad,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    ModelInfo,
    ModelState,
    TextGenerated,
    health_of,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream server and the models meshd serves through it."""

    name: str
    base_url: str  # up to and including /v1, e.g. http://127.0.0.1:11434/v1
    model_map: Mapping[str, str]  # local model id -> the upstream's model name
    api_key: str | None = None
    dialect: str = "openai"  # which sampling extensions it accepts: openai, llama.cpp, vllm, ollama
    timeout_s: float = 120.0  # longest wait for the response headers or for the next chunk
    connect_timeout_s: float = 5.0
    stream: bool = True  # stream from the upstream (False: one whole response per request)
    stream_usage: bool = True  # ask for stream_options.include_usage
    embedding_batch: int = 0  # most inputs per /v1/embeddings call; 0: all in one
    check_models: bool = True  # refuse a model the upstream's /v1/models does not list
    refresh_s: float = 30.0  # re-read /v1/models this often; 0: only at start
    max_in_flight: int = 32  # concurrent requests sent upstream
    max_queue: int = 64  # requests waiting for one of those slots before QueueFull
    retry_after_s: int = 2

    def __post_init__(self) -> None:
        key = f"upstreams.{self.name}"
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.base_url", f"expected an http(s) URL, got {self.base_url!r}")
        if self.dialect not in wire.DIALECTS:
            raise ConfigError(f"{key}.dialect", f"expected one of {', '.join(wire.DIALECTS)}; got {self.dialect!r}")
        if not self.model_map:
            raise ConfigError(f"{key}.models", "lists no models")
        if self.max_in_flight < 1 or self.max_queue < 0 or self.embedding_batch < 0:
            raise ConfigError(key, "max_in_flight must be >= 1, max_queue and embedding_batch >= 0")
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ConfigError(key, "timeouts must be positive")


_TABLE_KEYS = {
    "name", "base_url", "models", "api_key", "dialect", "timeout_s", "connect_timeout_s", "stream",
    "stream_usage", "embedding_batch", "check_models", "refresh_s", "max_in_flight", "max_queue",
}


def parse_upstream_table(key: str, raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> UpstreamConfig:
    """Build an ``UpstreamConfig`` from one ``[[upstreams]]`` TOML table.

    ``models`` is a list (same name on both sides) or a table {local id = upstream name}.
    ``api_key_env`` names an environment variable, looked up in ``env``, so keys
    need not sit in the config file.
    """
    unknown = set(raw) - _TABLE_KEYS - {"api_key_env"}
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown setting")
    for required in ("name", "base_url", "models"):
        if required not in raw:
            raise ConfigError(f"{key}.{required}", "is required")
    models = raw["models"]
    if isinstance(models, list) and all(isinstance(m, str) and m for m in models):
        model_map = {m: m for m in models}
    elif isinstance(models, Mapping) and all(isinstance(k, str) and isinstance(v, str) and v for k, v in models.items()):
        model_map = dict(models)
    else:
        raise ConfigError(f"{key}.models", "expected a list of names or a table {local id = upstream name}")
    values = {k: v for k, v in raw.items() if k in _TABLE_KEYS and k != "models"}
    if "api_key_env" in raw:
        var = raw["api_key_env"]
        if not isinstance(var, str) or env is None or var not in env:
            raise ConfigError(f"{key}.api_key_env", f"environment variable {var!r} is not set")
        values["api_key"] = env[var]
    expected = {
        "name": str, "base_url": str, "api_key": str, "dialect": str, "stream": bool, "stream_usage": bool,
        "check_models": bool, "embedding_batch": int, "max_in_flight": int, "max_queue": int,
        "timeout_s": (int, float), "connect_timeout_s": (int, float), "refresh_s": (int, float),
    }
    for name, value in values.items():
        kind = expected[name]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise ConfigError(f"{key}.{name}", f"unexpected value {value!r}")
    return UpstreamConfig(model_map=model_map, **values)


@dataclass(frozen=True)
class UpstreamFinished(GenerationFinished):
    """``GenerationFinished`` that says where its usage came from.

    ``usage_counted`` is True when the upstream sent no usage: the completion
    count is then the number of text chunks received (one token each on
    llama.cpp, vLLM and Ollama streams) and the prompt count is 0 (unknown).
    """

    usage_counted: bool = False


@dataclass
class _Model:
    local_id: str
    upstream_model: str
    state: ModelState = "loading"
    error: str | None = None
    listed: bool | None = None  # in the upstream's /v1/models at the last look; None: not looked yet
    entry: Mapping[str, Any] | None = None
    ollama: Mapping[str, Any] | None = None


class UpstreamBackend:
    """Serves the configured models by forwarding to one OpenAI-compatible server."""

    def __init__(self, config: UpstreamConfig, kind: str = "upstream") -> None:
        self.config = config
        self.kind = kind
        self.name = f"{kind}:{config.name}"
        self._base = config.base_url.rstrip("/")
        self._models = {local: _Model(local, remote) for local, remote in config.model_map.items()}
        self._session: aiohttp.ClientSession | None = None
        self._admission = Admission(config.max_in_flight, config.max_queue, config.retry_after_s)
        self._embed_slots = asyncio.Semaphore(config.max_in_flight)
        self._refresher: asyncio.Task[None] | None = None
        self._rate = TokenRate()
        self.started = False

    # --- lifecycle -------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self.config.connect_timeout_s, sock_read=self.config.timeout_s
            )
            self._session = aiohttp.ClientSession(headers=headers, timeout=timeout)
        return self._session

    async def start(self) -> None:
        """Look at the upstream's model list; an unreachable upstream is noted, not fatal."""
        self.started = True
        await self.refresh()
        if self.config.refresh_s > 0 and self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop(), name=f"refresh-{self.name}")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_s)
            await self.refresh()

    async def refresh(self) -> None:
        """Re-read ``/v1/models`` (and Ollama's ``/api/tags``) and update model states."""
        try:
            listing = wire.models_listing(await self._get_json(f"{self._base}/models"))
        except MeshdError as exc:
            for model in self._models.values():
                model.state, model.error = "failed", exc.message
            log.warning("upstream unavailable", extra={"fields": {"upstream": self.config.name, "error": exc.message}})
            return
        tags: dict[str, Mapping[str, Any]] = {}
        if self.config.dialect == "ollama":
            try:
                tags = wire.ollama_tags(await self._get_json(f"{self._base.removesuffix('/v1')}/api/tags"))
            except MeshdError as exc:
                log.info("ollama /api/tags unreadable", extra={"fields": {"upstream": self.config.name, "error": exc.message}})
        for model in self._models.values():
            model.entry = listing.get(model.upstream_model)
            model.ollama = tags.get(model.upstream_model)
            model.listed = model.entry is not None
            if model.listed or not self.config.check_models:
                model.state, model.error = "ready", None
            else:
                model.state = "failed"
                model.error = (
                    f"upstream '{self.config.name}' does not list model '{model.upstream_model}' "
                    f"(it lists: {', '.join(sorted(listing)) or 'nothing'})"
                )

    async def _get_json(self, url: str) -> Any:
        try:
            async with self._client().get(url) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise wire.error_from_response(self.config.name, resp.status, body, resp.headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc) from exc
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UpstreamError(f"upstream '{self.config.name}' sent invalid JSON from {url}", upstream_status=200) from exc

    def _transport_error(self, exc: BaseException) -> UpstreamError:
        name, cfg = self.config.name, self.config
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return UpstreamUnavailable(f"upstream '{name}' did not accept a connection within {cfg.connect_timeout_s:g}s")
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout(f"upstream '{name}' sent nothing for {cfg.timeout_s:g}s")
        if isinstance(exc, aiohttp.ClientConnectorError):
            return UpstreamUnavailable(f"cannot connect to upstream '{name}' at {self._base}: {exc.os_error.strerror or exc}")
        if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError)):
            return UpstreamUnavailable(f"upstream '{name}' dropped the connection: {exc}")
        return UpstreamError(f"upstream '{name}' request failed: {exc}")

    # --- introspection ---------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        infos = []
        for model in self._models.values():
            entry = model.entry or {}
            context = entry.get("max_model_len")
            infos.append(
                ModelInfo(
                    id=model.local_id,
                    owned_by=self.name,
                    context_length=context if isinstance(context, int) else None,
                    state=model.state,
                    error=model.error,
                    details={"upstream": self.config.name, "base_url": self._base, "upstream_model": model.upstream_model},
                )
            )
        return infos

    def capabilities(self) -> BackendCapabilities:
        # response_format is passed through: the upstream enforces it (vLLM,
        # llama-server, Ollama and LM Studio do). The OpenAI API cannot resume.
        return BackendCapabilities(streaming=self.config.stream, json_object=True, json_schema=True, resume=False)

    def health(self) -> BackendHealth:
        return health_of(self.models())

    async def descriptors(self) -> list[ModelDescriptor]:
        """From what the upstream said at its last ``/v1/models`` look (no I/O here)."""
        return [
            describe_upstream(m.entry, model_id=m.local_id, upstream_model=m.upstream_model, backend=self.kind, ollama=m.ollama)
            for m in self._models.values()
        ]

    def load(self) -> BackendLoad:
        return BackendLoad(in_flight=self._admission.in_flight, queued=self._admission.queued,
                           tokens_per_s=self._rate.per_second())

    def _model(self, local_id: str) -> _Model:
        model = self._models.get(local_id)
        if model is None:
            raise ModelNotFound(f"The model '{local_id}' does not exist", param="model")
        if self.config.check_models and model.listed is False:
            raise ModelNotFound(model.error or f"upstream does not serve '{model.upstream_model}'", param="model")
        return model

    def _note(self, model: _Model, error: MeshdError | None) -> None:
        """Request outcomes keep the health the router sees current between refreshes."""
        if isinstance(error, (UpstreamUnavailable, UpstreamTimeout)):
            model.state, model.error = "failed", error.message
        elif error is None and model.listed is not False:
            model.state, model.error = "ready", None

    # --- generation ------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        model = self._model(request.model)
        cfg = self.config
        if request.resume_token_ids or request.resume_text:
            # The OpenAI API has no way to continue from given output tokens.
            raise InvalidRequest(f"upstream '{cfg.name}' cannot resume a generation started elsewhere",
                                 code="resume_unsupported")
        # Parameters the upstream cannot take are refused here, before anything is sent.
        wire.request_body(request, model.upstream_model, cfg.dialect, stream=cfg.stream, include_usage=cfg.stream_usage)
        ticket = self._admission.admit(f"upstream '{cfg.name}'")
        stream = AdmittedStream(self._run(ticket, model, request, time.perf_counter()), ticket)
        return MeteredStream(stream, self._rate, chunk_is_token=True)

    async def _run(
        self, ticket: Ticket, model: _Model, request: GenerationRequest, admitted: float
    ) -> AsyncGenerator[GenerationEvent, None]:
        final: GenerationFinished | None = None
        async with self._admission.slot(ticket):
            try:
                async with contextlib.aclosing(self._exchange(model, request, admitted)) as events:
                    async for event in events:
                        if isinstance(event, GenerationFinished):
                            final = event
                            break
                        yield event
            except MeshdError as exc:
                self._note(model, exc)
                log.warning(
                    "upstream request failed",
                    extra={"fields": {"upstream": self.config.name, "model": model.local_id, "error": exc.message}},
                )
                raise
        # Done before the last event goes out, so load() is exact when the caller sees it.
        ticket.release()
        self._note(model, None)
        if final is not None:
            yield final

    async def _exchange(
        self, model: _Model, request: GenerationRequest, admitted: float
    ) -> AsyncGenerator[GenerationEvent, None]:
        cfg = self.config
        chat = request.messages is not None
        body = wire.request_body(request, model.upstream_model, cfg.dialect, stream=cfg.stream, include_usage=cfg.stream_usage)
        url = f"{self._base}/{'chat/completions' if chat else 'completions'}"
        # No X-Request-Id: llama-cpp-python's server (starlette-context) rejects
        # any value that is not a bare UUID with a 400 and no details.
        headers: dict[str, str] = {}
        try:
            resp = await self._client().post(url, json=body, headers=headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc) from exc
        complete = False
        final: GenerationFinished | None = None
        try:
            if resp.status != 200:
                raise wire.error_from_response(cfg.name, resp.status, await resp.read(), resp.headers)
            if cfg.stream:
                async with contextlib.aclosing(self._read_stream(resp, chat, admitted)) as events:
                    async for event in events:
                        if isinstance(event, GenerationFinished):
                            final = event
                            break
                        yield event
            else:
                payload = json.loads(await resp.read())
                facts = wire.parse_choice_payload(payload, chat, cfg.name)
                ttft = time.perf_counter() - admitted
                if facts.text:
                    yield TextGenerated(facts.text)
                final = self._finished(facts.finish_reason, facts.usage, 1 if facts.text else 0, ttft)
            complete = True
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc) from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UpstreamError(f"upstream '{cfg.name}' sent invalid JSON: {exc}", upstream_status=resp.status) from exc
        finally:
            if complete:
                resp.release()
            else:
                # Cancelled or failed mid-way: drop the connection, so the upstream
                # sees the client go away and stops generating.
                resp.close()
        if final is not None:
            yield final  # after the response is released: nothing is left to clean up

    async def _read_stream(
        self, resp: aiohttp.ClientResponse, chat: bool, admitted: float
    ) -> AsyncGenerator[GenerationEvent, None]:
        decoder = wire.SseDecoder()
        reason: str | None = None
        usage: wire.Usage | None = None
        chunks = 0
        ttft: float | None = None
        done = False

        async def payloads() -> AsyncGenerator[str, None]:
            async for line in resp.content:
                data = decoder.feed_line(line)
                if data is not None:
                    yield data
            tail = decoder.flush()
            if tail is not None:
                yield tail

        async with contextlib.aclosing(payloads()) as stream:
            async for data in stream:
                if data.strip() == "[DONE]":
                    done = True
                    break
                facts = wire.parse_choice_payload(json.loads(data), chat, self.config.name)
                usage = facts.usage or usage
                reason = facts.finish_reason or reason
                if facts.text:
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - admitted
                    yield TextGenerated(facts.text)
        if not done and reason is None:
            # A cleanly ended stream without [DONE] or a finish reason is the
            # server giving up (llama-cpp-python does this on a too-long prompt);
            # a broken connection would have raised ClientPayloadError instead.
            raise UpstreamError(f"upstream '{self.config.name}' ended the stream without finishing "
                                f"({chunks} chunks, no finish_reason, no [DONE])", upstream_status=resp.status)
        yield self._finished(reason, usage, chunks, ttft)

    def _finished(self, reason: str | None, usage: wire.Usage | None, chunks: int, ttft: float | None) -> UpstreamFinished:
        if usage is not None:
            return UpstreamFinished(wire.finish_reason(reason), usage.prompt_tokens, usage.completion_tokens, ttft)
        return UpstreamFinished(wire.finish_reason(reason), 0, chunks, ttft, usage_counted=True)

    # --- embeddings ------------------------------------------------------------

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        model = self._model(request.model)
        vectors: list[list[float]] = []
        reported = counted = 0
        try:
            for batch in wire.batched(request.inputs, self.config.embedding_batch):
                payload = await self._post_json(f"{self._base}/embeddings", {"model": model.upstream_model, "input": list(batch)})
                got, prompt, tokens = wire.embedding_vectors(payload, len(batch))
                vectors.extend(got)
                reported += prompt
                counted += tokens
        except MeshdError as exc:
            self._note(model, exc)
            raise
        self._note(model, None)
        return EmbeddingResult(vectors=tuple(tuple(v) for v in vectors), prompt_tokens=reported or counted)

    async def _post_json(self, url: str, body: Mapping[str, Any]) -> Any:
        async with self._embed_slots:
            try:
                async with self._client().post(url, json=body) as resp:
                    raw = await resp.read()
                    if resp.status != 200:
                        raise wire.error_from_response(self.config.name, resp.status, raw, resp.headers)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise self._transport_error(exc) from exc
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UpstreamError(f"upstream '{self.config.name}' sent invalid JSON from {url}", upstream_status=200) from exc


__all__ = ["UpstreamBackend", "UpstreamConfig", "UpstreamFinished", "parse_upstream_table"]

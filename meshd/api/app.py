"""The OpenAI-compatible HTTP API (aiohttp), thin over the catalog and backends.

Handlers parse with ``requests``, shape with ``responses`` and never format
errors themselves: the middleware renders every ``MeshdError`` (and aiohttp's
own 404/405/413) in OpenAI's error shape, and counts it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..backends.base import GenerationEvent, GenerationFinished, GenerationRequest, TextGenerated
from ..catalog import ModelCatalog
from ..config import ApiConfig
from ..errors import (
    InvalidRequest,
    MeshdError,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    ShuttingDown,
)
from . import requests as parse
from .gate import AccessGate, Ticket
from .metrics import ApiMetrics
from .responses import Completion, model_object, new_id

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TICKET = web.RequestKey("ticket", Ticket)  # the access gate's view of the request, set by the middleware


@dataclass
class NodeFacts:
    """What responses say about the node that served them."""

    node_id: str
    started: int


def error_response(error: MeshdError, extra: dict[str, str] | None = None) -> web.Response:
    headers = dict(extra or {})
    headers.update(getattr(error, "headers", None) or {})  # RateLimited: x-ratelimit-*, retry-after-ms
    if error.retry_after is not None:
        headers["Retry-After"] = str(int(error.retry_after))
    return web.json_response(error.to_openai(), status=error.status, headers=headers)


def _names(models: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """(id, *aliases) of each model object, as the key allow-lists match them."""
    return [(m["id"], *m["meshd"].get("aliases", [])) for m in models]


class ApiServer:
    def __init__(self, config: ApiConfig, catalog: ModelCatalog, metrics: ApiMetrics, node: NodeFacts,
                 shutdown_grace_s: float, dispatcher: Any, gate: AccessGate | None = None) -> None:
        self.config = config
        self.gate = gate  # API keys, quotas and receipts; None: open, no receipts (tests of the bare API)
        self.catalog = catalog
        self.dispatcher = dispatcher  # meshd.routing.Dispatcher: local or a trusted peer, by policy
        self.metrics = metrics
        self.node = node
        self.accepting = True
        self._grace = shutdown_grace_s
        self._runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None

    # --- lifecycle -------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._middleware])
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:.+}", self.get_model)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    async def start(self) -> None:
        # handler_cancellation: a client that disconnects cancels its handler,
        # which closes the backend stream and stops generation within a token.
        self._runner = web.AppRunner(
            self.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=self._grace
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.listen.host, self.config.listen.port, reuse_address=True)
        await site.start()
        server = site._server  # aiohttp exposes no public accessor for the bound port
        sockets = getattr(server, "sockets", None) or []
        self.bound = sockets[0].getsockname()[:2] if sockets else (self.config.listen.host, self.config.listen.port)

    async def stop(self) -> None:
        """Refuse new requests, let in-flight ones finish within the grace period, then cancel them."""
        self.accepting = False
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- middleware ------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        started = time.perf_counter()
        status = 500
        failure: MeshdError | None = None
        cancelled = False
        ticket = self.gate.open_ticket(request.path) if self.gate is not None else None
        request[TICKET] = ticket
        self.metrics.in_flight.labels(route).inc()
        try:
            if not self.accepting and request.path.startswith("/v1/"):
                raise ShuttingDown("This node is shutting down", retry_after=1)
            if ticket is not None and request.path.startswith("/v1/"):
                self.gate.authenticate(ticket, request.headers.get("Authorization"))  # type: ignore[union-attr]
            response = await handler(request)
            status = response.status
            if ticket is not None and not response.prepared:
                response.headers.update(self.gate.headers_for(ticket))  # type: ignore[union-attr]
            return response
        except MeshdError as exc:
            status, failure = exc.status, exc
            return error_response(exc, self.gate.headers_for(ticket) if ticket is not None else None)
        except web.HTTPRequestEntityTooLarge:
            status = 413
            return error_response(PayloadTooLarge(
                f"The request body exceeds the limit of {self.config.max_body_bytes} bytes"))
        except web.HTTPMethodNotAllowed as exc:
            status = 405
            return error_response(MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}; "
                                                   f"use {', '.join(sorted(exc.allowed_methods))}"))
        except web.HTTPNotFound:
            status = 404
            return error_response(NotFound(f"No such route: {request.method} {request.path}"))
        except (asyncio.CancelledError, ConnectionResetError):
            status, cancelled = 499, True  # the client went away; nothing to send
            raise
        except Exception:  # noqa: BLE001 - the boundary: log it, never leak a traceback
            log.exception("unhandled error", extra={"fields": {"route": route}})
            failure = MeshdError("Internal server error")
            return error_response(failure)
        finally:
            if ticket is not None:
                self.gate.close(ticket, status, failure, cancelled)  # type: ignore[union-attr]
            self.metrics.in_flight.labels(route).dec()
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    # --- helpers ---------------------------------------------------------------

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object", code="invalid_json")
        return body

    def _headers(self, model_id: str, trace: Any, ticket: Ticket | None) -> dict[str, str]:
        headers = {"X-Meshd-Node": trace.node_header(), "X-Meshd-Route": trace.route_header(),
                   "X-Meshd-Model": model_id}
        if ticket is not None:
            headers.update(self.gate.headers_for(ticket))  # type: ignore[union-attr]
        return headers

    def _admit(self, request: web.Request, model: str, prompt: str, max_tokens: int | None, *,
               stream: bool = False, generates: bool = True) -> tuple[str, Ticket | None]:
        """The request's data class, after the key's model and data-class rules and its quota (403/429)."""
        header = request.headers.get("X-Meshd-Data-Class")
        ticket: Ticket | None = request.get(TICKET)
        if ticket is None or self.gate is None:
            return self.dispatcher.router.data_class(header), None
        ticket.stream = stream
        names = next((names for names in _names(self._mesh_models()) if model in names), (model,))
        requested = self.gate.authorize(ticket, model, names, header, self.dispatcher.router.config.default_data_class)
        data_class = self.dispatcher.router.data_class(requested)
        ticket.data_class = data_class
        self.gate.admit(ticket, prompt, max_tokens, generates=generates)
        return data_class, ticket

    def _visible(self, request: web.Request, models: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ticket: Ticket | None = request.get(TICKET)
        if ticket is None or self.gate is None:
            return models
        allowed = self.gate.visible(ticket, _names(models))
        return [m for m in models if m["id"] in allowed]

    # --- routes ----------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        models = {info.id: info.state for _, info in self.catalog.models()}
        ready = all(state == "ready" for state in models.values())
        status = "ok" if ready and self.accepting else "stopping" if not self.accepting else "starting"
        body = {"status": status, "node": self.node.node_id, "models": models}
        return web.json_response(body, status=200 if status == "ok" else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    def _mesh_models(self) -> list[dict[str, Any]]:
        """Local models, then models that connected trusted peers serve (routed like any other)."""
        data = [model_object(info, self.node.started) for _, info in self.catalog.models()]
        seen = {m["id"] for m in data}
        mesh = self.dispatcher.router.mesh
        for node_id in list(mesh.active) if mesh is not None else []:
            record = mesh.table.get(node_id)
            if record is None or not mesh.trust.allows(node_id, "serve"):
                continue
            for model in record.models:
                if model.get("id") in seen or model.get("state", "ready") != "ready":
                    continue
                seen.add(model["id"])
                data.append({"id": model["id"], "object": "model", "created": self.node.started,
                             "owned_by": "meshd", "meshd": {"state": "ready", "aliases": model.get("aliases", []),
                                                             "location": "mesh", "node": str(node_id)}})
        return data

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self._visible(request, self._mesh_models())})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for model in self._visible(request, self._mesh_models()):
            if name == model["id"] or name in model["meshd"].get("aliases", []):
                return web.json_response(model)
        raise ModelNotFound(f"The model '{name}' does not exist", param="model")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        req, options = parse.parse_chat(await self._json_body(request), new_id("req"))
        return await self._generate(request, req, options, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req, options = parse.parse_completion(await self._json_body(request), new_id("req"))
        return await self._generate(request, req, options, chat=False)

    async def embeddings(self, request: web.Request) -> web.Response:
        req, options = parse.parse_embedding(await self._json_body(request), new_id("req"))
        data_class, ticket = self._admit(request, req.model, "".join(req.inputs), None, generates=False)
        self._note(ticket, req.request_id, None)
        result, trace = await self.dispatcher.embed(req, data_class, ticket)
        model_id = trace.decision.chosen.model_id
        self._note(ticket, req.request_id, trace)
        if ticket is not None:
            ticket.usage(result.prompt_tokens, 0)
        self.metrics.tokens.labels(model_id, "prompt").inc(result.prompt_tokens)
        data = [
            {"object": "embedding", "index": i, "embedding": parse.encode_vector(v, options.encoding_format)}
            for i, v in enumerate(result.vectors)
        ]
        body = {
            "object": "list",
            "data": data,
            "model": model_id,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
        return web.json_response(body, headers=self._headers(model_id, trace, ticket))

    @staticmethod
    def _note(ticket: Ticket | None, request_id: str | None, trace: Any) -> None:
        """What the receipt needs from routing: the request id, the route, the model's identity."""
        if ticket is None:
            return
        ticket.request_id = request_id
        ticket.trace = trace
        chosen = trace.decision.chosen if trace is not None else None
        if chosen is not None:
            ticket.model = chosen.model_id
            ticket.model_identity = {"sha256": chosen.identity} if chosen.identity else None

    async def _generate(self, request: web.Request, req: GenerationRequest, options: parse.StreamOptions,
                        chat: bool) -> web.StreamResponse:
        arrived = time.perf_counter()
        prompt = req.prompt if req.messages is None else "".join(m.content for m in req.messages)
        data_class, ticket = self._admit(request, req.model, prompt or "", req.params.max_tokens,
                                         stream=options.stream)
        self._note(ticket, req.request_id, None)
        # Routing decides now (unknown model 404, forbidden data class 403, no
        # node 503); admission to a local queue may raise QueueFull here too.
        events, trace = self.dispatcher.generate(req, data_class, ticket)
        self._note(ticket, req.request_id, trace)
        model_id = trace.decision.chosen.model_id
        shape = Completion(chat=chat, model=model_id, include_usage=options.include_usage)
        try:
            # Wait for the first event before answering, so that errors found
            # while preparing (context too long, bad grammar) keep their status.
            first = await anext(events)
            self._observe_first(model_id, first, arrived, ticket)
            headers = self._headers(model_id, trace, ticket)
            if options.stream:
                return await self._stream(request, events, first, shape, headers, ticket)
            text: list[str] = []
            event: GenerationEvent = first
            while isinstance(event, TextGenerated):
                text.append(event.text)
                if ticket is not None:
                    ticket.delivered(len(event.token_ids) or 1)
                event = await anext(events)
            self._observe_done(model_id, event, ticket)
            return web.json_response(shape.whole("".join(text), event), headers=self._headers(model_id, trace, ticket))
        finally:
            await events.aclose()

    async def _stream(self, request: web.Request, events: AsyncIterator[GenerationEvent], first: GenerationEvent,
                      shape: Completion, headers: dict[str, str], ticket: Ticket | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **headers,
        })
        await response.prepare(request)
        opening = shape.first_chunk()
        if opening:
            await response.write(opening)
        event = first
        try:
            while isinstance(event, TextGenerated):
                if event.text:
                    await response.write(shape.text_chunk(event.text))
                if ticket is not None:
                    ticket.delivered(len(event.token_ids) or 1)
                event = await anext(events)
        except ConnectionResetError:
            raise
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band
            error = exc if isinstance(exc, MeshdError) else MeshdError("Internal server error")
            if not isinstance(exc, MeshdError):
                log.error("generation failed mid-stream", exc_info=exc)
            # Headers are gone: the error travels as a terminating SSE event.
            if ticket is not None:
                ticket.failed_mid_stream = error
            await response.write(b"data: " + json.dumps(error.to_openai()).encode() + b"\n\n")
            await response.write_eof()
            return response
        self._observe_done(shape.model, event, ticket)
        await response.write(shape.final_chunks(event))
        await response.write_eof()
        return response

    def _observe_first(self, model: str, event: GenerationEvent, arrived: float, ticket: Ticket | None) -> None:
        if isinstance(event, TextGenerated):
            ttft = time.perf_counter() - arrived
            self.metrics.ttft.labels(model).observe(ttft)
            if ticket is not None:
                ticket.ttft_ms = ttft * 1000

    def _observe_done(self, model: str, event: GenerationEvent, ticket: Ticket | None) -> None:
        if isinstance(event, GenerationFinished):
            if ticket is not None:
                ticket.usage(event.prompt_tokens, event.completion_tokens)
            self.metrics.tokens.labels(model, "prompt").inc(event.prompt_tokens)
            self.metrics.tokens.labels(model, "completion").inc(event.completion_tokens)


__all__ = ["ApiServer", "NodeFacts", "error_response"]

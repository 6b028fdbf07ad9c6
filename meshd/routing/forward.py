"""Requests over the mesh: serving forwarded requests, and streaming them from a peer.

``RequestMux`` is the mesh's request handler. On the serving side it runs a
forwarded request exactly as the local API would (same catalog, same
backends) and streams tokens back as they come; a reset from the entry node
closes the backend stream, which stops generation within a token. On the
entry side it routes each request stream's events to the waiting caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from ..backends.base import GenerationEvent, GenerationFinished, GenerationRequest, TextGenerated
from ..catalog import ModelCatalog
from ..errors import MeshdError, ServiceUnavailable, ShuttingDown
from ..logs import fields
from ..protocol import (
    Event,
    InferenceRequest,
    RequestCancelled,
    RequestCompleted,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
    SessionClosed,
    StreamWritable,
    TokenReceived,
)
from ..transport import PeerLink
from ..transport.link import clock
from .wire import embedding_body, embedding_from_body, error_from_wire, generation_body, generation_from_body

log = logging.getLogger(__name__)


class PeerFailed(ServiceUnavailable):
    """The peer or the path to it failed; the request may be tried elsewhere."""

    code = "peer_unavailable"


class DeadlineMissed(ServiceUnavailable):
    status = 504
    code = "deadline_exceeded"


class RequestMux:
    def __init__(self, catalog: ModelCatalog, gate: Any = None) -> None:
        self.catalog = catalog
        self.gate = gate  # meshd.api.gate.AccessGate: checks the entry node's verdict
        self._calls: dict[tuple[int, int], asyncio.Queue[Event]] = {}
        self._serving: dict[tuple[int, int], asyncio.Task] = {}
        self._writable: dict[tuple[int, int], asyncio.Event] = {}
        self.served = 0  # requests this node served for peers
        # False while draining: peers' new requests get a typed 503 (they fail over), in-flight ones finish.
        self.accepting = True

    def in_flight_for_peers(self) -> int:
        return len(self._serving)

    # --- events from the mesh ------------------------------------------------------

    def __call__(self, link: PeerLink, event: Event) -> None:
        key = (id(link), getattr(event, "stream_id", -1))
        if isinstance(event, RequestReceived):
            task = asyncio.get_running_loop().create_task(self._serve(link, event))
            self._serving[key] = task
            task.add_done_callback(lambda _t, k=key: self._serving.pop(k, None))
        elif isinstance(event, RequestCancelled):
            task = self._serving.get(key)
            if task is not None:
                log.info("peer cancelled a request", extra=fields(peer=str(link.node_id), request_id=event.request_id))
                task.cancel()
        elif isinstance(event, StreamWritable):
            if (flag := self._writable.get(key)) is not None:
                flag.set()
        elif isinstance(event, (TokenReceived, ResponseReceived, RequestCompleted, RequestFailed)):
            if (queue := self._calls.get(key)) is not None:
                queue.put_nowait(event)

    def link_closed(self, link: PeerLink) -> None:
        for (link_id, stream_id), queue in list(self._calls.items()):
            if link_id == id(link):
                queue.put_nowait(SessionClosed(str(link.node_id), "connection_closed", link.close_reason, False))
        for (link_id, _), task in list(self._serving.items()):
            if link_id == id(link):
                task.cancel()

    # --- serving side --------------------------------------------------------------

    async def _serve(self, link: PeerLink, event: RequestReceived) -> None:
        frame, sid = event.request, event.stream_id
        session = link.session
        if session is None:
            return
        self.served += 1
        log.info("serving request for peer", extra=fields(peer=str(link.node_id), request_id=frame.request_id,
                                                          model=frame.model, kind=frame.kind))
        try:
            if not self.accepting:
                raise ShuttingDown("This node is draining", retry_after=1)
            if self.gate is not None:
                # Quotas were charged at the entry node; here we only check its signed verdict.
                self.gate.verify_forwarded(link.node_id, frame.verdict)
            resolved = self.catalog.resolve(frame.model)
            if frame.kind == "embedding":
                result = await resolved.backend.embed(embedding_from_body(resolved.model_id, frame.body,
                                                                          frame.request_id))
                session.send_response_body(sid, {"vectors": [list(v) for v in result.vectors],
                                                 "prompt_tokens": result.prompt_tokens})
                session.send_usage(sid, result.prompt_tokens, 0)
            else:
                request = generation_from_body(resolved.model_id, frame.body, frame.request_id)
                request = replace(request, resume_token_ids=tuple(frame.resume_token_ids or ()),
                                  resume_text=frame.resume_text or "")
                await self._stream_to_peer(link, sid, resolved.backend.generate(request), event.deadline_at)
        except MeshdError as exc:
            if link.session is not None and not link.closed:
                session.send_request_error(sid, exc.code, exc.message, exc.status)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the peer gets a typed error, we get the traceback
            log.exception("serving a forwarded request failed", extra=fields(request_id=frame.request_id))
            if not link.closed:
                session.send_request_error(sid, "internal_error", f"internal error: {type(exc).__name__}", 500)
        finally:
            if not link.closed:
                link.flush()

    async def _stream_to_peer(self, link: PeerLink, sid: int, events: AsyncIterator[GenerationEvent],
                              deadline_at: float | None = None) -> None:
        """Stream a generation back; ``deadline_at`` (session clock) bounds the wait for the first token.

        The entry node's deadline covers the time until the response starts: past it the entry
        node has moved on, so a request still queued or prefilling here is dropped with a
        ``deadline_exceeded`` error instead of occupying the backend.
        """
        key = (id(link), sid)
        try:
            if deadline_at is not None:
                try:
                    async with asyncio.timeout(max(deadline_at - clock(), 0.0)):
                        first = await anext(events)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    log.info("forwarded request missed its deadline", extra=fields(peer=str(link.node_id)))
                    raise DeadlineMissed("no first token within the entry node's deadline") from None
                await self._send_event(link, sid, first)
            async for item in events:
                await self._send_event(link, sid, item)
        finally:
            self._writable.pop(key, None)
            await events.aclose()

    async def _send_event(self, link: PeerLink, sid: int, item: GenerationEvent) -> None:
        session = link.session
        if isinstance(item, TextGenerated):
            session.send_token(sid, item.text, token_ids=item.token_ids)
            link.flush()
            if not session.is_writable(sid):  # the entry node reads slowly: wait, bounded memory
                flag = self._writable[(id(link), sid)] = asyncio.Event()
                await flag.wait()
        else:
            session.send_token(sid, "", finish_reason=item.finish_reason)
            session.send_usage(sid, item.prompt_tokens, item.completion_tokens, item.cached_tokens)

    # --- entry side ------------------------------------------------------------------

    async def remote_generate(self, link: PeerLink, request: GenerationRequest, data_class: str,
                              deadline_s: float | None = None,
                              verdict: bytes | None = None) -> AsyncIterator[GenerationEvent]:
        session = link.session
        if session is None or link.closed or not session.established:
            raise PeerFailed(f"peer {link.node_id} is not connected")
        frame = InferenceRequest(
            request_id=request.request_id or "req", kind="chat" if request.messages is not None else "completion",
            model=request.model, body=generation_body(request), data_class=data_class, stream=True,
            deadline=deadline_s, resume_text=request.resume_text or None,
            resume_token_ids=request.resume_token_ids or None, verdict=verdict,
        )
        sid, queue = self._open(link, frame)
        finished = False
        finish_reason = "stop"
        try:
            while True:
                event = await queue.get()
                if isinstance(event, TokenReceived):
                    chunk = event.chunk
                    if chunk.finish_reason:
                        finish_reason = chunk.finish_reason
                    if chunk.text or chunk.token_ids:
                        yield TextGenerated(chunk.text, tuple(chunk.token_ids or ()))
                elif isinstance(event, RequestCompleted):
                    finished = True
                    yield GenerationFinished(finish_reason, event.prompt_tokens,  # type: ignore[arg-type]
                                             event.completion_tokens, cached_tokens=event.cached_tokens)
                    return
                elif isinstance(event, RequestFailed):
                    finished = True
                    raise self._failure(link, event)
                elif isinstance(event, SessionClosed):
                    finished = True
                    raise PeerFailed(f"connection to {link.node_id} lost: {event.reason}")
        finally:
            self._calls.pop((id(link), sid), None)
            if not finished and not link.closed and link.session is not None:
                link.session.cancel_request(sid, clock(), reason="client went away")
                link.flush()

    async def remote_embed(self, link: PeerLink, request: Any, data_class: str,
                           verdict: bytes | None = None) -> dict[str, Any]:
        session = link.session
        if session is None or link.closed or not session.established:
            raise PeerFailed(f"peer {link.node_id} is not connected")
        frame = InferenceRequest(request_id=request.request_id or "req", kind="embedding", model=request.model,
                                 body=embedding_body(request), data_class=data_class, verdict=verdict)
        sid, queue = self._open(link, frame)
        body: dict[str, Any] = {}
        try:
            while True:
                event = await queue.get()
                if isinstance(event, ResponseReceived):
                    body = event.body
                elif isinstance(event, RequestCompleted):
                    return body
                elif isinstance(event, RequestFailed):
                    raise self._failure(link, event)
                elif isinstance(event, SessionClosed):
                    raise PeerFailed(f"connection to {link.node_id} lost: {event.reason}")
        finally:
            self._calls.pop((id(link), sid), None)

    def _open(self, link: PeerLink, frame: InferenceRequest) -> tuple[int, asyncio.Queue[Event]]:
        sid = link.session.open_request_stream(frame, clock())  # type: ignore[union-attr]
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._calls[(id(link), sid)] = queue
        link.flush()
        return sid, queue

    @staticmethod
    def _failure(link: PeerLink, event: RequestFailed) -> MeshdError:
        if not event.by_peer:
            return PeerFailed(f"request to {link.node_id} failed: {event.code}")
        return error_from_wire(event.code, event.message, event.http_status)


__all__ = ["DeadlineMissed", "PeerFailed", "RequestMux"]

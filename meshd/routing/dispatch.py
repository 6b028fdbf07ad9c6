"""Run a request on the chosen node, failing over to the next candidate.

Before the first token, a failed candidate is simply replaced by the next one.
After tokens were delivered, the request resumes on another node serving the
same model identity, from the prompt plus the tokens already produced, and the
client's stream carries on; where that is impossible the caller gets a typed
error (an SSE error event for a stream) instead of a hang.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from ..backends.base import EmbeddingRequest, EmbeddingResult, GenerationEvent, GenerationRequest, TextGenerated
from ..errors import MeshdError, QueueFull, ServiceUnavailable
from ..logs import fields
from .forward import PeerFailed, RequestMux
from .router import LOCAL, Candidate, Decision, NoRoute, Router

log = logging.getLogger(__name__)

RECENT_DECISIONS = 200


class ResumeImpossible(ServiceUnavailable):
    code = "resume_impossible"


def _short(target: str) -> str:
    return "local" if target == LOCAL else "peer:" + target[:15]


@dataclass
class RouteTrace:
    """Where one request went: the decision, each attempt, and why attempts failed."""

    decision: Decision
    own_node_id: str
    attempts: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def served_by(self) -> str | None:
        return self.attempts[-1] if self.attempts else None

    def node_header(self) -> str:
        target = self.served_by
        return self.own_node_id if target in (None, LOCAL) else target

    def route_header(self) -> str:
        return " -> ".join(_short(t) for t in self.attempts) or "none"

    def to_dict(self) -> dict[str, Any]:
        return {"decision": self.decision.to_dict(), "attempts": self.attempts,
                "failures": [{"target": t, "error": e} for t, e in self.failures]}


def _failover_worthy(exc: MeshdError) -> bool:
    return isinstance(exc, (PeerFailed, QueueFull)) or exc.status in (502, 503, 504)


class Dispatcher:
    def __init__(self, router: Router, mux: RequestMux, mesh: Any, own_node_id: str) -> None:
        self.router = router
        self.mux = mux
        self.mesh = mesh
        self.own_node_id = own_node_id
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_DECISIONS)

    def _decide(self, model: str, data_class: str) -> Decision:
        decision = self.router.decide(model, data_class)
        event = decision.to_dict()
        self.recent.append(event)
        log.info("route decided", extra=fields(
            model=model, data_class=data_class, strategy=decision.strategy,
            chosen=_short(decision.chosen.target) if decision.chosen else "-",
            candidates=",".join(f"{_short(c.target)}:{c.score:g}" for c in decision.candidates),
            excluded=",".join(f"{_short(t)}({w})" for t, w in decision.excluded) or "-"))
        return decision

    def _link(self, target: str) -> Any:
        from identity import NodeId

        link = self.mesh.active.get(NodeId.parse(target)) if self.mesh is not None else None
        if link is None:
            raise PeerFailed(f"peer {target} is no longer connected")
        return link

    # --- generation ------------------------------------------------------------------

    def generate(self, request: GenerationRequest, data_class: str) -> tuple[AsyncIterator[GenerationEvent], RouteTrace]:
        decision = self._decide(request.model, data_class)
        trace = RouteTrace(decision, self.own_node_id)
        return self._run(request, data_class, trace), trace

    def _open(self, candidate: Candidate, request: GenerationRequest, data_class: str) -> AsyncIterator[GenerationEvent]:
        request = replace(request, model=candidate.model_id)
        if candidate.target == LOCAL:
            return self.router.catalog.resolve(candidate.model_id).backend.generate(request)
        return self.mux.remote_generate(self._link(candidate.target), request, data_class)

    async def _run(self, request: GenerationRequest, data_class: str,
                   trace: RouteTrace) -> AsyncIterator[GenerationEvent]:
        candidates = list(trace.decision.candidates[: self.router.config.max_attempts])
        tokens: list[int] = []
        text: list[str] = []
        identity: str | None = None
        last: MeshdError | None = None
        for candidate in candidates:
            if tokens:
                why = self._cannot_resume(request, candidate, identity)
                if why:
                    last = ResumeImpossible(why)
                    continue
            attempt = replace(request, resume_token_ids=tuple(tokens), resume_text="".join(text))
            try:
                stream = self._open(candidate, attempt, data_class)
            except MeshdError as exc:
                if not _failover_worthy(exc):
                    raise
                self._failed(trace, candidate, exc)
                last = exc
                continue
            trace.attempts.append(candidate.target)
            try:
                async for event in stream:
                    if isinstance(event, TextGenerated):
                        if not tokens and identity is None:
                            identity = candidate.identity or candidate.model_id
                        tokens.extend(event.token_ids)
                        text.append(event.text)
                        yield event
                    else:
                        self.router.breakers.success(candidate.target)
                        yield event
                        return
            except MeshdError as exc:
                if not _failover_worthy(exc):
                    raise
                self._failed(trace, candidate, exc)
                last = exc
            finally:
                await stream.aclose()
        if tokens:
            raise last if isinstance(last, ResumeImpossible) else ResumeImpossible(
                f"the serving node failed after {len(tokens)} tokens and no other node can continue: {last}")
        raise last or NoRoute(f"no node could serve '{request.model}'")

    def _failed(self, trace: RouteTrace, candidate: Candidate, exc: MeshdError) -> None:
        trace.failures.append((candidate.target, exc.code))
        if candidate.target != LOCAL:
            self.router.breakers.failure(candidate.target, time.monotonic())
        log.warning("route attempt failed", extra=fields(target=_short(candidate.target), code=exc.code,
                                                         error=exc.message))

    @staticmethod
    def _cannot_resume(request: GenerationRequest, candidate: Candidate, identity: str | None) -> str | None:
        params = request.params
        if params.response_format and params.response_format.get("type") != "text":
            return "constrained output (response_format) cannot be resumed"
        if params.seed is not None and params.temperature > 0:
            return "a seeded sampled stream cannot be continued identically elsewhere"
        if (candidate.identity or candidate.model_id) != identity:
            return f"{_short(candidate.target)} serves a different model identity"
        return None

    # --- embeddings --------------------------------------------------------------------

    async def embed(self, request: EmbeddingRequest, data_class: str) -> tuple[EmbeddingResult, RouteTrace]:
        decision = self._decide(request.model, data_class)
        trace = RouteTrace(decision, self.own_node_id)
        last: MeshdError | None = None
        for candidate in decision.candidates[: self.router.config.max_attempts]:
            trace.attempts.append(candidate.target)
            try:
                if candidate.target == LOCAL:
                    backend = self.router.catalog.resolve(candidate.model_id).backend
                    result = await backend.embed(replace(request, model=candidate.model_id))
                else:
                    body = await self.mux.remote_embed(self._link(candidate.target),
                                                       replace(request, model=candidate.model_id), data_class)
                    result = EmbeddingResult(tuple(tuple(v) for v in body.get("vectors", [])),
                                             int(body.get("prompt_tokens", 0)))
                return result, trace
            except MeshdError as exc:
                if not _failover_worthy(exc):
                    raise
                self._failed(trace, candidate, exc)
                last = exc
        raise last or NoRoute(f"no node could serve '{request.model}'")


__all__ = ["Dispatcher", "ResumeImpossible", "RouteTrace"]

"""Run a request on the chosen node, failing over to the next candidate.

Before the first token, a failed candidate is simply replaced by the next one,
within the request's deadline: an attempt that produces no first token within
``Router.first_token_timeout_s`` (while another candidate remains) is abandoned
and counted as a failure. After tokens were delivered, the request resumes on
another node serving the same, *known* model identity (file sha256), from the
prompt plus the tokens already produced, and the client's stream carries on; a
peer silent for ``Router.stall_timeout_s`` mid-stream counts as failed. Where
resuming is impossible the caller gets a typed error (an SSE error event for a
stream) instead of a hang.

Every decision and every request's final trace are recorded as events
(``RouteDecided``, ``RouteFinished``): logged, kept in ``Dispatcher.recent``
and passed to ``Dispatcher.listeners``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..backends.base import EmbeddingRequest, EmbeddingResult, GenerationEvent, GenerationRequest, TextGenerated
from ..errors import MeshdError, QueueFull, ServiceUnavailable
from ..logs import fields
from .forward import PeerFailed, RequestMux
from .router import LOCAL, Candidate, Decision, NoRoute, Router

log = logging.getLogger(__name__)

RECENT_DECISIONS = 200
MIN_TOKENS_FOR_THROUGHPUT = 8  # shorter streams say more about prefill than about speed


class ResumeImpossible(ServiceUnavailable):
    code = "resume_impossible"


class DeadlineExceeded(ServiceUnavailable):
    """No node produced a first token within the request's deadline."""

    status = 504
    code = "deadline_exceeded"


class AttemptTimedOut(ServiceUnavailable):
    """One attempt gave no first token (or went silent mid-stream) in time; the next candidate is tried."""

    status = 504
    code = "attempt_timed_out"


def _short(target: str) -> str:
    return "local" if target == LOCAL else "peer:" + target[:15]


@dataclass(frozen=True)
class RouteDecided:
    """The router chose (or previewed) candidates for a request."""

    request_id: str
    decision: Decision

    def to_dict(self) -> dict[str, Any]:
        return {"event": "route_decided", "request_id": self.request_id, **self.decision.to_dict()}


@dataclass(frozen=True)
class RouteFinished:
    """A routed request ended: where it went, what failed, and how it ended."""

    request_id: str
    model: str
    data_class: str
    outcome: str  # "served", "cancelled", or the error code the client got
    attempts: tuple[str, ...]
    failures: tuple[tuple[str, str], ...]
    skipped: tuple[tuple[str, str], ...]
    tokens: int
    duration_s: float
    at: float
    cache: str | None = None  # the KV-cache placement, when [kvcache] found a holder (CachePlan-like header)

    def to_dict(self) -> dict[str, Any]:
        return {"event": "route_finished", "request_id": self.request_id, "model": self.model,
                "data_class": self.data_class, "outcome": self.outcome, "attempts": list(self.attempts),
                "failures": [{"target": t, "error": e} for t, e in self.failures],
                "skipped": [{"target": t, "why": w} for t, w in self.skipped],
                "tokens": self.tokens, "duration_s": round(self.duration_s, 3), "at": self.at,
                "cache": self.cache}


@dataclass
class RouteTrace:
    """Where one request went: the decision, each attempt, and why attempts failed."""

    decision: Decision
    own_node_id: str
    attempts: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (target, error code)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # candidates not tried, and why
    outcome: str | None = None  # set when the request ends
    cache: str | None = None  # KV-cache placement (meshd.kvnode.KvNode.plan), None when it had nothing to say

    @property
    def served_by(self) -> str | None:
        return self.attempts[-1] if self.attempts else None

    def node_header(self) -> str:
        target = self.served_by
        return self.own_node_id if target in (None, LOCAL) else target

    def route_header(self) -> str:
        route = " -> ".join(_short(t) for t in self.attempts) or "none"
        return f"{route}; cache={self.cache}" if self.cache else route

    def to_dict(self) -> dict[str, Any]:
        return {"decision": self.decision.to_dict(), "attempts": self.attempts, "cache": self.cache,
                "failures": [{"target": t, "error": e} for t, e in self.failures],
                "skipped": [{"target": t, "why": w} for t, w in self.skipped], "outcome": self.outcome}


def _failover_worthy(exc: MeshdError) -> bool:
    # A peer's deadline error may arrive as a plain backend error (wire.error_from_wire): match its code.
    return (isinstance(exc, (PeerFailed, QueueFull)) or exc.status in (502, 503, 504)
            or exc.code in (DeadlineExceeded.code, AttemptTimedOut.code))


class _Attempt:
    """Breaker bookkeeping for one stream to one candidate: exactly one verdict per attempt."""

    def __init__(self, router: Router, target: str) -> None:
        self.router = router
        self.target = target
        self.settled = target == LOCAL  # local attempts do not feed the breakers

    def begin(self) -> None:
        if not self.settled:
            self.router.breakers.begin(self.target, time.monotonic())

    def success(self) -> None:
        if not self.settled:
            self.settled = True
            self.router.breakers.success(self.target)

    def failure(self) -> None:
        if not self.settled:
            self.settled = True
            self.router.breakers.failure(self.target, time.monotonic())

    def end(self) -> None:
        """No verdict (client went away, a server-side error of the request itself): free a probe."""
        if not self.settled:
            self.settled = True
            self.router.breakers.release(self.target)


class Dispatcher:
    def __init__(self, router: Router, mux: RequestMux, mesh: Any, own_node_id: str, gate: Any = None) -> None:
        self.router = router
        self.mux = mux
        self.mesh = mesh
        self.own_node_id = own_node_id
        self.gate = gate  # meshd.api.gate.AccessGate: signs the verdict a forwarded request carries
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_DECISIONS)
        self.listeners: list[Callable[[RouteDecided | RouteFinished], None]] = []
        # Optional (meshd.kvnode.KvNode.plan): reorders candidates towards a node holding the
        # prompt's KV-cache prefix and returns a header value; never fails a request.
        self.cache_planner: Callable[[GenerationRequest, list[Candidate]],
                                     Awaitable[tuple[list[Candidate], str | None]]] | None = None

    def _record(self, event: RouteDecided | RouteFinished) -> None:
        self.recent.append(event.to_dict())
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a broken listener must not break routing
                log.exception("route event listener failed")

    def _decide(self, model: str, data_class: str, request_id: str = "") -> Decision:
        decision = self.router.decide(model, data_class)
        self._record(RouteDecided(request_id, decision))
        log.info("route decided", extra=fields(
            request_id=request_id or "-", model=model, data_class=data_class, strategy=decision.strategy,
            chosen=_short(decision.chosen.target) if decision.chosen else "-",
            candidates=",".join(f"{_short(c.target)}:{c.score:.3g}" for c in decision.candidates),
            excluded=",".join(f"{_short(t)}({w})" for t, w in decision.excluded) or "-"))
        return decision

    def _finished(self, request_id: str, trace: RouteTrace, outcome: str, tokens: int, started: float) -> None:
        trace.outcome = outcome
        decision = trace.decision
        event = RouteFinished(request_id, decision.model, decision.data_class, outcome, tuple(trace.attempts),
                              tuple(trace.failures), tuple(trace.skipped), tokens, time.monotonic() - started,
                              time.time(), trace.cache)
        self._record(event)
        log.log(logging.INFO if outcome in ("served", "cancelled") else logging.WARNING, "route finished",
                extra=fields(request_id=request_id or "-", model=decision.model, outcome=outcome,
                             route=trace.route_header(),
                             failures=",".join(f"{_short(t)}({e})" for t, e in trace.failures) or "-",
                             skipped=",".join(f"{_short(t)}({w})" for t, w in trace.skipped) or "-",
                             tokens=tokens, duration_s=round(event.duration_s, 3), cache=trace.cache or "-"))

    def _link(self, target: str) -> Any:
        from identity import NodeId

        link = self.mesh.active.get(NodeId.parse(target)) if self.mesh is not None else None
        if link is None:
            raise PeerFailed(f"peer {target} is no longer connected")
        return link

    # --- generation ------------------------------------------------------------------

    def _verdict(self, ticket: Any, target: str, request_id: str | None, model: str, data_class: str) -> bytes | None:
        if self.gate is None:
            return None
        return self.gate.verdict_for(ticket, target, request_id or "req", model, data_class)

    def generate(self, request: GenerationRequest, data_class: str, ticket: Any = None,
                 deadline_s: float | None = None) -> tuple[AsyncIterator[GenerationEvent], RouteTrace]:
        """``ticket`` (meshd.api.gate.Ticket) is who asked: forwarded requests carry it as a signed verdict.

        ``deadline_s`` bounds the time until the first token, over all attempts (default
        ``Router.request_deadline_s``).
        """
        decision = self._decide(request.model, data_class, request.request_id)
        trace = RouteTrace(decision, self.own_node_id)
        budget = self.router.request_deadline_s if deadline_s is None else deadline_s
        return self._run(request, data_class, trace, ticket, time.monotonic() + budget), trace

    def _open(self, candidate: Candidate, request: GenerationRequest, data_class: str,
              ticket: Any, deadline_s: float) -> AsyncIterator[GenerationEvent]:
        request = replace(request, model=candidate.model_id)
        if candidate.target == LOCAL:
            return self.router.catalog.resolve(candidate.model_id).backend.generate(request)
        verdict = self._verdict(ticket, candidate.target, request.request_id, candidate.model_id, data_class)
        return self.mux.remote_generate(self._link(candidate.target), request, data_class,
                                        deadline_s=max(deadline_s, 0.001), verdict=verdict)

    async def _run(self, request: GenerationRequest, data_class: str, trace: RouteTrace, ticket: Any,
                   deadline_at: float) -> AsyncIterator[GenerationEvent]:
        started = time.monotonic()
        router = self.router
        candidates = list(trace.decision.candidates)
        # One candidate is enough: a cache can be pulled to it from a peer that does not serve.
        if self.cache_planner is not None and not request.resume_token_ids and candidates:
            try:
                candidates, trace.cache = await self.cache_planner(request, candidates)
            except Exception:  # noqa: BLE001 - a planning bug must not cost the request
                log.exception("kv-cache planning failed; routing as decided")
        max_attempts = router.config.max_attempts
        tokens: list[int] = []
        text: list[str] = []
        started_output = False  # the client has output: from now on only an exact resume may continue it
        identity: str | None = None  # model identity of the node that produced the first tokens
        last: MeshdError | None = None
        tries = 0
        outcome = "cancelled"  # what the trace says if the consumer goes away
        try:
            for index, candidate in enumerate(candidates):
                if tries >= max_attempts:
                    trace.skipped.extend((c.target, f"max_attempts={max_attempts} reached")
                                         for c in candidates[index:])
                    break
                now = time.monotonic()
                if not started_output and now >= deadline_at:
                    last = DeadlineExceeded(
                        f"no node produced a first token for '{request.model}' within the request's deadline")
                    trace.skipped.extend((c.target, "request deadline passed") for c in candidates[index:])
                    break
                if started_output:
                    why = self._cannot_resume(request, candidate, identity, tokens)
                    if why:
                        trace.skipped.append((candidate.target, why))
                        last = ResumeImpossible(why)
                        continue
                if candidate.target != LOCAL and not router.breakers.allows(candidate.target, now):
                    # Another request took the half-open probe since the decision.
                    trace.skipped.append((candidate.target,
                                          f"circuit {router.breakers.state(candidate.target, now)}"))
                    continue
                tries += 1
                # The first-token bound applies only while someone else could still be tried;
                # the last candidate gets whatever is left of the request's deadline.
                has_next = tries < max_attempts and index + 1 < len(candidates)
                first_wait = deadline_at - now if not started_output else math.inf
                if has_next or started_output:
                    first_wait = min(first_wait, router.first_token_timeout_s)
                attempt = _Attempt(router, candidate.target)
                resume = replace(request, resume_token_ids=tuple(tokens), resume_text="".join(text))
                try:
                    stream = self._open(candidate, resume, data_class, ticket,
                                        deadline_at - now if not started_output else router.first_token_timeout_s)
                except MeshdError as exc:
                    if not _failover_worthy(exc):
                        raise
                    self._failed(trace, candidate, exc, attempt)
                    last = exc
                    continue
                attempt.begin()
                trace.attempts.append(candidate.target)
                produced = 0
                first_at: float | None = None
                try:
                    while True:
                        wait = first_wait if first_at is None else (
                            router.stall_timeout_s if candidate.target != LOCAL else math.inf)
                        event = await self._next(stream, wait, candidate, first_at is None)
                        if isinstance(event, TextGenerated):
                            if first_at is None:
                                first_at = time.monotonic()
                            if not started_output:
                                identity = candidate.identity
                            started_output = started_output or bool(event.text or event.token_ids)
                            produced += len(event.token_ids)
                            tokens.extend(event.token_ids)
                            text.append(event.text)
                            yield event
                        else:
                            attempt.success()
                            self._observe_speed(candidate.target, produced, first_at)
                            outcome = "served"
                            yield event
                            return
                except MeshdError as exc:
                    if not _failover_worthy(exc):
                        if 400 <= exc.status < 499:
                            attempt.success()  # the node is healthy: it rejected the request itself
                        raise
                    self._failed(trace, candidate, exc, attempt)
                    last = exc
                finally:
                    attempt.end()
                    await stream.aclose()
            if not started_output and isinstance(last, AttemptTimedOut) and time.monotonic() >= deadline_at:
                last = DeadlineExceeded(
                    f"no node produced a first token for '{request.model}' within the request's deadline")
            if started_output:
                raise last if isinstance(last, ResumeImpossible) else ResumeImpossible(
                    f"the serving node failed after {len(tokens)} tokens and no other node can continue: {last}")
            raise last or NoRoute(f"no node could serve '{request.model}'")
        except MeshdError as exc:
            outcome = exc.code
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if outcome != "served":  # closed after the final event is a normal end, not a cancel
                outcome = "cancelled"
            raise
        except Exception:
            outcome = "internal_error"
            raise
        finally:
            self._finished(request.request_id, trace, outcome, len(tokens), started)

    @staticmethod
    async def _next(stream: AsyncIterator[GenerationEvent], wait: float, candidate: Candidate,
                    first: bool) -> GenerationEvent:
        if wait == math.inf:
            return await anext(stream)
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                return await anext(stream)
        except TimeoutError:
            what = "no first token" if first else "no token"
            raise AttemptTimedOut(f"{_short(candidate.target)}: {what} within {wait:.1f}s") from None

    def _observe_speed(self, target: str, produced: int, first_at: float | None) -> None:
        if first_at is None or produced < MIN_TOKENS_FOR_THROUGHPUT:
            return
        elapsed = time.monotonic() - first_at
        if elapsed > 0:
            self.router.observe_throughput(target, (produced - 1) / elapsed)

    def _failed(self, trace: RouteTrace, candidate: Candidate, exc: MeshdError, attempt: _Attempt) -> None:
        trace.failures.append((candidate.target, exc.code))
        attempt.failure()
        log.warning("route attempt failed", extra=fields(target=_short(candidate.target), code=exc.code,
                                                         error=exc.message))

    @staticmethod
    def _cannot_resume(request: GenerationRequest, candidate: Candidate, identity: str | None,
                       tokens: list[int]) -> str | None:
        params = request.params
        if not tokens:
            return "the output so far carries no token ids (its backend does not report them)"
        if params.response_format and params.response_format.get("type") != "text":
            return "constrained output (response_format) cannot be resumed"
        if params.seed is not None and params.temperature > 0:
            return "a seeded sampled stream cannot be continued identically elsewhere"
        if identity is None:
            return "the model identity (file sha256) of the node that started the response is unknown"
        if candidate.identity is None:
            return f"{_short(candidate.target)} does not publish its model identity (file sha256)"
        if candidate.identity != identity:
            return f"{_short(candidate.target)} serves a different model identity"
        if candidate.features is not None and "resume" not in candidate.features:
            return f"{_short(candidate.target)}'s backend cannot resume a generation"
        return None

    # --- embeddings --------------------------------------------------------------------

    async def embed(self, request: EmbeddingRequest, data_class: str,
                    ticket: Any = None) -> tuple[EmbeddingResult, RouteTrace]:
        started = time.monotonic()
        decision = self._decide(request.model, data_class, request.request_id)
        trace = RouteTrace(decision, self.own_node_id)
        deadline_at = started + self.router.request_deadline_s
        last: MeshdError | None = None
        outcome = "cancelled"
        try:
            for candidate in decision.candidates[: self.router.config.max_attempts]:
                remaining = deadline_at - time.monotonic()
                if remaining <= 0:
                    last = DeadlineExceeded(f"no node answered for '{request.model}' within the request's deadline")
                    break
                attempt = _Attempt(self.router, candidate.target)
                try:
                    if candidate.target == LOCAL:
                        trace.attempts.append(candidate.target)
                        backend = self.router.catalog.resolve(candidate.model_id).backend
                        result = await backend.embed(replace(request, model=candidate.model_id))
                    else:
                        if not self.router.breakers.allows(candidate.target, time.monotonic()):
                            trace.skipped.append((candidate.target, "circuit probing"))
                            continue
                        verdict = self._verdict(ticket, candidate.target, request.request_id, candidate.model_id,
                                                data_class)
                        link = self._link(candidate.target)
                        trace.attempts.append(candidate.target)
                        attempt.begin()
                        try:
                            async with asyncio.timeout(remaining):
                                body = await self.mux.remote_embed(link, replace(request, model=candidate.model_id),
                                                                   data_class, verdict=verdict)
                        except TimeoutError:
                            raise DeadlineExceeded(f"{_short(candidate.target)} did not answer in time") from None
                        result = EmbeddingResult(tuple(tuple(v) for v in body.get("vectors", [])),
                                                 int(body.get("prompt_tokens", 0)))
                    attempt.success()
                    outcome = "served"
                    return result, trace
                except MeshdError as exc:
                    if not _failover_worthy(exc):
                        if 400 <= exc.status < 500:
                            attempt.success()
                        raise
                    self._failed(trace, candidate, exc, attempt)
                    last = exc
                finally:
                    attempt.end()
            raise last or NoRoute(f"no node could serve '{request.model}'")
        except MeshdError as exc:
            outcome = exc.code
            raise
        finally:
            self._finished(request.request_id, trace, outcome, 0, started)


__all__ = ["AttemptTimedOut", "DeadlineExceeded", "Dispatcher", "ResumeImpossible", "RouteDecided",
           "RouteFinished", "RouteTrace"]

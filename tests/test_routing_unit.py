"""Routing policy, circuit breakers and failover, in memory.

These tests are about routing decisions, not about the model: every node's
"model" here is ``FakeMeshBackend``, a FAKE scripted backend that emits
numbered tokens (``t0 t1 ...``) and can fail, stall or die mid-stream on
demand. Real llama.cpp across real daemons is covered by
tests/test_routing_loopback.py and tests/test_routing_netns.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from identity import NodeKey
from meshd.backends.base import (
    BackendCapabilities,
    BackendLoad,
    EmbeddingResult,
    GenerationFinished,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    TextGenerated,
)
from meshd.catalog import ModelCatalog
from meshd.config import RoutingConfig
from meshd.errors import InvalidRequest, ModelNotFound, QueueFull
from meshd.routing import (
    CircuitBreakers,
    DataClassForbidden,
    DeadlineExceeded,
    Dispatcher,
    NoRoute,
    PeerFailed,
    ResumeImpossible,
    RouteFinished,
    Router,
)
from meshd.routing.router import FAILURE_PENALTY, LOCAL, score, speed_estimate

MODEL = "fake-model"
SHA = "a" * 64
OTHER_SHA = "b" * 64


# --- the FAKE backend and a fake mesh around it ---------------------------------------------


@dataclass
class FakeMeshBackend:
    """FAKE backend (routing tests only): emits ``t<i> `` for token i, resuming after resume_token_ids.

    ``mode``: "ok"; "fail" (PeerFailed before the first token); "stall" (never produces a token);
    "die" (PeerFailed after ``die_after`` tokens); "reject" (a 400 from the node itself).
    ``token_ids=False`` streams text without token ids (like an OpenAI-compatible upstream).
    """

    mode: str = "ok"
    total: int = 8
    die_after: int = 3
    sha256: str | None = SHA
    resume: bool = True
    token_ids: bool = True
    in_flight: int = 0
    queued: int = 0
    name: str = "fake"
    calls: list[GenerationRequest] = field(default_factory=list)
    closed: int = 0

    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(resume=self.resume)

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(MODEL, aliases=("fake",), state="ready", details={"sha256": self.sha256})]

    def load(self) -> BackendLoad:
        return BackendLoad(self.in_flight, self.queued)

    async def start(self) -> None:
        return None

    def generate(self, request: GenerationRequest) -> AsyncIterator[Any]:
        if self.mode == "full":
            raise QueueFull("fake queue full")
        self.calls.append(request)
        return self._run(request)

    async def _run(self, request: GenerationRequest) -> AsyncIterator[Any]:
        try:
            await asyncio.sleep(0)
            if self.mode == "fail":
                raise PeerFailed("fake peer failed before the first token")
            if self.mode == "reject":
                raise InvalidRequest("fake: prompt rejected")
            if self.mode == "stall":
                await asyncio.sleep(3600)
            start = len(request.resume_token_ids)
            for i in range(start, self.total):
                if self.mode == "die" and i - start >= self.die_after:
                    raise PeerFailed("fake peer died mid-stream")
                await asyncio.sleep(0)
                yield TextGenerated(f"t{i} ", (i,) if self.token_ids else ())
            yield GenerationFinished("length", 5, self.total)
        finally:
            self.closed += 1

    async def embed(self, request: Any) -> EmbeddingResult:
        return EmbeddingResult(((0.0,),), 1)

    async def close(self) -> None:
        return None


@dataclass
class FakeSession:
    established: bool = True
    peer_granted_roles: tuple[str, ...] | None = None


@dataclass
class FakeLink:
    node_id: Any
    session: FakeSession = field(default_factory=FakeSession)


@dataclass
class FakeRecord:
    name: str
    models: list[dict[str, Any]]
    load: dict[str, Any] = field(default_factory=dict)
    rtt_ms: float | None = None


class FakeTrust:
    def __init__(self) -> None:
        self.roles: dict[str, set[str]] = {}

    def allows(self, node_id: Any, role: str) -> bool:
        return role in self.roles.get(str(node_id), set())


class FakeMesh:
    def __init__(self) -> None:
        self.active: dict[Any, FakeLink] = {}
        self.records: dict[Any, FakeRecord] = {}
        self.trust = FakeTrust()
        self.table = self
        self.backends: dict[str, FakeMeshBackend] = {}

    def get(self, node_id: Any) -> FakeRecord | None:
        return self.records.get(node_id)

    def add(self, name: str, backend: FakeMeshBackend, *, rtt_ms: float | None = 5.0,
            load: dict[str, Any] | None = None, roles: set[str] | None = None) -> str:
        node_id = NodeKey.generate().node_id
        self.active[node_id] = FakeLink(node_id)
        model = {"id": MODEL, "aliases": ["fake"], "state": "ready", "sha256": backend.sha256,
                 "capabilities": backend.capabilities().names()}
        self.records[node_id] = FakeRecord(name, [model], dict(load or {}), rtt_ms)
        self.trust.roles[str(node_id)] = {"serve"} if roles is None else roles
        self.backends[str(node_id)] = backend
        return str(node_id)


class FakeMux:
    """Stands in for RequestMux on the entry side: 'forwards' to the peer's FakeMeshBackend."""

    def __init__(self, mesh: FakeMesh) -> None:
        self.mesh = mesh
        self.deadlines: list[float | None] = []

    def remote_generate(self, link: FakeLink, request: GenerationRequest, data_class: str,
                        deadline_s: float | None = None, verdict: bytes | None = None) -> AsyncIterator[Any]:
        self.deadlines.append(deadline_s)
        return self.mesh.backends[str(link.node_id)].generate(request)

    async def remote_embed(self, link: FakeLink, request: Any, data_class: str,
                           verdict: bytes | None = None) -> dict[str, Any]:
        return {"vectors": [[1.0]], "prompt_tokens": 1}


def make(local: FakeMeshBackend | None = None, max_queue: int = 4, **config: Any) -> tuple[Router, FakeMesh]:
    mesh = FakeMesh()
    catalog = ModelCatalog([local] if local is not None else [])
    return Router(RoutingConfig(**config), catalog, mesh, max_queue), mesh


def request(**params: Any) -> GenerationRequest:
    sampling = SamplingParams(**{"temperature": 0.0, "max_tokens": 8, **params})
    return GenerationRequest(model="fake", params=sampling, prompt="count", request_id="req-1")


async def collect(stream: AsyncIterator[Any]) -> tuple[str, list[Any]]:
    events = [e async for e in stream]
    return "".join(e.text for e in events if isinstance(e, TextGenerated)), events


UNINTERRUPTED = "".join(f"t{i} " for i in range(8))


# --- strategies and scores ------------------------------------------------------------------


def test_local_first_prefers_local_with_room_then_peers_by_score():
    router, mesh = make(FakeMeshBackend(in_flight=2))
    busy = mesh.add("busy", FakeMeshBackend(), load={"in_flight": 3, "queued": 1})
    idle = mesh.add("idle", FakeMeshBackend(), load={"in_flight": 0})
    decision = router.decide("fake", "internal")
    assert [c.target for c in decision.candidates] == [LOCAL, idle, busy]
    assert decision.chosen.model_id == MODEL and decision.strategy == "local-first"


def test_local_first_sends_a_full_local_queue_to_the_back():
    router, mesh = make(FakeMeshBackend(in_flight=1, queued=4), max_queue=4)
    peer = mesh.add("p", FakeMeshBackend())
    decision = router.decide("fake", "internal")
    assert [c.target for c in decision.candidates] == [peer, LOCAL]
    assert decision.candidates[-1].reason == "local queue full"


def test_least_loaded_and_lowest_latency():
    router, mesh = make(FakeMeshBackend(in_flight=3), strategy="least-loaded")
    near = mesh.add("near", FakeMeshBackend(), rtt_ms=1.0, load={"in_flight": 1})
    far = mesh.add("far", FakeMeshBackend(), rtt_ms=40.0, load={"in_flight": 0})
    assert [c.target for c in router.decide("fake", "internal").candidates] == [far, near, LOCAL]
    router.config = replace(router.config, strategy="lowest-latency")
    assert [c.target for c in router.decide("fake", "internal").candidates] == [LOCAL, near, far]


def test_tokens_per_s_scales_the_queue():
    router, mesh = make(strategy="least-loaded")
    slow = mesh.add("slow", FakeMeshBackend())
    fast = mesh.add("fast", FakeMeshBackend(), load={"in_flight": 1})
    pub = mesh.add("pub", FakeMeshBackend(), load={"tokens_per_s": 80})  # published only: a lower bound
    unknown = mesh.add("unknown", FakeMeshBackend(), load={"tokens_per_s": "n/a"})
    router.observe_throughput(slow, 10.0)
    router.observe_throughput(fast, 40.0)
    decision = router.decide("fake", "internal")
    by = {c.target: c for c in decision.candidates}
    # ref = median of the known rates [10, 40, 80] = 40
    assert by[fast].score == pytest.approx(2.0) and by[fast].speed_source == "measured"  # (1+1) * 40/40
    assert by[slow].score == pytest.approx(4.0)  # (0+1) * 40/10
    assert by[pub].score == pytest.approx(0.5) and by[pub].speed_source == "published"  # (0+1) * 40/80
    assert by[unknown].score == pytest.approx(1.0) and by[unknown].tokens_per_s is None
    assert [c.target for c in decision.candidates] == [pub, unknown, fast, slow]
    # a published rate is completions over the last minute: a mostly idle node publishes little,
    # which must not make it look slow
    mesh.records[next(k for k in mesh.records if str(k) == pub)].load = {"tokens_per_s": 2}
    assert {c.target: c.score for c in router.decide("fake", "internal").candidates}[pub] == pytest.approx(1.0)
    assert speed_estimate(10.0, 30) == (30.0, "measured") and speed_estimate(10.0, 0.0) == (10.0, "measured")
    assert speed_estimate(None, 0.0) == (None, None) and speed_estimate(None, True) == (None, None)


def test_speed_measured_here_is_used_when_a_node_publishes_none():
    router, mesh = make(FakeMeshBackend(), strategy="least-loaded")
    peer = mesh.add("p", FakeMeshBackend())
    router.observe_throughput(LOCAL, 10.0)
    router.observe_throughput(peer, 40.0)
    by = {c.target: c for c in router.decide("fake", "internal").candidates}
    assert by[LOCAL].tokens_per_s == 10.0 and by[peer].tokens_per_s == 40.0
    assert by[peer].score < by[LOCAL].score


def test_recent_failures_penalise_a_peer_with_a_closed_circuit():
    router, mesh = make(strategy="least-loaded")
    flaky = mesh.add("flaky", FakeMeshBackend(), rtt_ms=1.0)
    steady = mesh.add("steady", FakeMeshBackend(), rtt_ms=9.0, load={"in_flight": 1})
    router.breakers.failure(flaky, time.monotonic())
    by = {c.target: c for c in router.decide("fake", "internal").candidates}
    assert by[flaky].recent_failures == 1 and by[flaky].score == pytest.approx(1 + FAILURE_PENALTY)
    assert router.decide("fake", "internal").chosen.target == steady
    assert score(2, None, None, 0) == 3.0 and score(0, 10.0, 20.0, 1) == pytest.approx(2 + FAILURE_PENALTY)


# --- data classes and trust -----------------------------------------------------------------


def test_secret_stays_local_and_confidential_goes_only_to_flagged_peers():
    router, mesh = make(FakeMeshBackend())
    flagged = mesh.add("flagged", FakeMeshBackend())
    plain = mesh.add("plain", FakeMeshBackend())
    router.config = replace(router.config, confidential_peers=(flagged,))
    secret = router.decide("fake", "secret")
    assert [c.target for c in secret.candidates] == [LOCAL]
    assert {t for t, _ in secret.excluded} == {flagged, plain}
    confidential = router.decide("fake", "confidential")
    assert [c.target for c in confidential.candidates] == [LOCAL, flagged]
    assert any(t == plain and "confidential" in w for t, w in confidential.excluded)


def test_a_class_nobody_may_serve_is_refused_not_downgraded():
    router, mesh = make()
    mesh.add("p", FakeMeshBackend())
    with pytest.raises(DataClassForbidden):
        router.decide("fake", "secret")
    with pytest.raises(DataClassForbidden):
        router.decide("fake", "confidential")
    assert router.decide("fake", "public").chosen is not None
    with pytest.raises(ModelNotFound):
        router.decide("missing", "public")
    with pytest.raises(InvalidRequest):
        router.data_class("top-secret")
    assert router.data_class(None) == "internal"


def test_peers_without_serve_or_without_granting_use_are_excluded():
    router, mesh = make()
    untrusted = mesh.add("u", FakeMeshBackend(), roles={"use"})
    refusing = mesh.add("r", FakeMeshBackend())
    next(v for k, v in mesh.active.items() if str(k) == refusing).session.peer_granted_roles = ("cache",)
    with pytest.raises(NoRoute):
        router.decide("fake", "internal")
    good = mesh.add("g", FakeMeshBackend())
    decision = router.decide("fake", "internal")
    assert [c.target for c in decision.candidates] == [good]
    assert dict(decision.excluded) == {untrusted: "not trusted with serve", refusing: "does not grant us use"}


# --- circuit breakers -----------------------------------------------------------------------


def test_breaker_opens_cools_down_and_lets_one_probe_through():
    b = CircuitBreakers(threshold=2, cooldown_s=10, probe_timeout_s=30)
    b.failure("p", 0.0)
    assert b.allows("p", 0.1) and b.state("p", 0.1) == "closed"
    b.failure("p", 1.0)
    assert not b.allows("p", 5.0) and b.state("p", 5.0) == "open"
    assert b.allows("p", 11.0) and b.state("p", 11.0) == "half-open"
    assert b.allows("p", 11.0), "allows() must not take the probe slot"
    assert b.begin("p", 11.0) is True
    assert not b.allows("p", 12.0) and b.state("p", 12.0) == "probing"
    b.failure("p", 13.0)  # the probe failed: open again for a full cool-down
    assert b.state("p", 20.0) == "open" and b.state("p", 23.5) == "half-open"
    b.begin("p", 24.0)
    b.success("p")
    assert b.state("p", 24.0) == "closed" and b.allows("p", 24.0)
    assert b.recent_failures("p", 24.0) == 3 and b.recent_failures("p", 24.0 + b.window_s + 20) == 0


def test_breaker_probe_is_released_or_expires():
    b = CircuitBreakers(threshold=1, cooldown_s=5, probe_timeout_s=30)
    b.failure("p", 0.0)
    b.begin("p", 6.0)
    b.release("p")  # e.g. the client went away: no verdict, the slot is free again
    assert b.state("p", 6.5) == "half-open"
    b.begin("p", 7.0)  # a probe nobody ever ends...
    assert not b.allows("p", 36.0)
    assert b.allows("p", 37.5) and b.state("p", 37.5) == "half-open"  # ...expires
    assert b.begin("q", 0.0) is False and b.state("q", 0.0) == "closed"


def test_deciding_never_takes_a_half_open_peers_probe():
    """Regression: decide() used to set `probing` on a half-open peer even when it was not tried."""
    router, mesh = make(FakeMeshBackend(), breaker_threshold=1, breaker_cooldown_s=0.01)
    peer = mesh.add("p", FakeMeshBackend())
    router.breakers.failure(peer, time.monotonic())
    time.sleep(0.02)
    for _ in range(3):  # local wins each time; `meshctl route` previews the same way
        decision = router.decide("fake", "internal")
        assert decision.chosen.target == LOCAL and peer in [c.target for c in decision.candidates]
    assert router.breakers.state(peer, time.monotonic()) == "half-open"


# --- dispatcher: failover, deadlines, resume, events ----------------------------------------


def dispatcher(router: Router, mesh: FakeMesh) -> Dispatcher:
    return Dispatcher(router, FakeMux(mesh), mesh, "MESHD-SELF")


async def test_failover_before_the_first_token():
    router, mesh = make(strategy="lowest-latency")
    bad = mesh.add("bad", FakeMeshBackend(mode="fail"), rtt_ms=1.0)
    good = mesh.add("good", FakeMeshBackend(), rtt_ms=2.0)
    d = dispatcher(router, mesh)
    stream, trace = d.generate(request(), "internal")
    text, events = await collect(stream)
    assert text == UNINTERRUPTED and isinstance(events[-1], GenerationFinished)
    assert trace.attempts == [bad, good] and trace.failures == [(bad, "peer_unavailable")]
    assert trace.route_header() == f"peer:{bad[:15]} -> peer:{good[:15]}" and trace.node_header() == good
    assert router.breakers.recent_failures(bad, time.monotonic()) == 1
    finished = d.recent[-1]
    assert finished["event"] == "route_finished" and finished["outcome"] == "served"
    assert finished["failures"] == [{"target": bad, "error": "peer_unavailable"}]
    assert d.recent[-2]["event"] == "route_decided" and d.recent[-2]["chosen"]["target"] == bad


async def test_a_stalled_peer_is_abandoned_after_the_first_token_timeout():
    router, mesh = make(strategy="lowest-latency")
    router.first_token_timeout_s = 0.2
    stalled_backend = FakeMeshBackend(mode="stall")
    stalled = mesh.add("stalled", stalled_backend, rtt_ms=1.0)
    good = mesh.add("good", FakeMeshBackend(), rtt_ms=2.0)
    d = dispatcher(router, mesh)
    started = time.monotonic()
    stream, trace = d.generate(request(), "internal")
    text, _ = await collect(stream)
    assert text == UNINTERRUPTED and 0.2 <= time.monotonic() - started < 2
    assert trace.attempts == [stalled, good] and trace.failures == [(stalled, "attempt_timed_out")]
    assert stalled_backend.closed == 1  # the stalled stream was closed (a reset on the wire)
    # each forwarded request carries what is left of the request's deadline
    assert router.request_deadline_s - 1 < d.mux.deadlines[0] <= router.request_deadline_s
    assert d.mux.deadlines[1] < d.mux.deadlines[0]


async def test_the_request_deadline_bounds_the_last_candidate_too():
    router, mesh = make()
    mesh.add("stalled", FakeMeshBackend(mode="stall"))
    d = dispatcher(router, mesh)
    started = time.monotonic()
    stream, trace = d.generate(request(), "internal", deadline_s=0.3)
    with pytest.raises(DeadlineExceeded):
        await collect(stream)
    assert time.monotonic() - started < 2
    assert trace.outcome == "deadline_exceeded" and d.recent[-1]["outcome"] == "deadline_exceeded"


async def test_mid_stream_failure_resumes_on_the_same_identity():
    router, mesh = make(strategy="lowest-latency")
    dying = mesh.add("dying", FakeMeshBackend(mode="die", die_after=3), rtt_ms=1.0)
    other = mesh.add("other", FakeMeshBackend(sha256=OTHER_SHA), rtt_ms=2.0)
    same_backend = FakeMeshBackend()
    same = mesh.add("same", same_backend, rtt_ms=3.0)
    d = dispatcher(router, mesh)
    stream, trace = d.generate(request(), "internal")
    text, _ = await collect(stream)
    assert text == UNINTERRUPTED
    assert trace.attempts == [dying, same]
    assert trace.skipped == [(other, f"peer:{other[:15]} serves a different model identity")]
    assert same_backend.calls[0].resume_token_ids == (0, 1, 2) and same_backend.calls[0].resume_text == "t0 t1 t2 "


@pytest.mark.parametrize("first, second, why", [
    (None, SHA, "identity (file sha256) of the node that started the response is unknown"),
    (SHA, None, "does not publish its model identity"),
])
async def test_resume_is_impossible_without_a_known_identical_identity(first, second, why):
    router, mesh = make(strategy="lowest-latency")
    mesh.add("dying", FakeMeshBackend(mode="die", die_after=2, sha256=first), rtt_ms=1.0)
    spare_backend = FakeMeshBackend(sha256=second)
    mesh.add("spare", spare_backend, rtt_ms=2.0)
    d = dispatcher(router, mesh)
    stream, trace = d.generate(request(), "internal")
    seen: list[str] = []
    with pytest.raises(ResumeImpossible) as info:
        async for event in stream:
            seen.append(event.text)
    assert "".join(seen) == "t0 t1 " and why in info.value.message
    assert spare_backend.calls == []  # never asked to continue output it cannot reproduce
    assert d.recent[-1]["outcome"] == "resume_impossible"


async def test_resume_needs_token_ids_and_a_backend_that_can_resume():
    router, mesh = make(strategy="lowest-latency")
    mesh.add("dying", FakeMeshBackend(mode="die", die_after=3), rtt_ms=1.0)
    cannot = mesh.add("upstream", FakeMeshBackend(resume=False), rtt_ms=2.0)
    can = mesh.add("llama", FakeMeshBackend(), rtt_ms=3.0)
    stream, trace = dispatcher(router, mesh).generate(request(), "internal")
    assert (await collect(stream))[0] == UNINTERRUPTED
    assert trace.skipped == [(cannot, f"peer:{cannot[:15]}'s backend cannot resume a generation")]
    assert trace.attempts[-1] == can

    router, mesh = make(strategy="lowest-latency")
    mesh.add("dying", FakeMeshBackend(mode="die", die_after=2, token_ids=False), rtt_ms=1.0)
    spare = FakeMeshBackend()
    mesh.add("spare", spare, rtt_ms=2.0)
    stream, _ = dispatcher(router, mesh).generate(request(), "internal")
    with pytest.raises(ResumeImpossible, match="no token ids"):
        await collect(stream)
    assert spare.calls == []  # never restarted from scratch under text the client already has


async def test_seeded_sampling_cannot_be_resumed():
    router, mesh = make(strategy="lowest-latency")
    mesh.add("dying", FakeMeshBackend(mode="die", die_after=1), rtt_ms=1.0)
    mesh.add("spare", FakeMeshBackend(), rtt_ms=2.0)
    stream, _ = dispatcher(router, mesh).generate(request(temperature=0.7, seed=3), "internal")
    with pytest.raises(ResumeImpossible, match="seeded"):
        await collect(stream)


async def test_max_attempts_bounds_failover():
    router, mesh = make(strategy="lowest-latency", max_attempts=2)
    peers = [mesh.add(f"p{i}", FakeMeshBackend(mode="fail"), rtt_ms=float(i)) for i in range(3)]
    d = dispatcher(router, mesh)
    stream, trace = d.generate(request(), "internal")
    with pytest.raises(PeerFailed):
        await collect(stream)
    assert trace.attempts == peers[:2] and trace.skipped == [(peers[2], "max_attempts=2 reached")]


async def test_the_probe_is_taken_only_by_a_real_attempt_and_always_ended():
    router, mesh = make(breaker_threshold=1, breaker_cooldown_s=0.01)
    backend = FakeMeshBackend(mode="reject")
    peer = mesh.add("p", backend)
    router.breakers.failure(peer, time.monotonic())
    await asyncio.sleep(0.02)
    d = dispatcher(router, mesh)
    # a 4xx from the probed node: the node works, so the circuit closes
    stream, _ = d.generate(request(), "internal")
    with pytest.raises(InvalidRequest):
        await collect(stream)
    assert router.breakers.state(peer, time.monotonic()) == "closed"
    # the client goes away during a probe: the slot is freed, not leaked
    router.breakers.failure(peer, time.monotonic())
    await asyncio.sleep(0.02)
    backend.mode = "ok"
    stream, _ = d.generate(request(), "internal")
    await anext(stream)
    assert router.breakers.state(peer, time.monotonic()) == "probing"
    await stream.aclose()
    assert router.breakers.state(peer, time.monotonic()) == "half-open"
    assert d.recent[-1]["outcome"] == "cancelled"
    # a probe that completes closes the circuit
    stream, _ = d.generate(request(), "internal")
    assert (await collect(stream))[0] == UNINTERRUPTED
    assert router.breakers.state(peer, time.monotonic()) == "closed"


async def test_finished_events_reach_listeners_and_speed_is_measured():
    router, mesh = make(FakeMeshBackend())
    d = dispatcher(router, mesh)
    seen: list[Any] = []
    d.listeners.append(seen.append)
    stream, trace = d.generate(request(), "internal")
    async for event in stream:  # as the API does: stop at the final event, then close
        if isinstance(event, GenerationFinished):
            break
    await stream.aclose()
    finished = [e for e in seen if isinstance(e, RouteFinished)]
    assert finished[0].outcome == "served"
    assert len(finished) == 1 and finished[0].attempts == (LOCAL,) and finished[0].tokens == 8
    assert trace.node_header() == "MESHD-SELF" and trace.route_header() == "local"
    assert router.measured_throughput(LOCAL) is not None


async def test_local_queue_full_fails_over_to_a_peer_and_embeddings_route():
    router, mesh = make(FakeMeshBackend(mode="full"))
    peer = mesh.add("p", FakeMeshBackend())
    d = dispatcher(router, mesh)
    stream, trace = d.generate(request(), "internal")
    assert (await collect(stream))[0] == UNINTERRUPTED
    assert trace.attempts == [peer] and trace.failures == [(LOCAL, "queue_full")]
    from meshd.backends.base import EmbeddingRequest

    result, etrace = await d.embed(EmbeddingRequest("fake", ("x",)), "internal")
    assert result.vectors and etrace.attempts == [LOCAL] and d.recent[-1]["outcome"] == "served"

"""Which node serves a request: candidates, policy, scores, and the reason.

Pure decisions over a snapshot of the world (local models and load, the peer
table, live sessions, trust, breakers, measured speeds); no I/O and no side
effects, so ``meshctl route`` can preview a decision without changing anything.
Every decision carries the scored candidates and why each excluded node was
excluded, for the route header, the decision event and ``meshctl route``.

Scoring (lower is better; docs/routing.md has the rationale)::

    busy    = in_flight + queued
    speed   = clamp(ref_tps / tokens_per_s, 1/4, 4)    # 1 when tokens/s is unknown
    score   = (busy + 1) * speed + FAILURE_PENALTY * recent_failures

``tokens_per_s`` estimates the node's capacity (tokens/s it can produce): the
rate this node measured on its own streams from that node, raised to the rate
the node publishes (its completion tokens over the last minute, a lower bound
of its capacity: 0 when it was idle). A rate known only from the published
lower bound can show a node fast, never slow (its factor is at most 1).
``ref_tps`` is the median rate of the candidates of this decision that have
one, so a node measured twice as slow as its peers counts its queue twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from ..catalog import ModelCatalog
from ..config import DATA_CLASSES, RoutingConfig
from ..errors import MeshdError, ModelNotFound, ServiceUnavailable
from .breaker import CircuitBreakers

LOCAL = "local"

# Scoring constants (docs/routing.md); deadlines are routing.* settings in RoutingConfig.
FAILURE_PENALTY = 2.0  # one recent failure weighs like two queued requests
SPEED_CLAMP = 4.0
THROUGHPUT_EWMA = 0.3  # weight of the newest tokens/s measurement


class DataClassForbidden(MeshdError):
    status = 403
    type = "invalid_request_error"
    code = "data_class_forbidden"


class NoRoute(ServiceUnavailable):
    code = "no_route"


@dataclass(frozen=True)
class Candidate:
    target: str  # LOCAL or a peer's node id
    name: str
    model_id: str
    score: float
    reason: str
    rtt_ms: float | None = None
    load: dict[str, Any] = field(default_factory=dict)
    identity: str | None = None  # file sha256 when known: failover/resume need the same one
    tokens_per_s: float | None = None  # speed estimate; None = unknown
    speed_source: str | None = None  # "measured" (streams seen here), "published" (a lower bound only)
    recent_failures: int = 0
    features: tuple[str, ...] | None = None  # backend capabilities (e.g. "resume") when known

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "name": self.name, "model": self.model_id, "score": round(self.score, 3),
                "reason": self.reason, "rtt_ms": self.rtt_ms, "load": self.load, "identity": self.identity,
                "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 2),
                "speed_source": self.speed_source,
                "recent_failures": self.recent_failures,
                "capabilities": None if self.features is None else list(self.features)}


@dataclass(frozen=True)
class Decision:
    model: str
    data_class: str
    strategy: str
    candidates: tuple[Candidate, ...]
    excluded: tuple[tuple[str, str], ...]  # (target, why)
    at: float

    @property
    def chosen(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "data_class": self.data_class, "strategy": self.strategy,
                "chosen": self.chosen.to_dict() if self.chosen else None,
                "candidates": [c.to_dict() for c in self.candidates],
                "excluded": [{"target": t, "why": w} for t, w in self.excluded], "at": self.at}


def _matches(model: dict[str, Any], name: str) -> bool:
    return name == model.get("id") or name in (model.get("aliases") or ())


def _number(value: Any) -> float | None:
    """A positive finite number from a peer's load dict, else None (unknown)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if 0 < value < float("inf") else None


def _busy(load: dict[str, Any]) -> float:
    total = 0.0
    for key in ("in_flight", "queued"):
        value = load.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            total += float(value)
    return total


def score(busy: float, tokens_per_s: float | None, ref_tps: float | None, recent_failures: int,
          lower_bound: bool = False) -> float:
    """The candidate score (lower is better); see the module docstring.

    ``lower_bound``: ``tokens_per_s`` is only a lower bound of the node's speed (its published
    rate, with no stream measured here), so it may lower the score but never raise it.
    """
    speed = 1.0
    if tokens_per_s is not None and ref_tps is not None:
        speed = min(SPEED_CLAMP, max(1.0 / SPEED_CLAMP, ref_tps / tokens_per_s))
        if lower_bound:
            speed = min(speed, 1.0)
    return (busy + 1.0) * speed + FAILURE_PENALTY * recent_failures


def speed_estimate(measured: float | None, published: Any) -> tuple[float | None, str | None]:
    """(tokens/s, source) from this node's own measurement and the node's published rate."""
    floor = _number(published)
    if measured is not None:
        return (max(measured, floor) if floor is not None else measured), "measured"
    if floor is not None:
        return floor, "published"
    return None, None


class Router:
    def __init__(self, config: RoutingConfig, catalog: ModelCatalog, mesh: Any, max_queue: int) -> None:
        self.config = config
        self.catalog = catalog
        self.mesh = mesh  # MeshService or None
        self.breakers = CircuitBreakers(config.breaker_threshold, config.breaker_cooldown_s)
        self._max_queue = max_queue
        # Deadlines (seconds), from routing.* in the config; tests may set them on the router directly.
        self.first_token_timeout_s = config.first_token_timeout_s
        self.stall_timeout_s = config.stall_timeout_s
        self.request_deadline_s = config.request_deadline_s
        self.breakers.probe_timeout_s = max(self.breakers.probe_timeout_s, self.first_token_timeout_s)
        self._measured_tps: dict[str, float] = {}  # target -> EWMA of tokens/s seen by this node

    def observe_throughput(self, target: str, tokens_per_s: float) -> None:
        """A finished stream from ``target`` ran at this many tokens/s (measured at this node)."""
        if not tokens_per_s > 0:
            return
        old = self._measured_tps.get(target)
        self._measured_tps[target] = tokens_per_s if old is None else (
            THROUGHPUT_EWMA * tokens_per_s + (1 - THROUGHPUT_EWMA) * old)

    def measured_throughput(self, target: str) -> float | None:
        return self._measured_tps.get(target)

    def data_class(self, header: str | None) -> str:
        value = (header or self.config.default_data_class).strip().lower()
        if value not in DATA_CLASSES:
            from ..errors import InvalidRequest

            raise InvalidRequest(f"X-Meshd-Data-Class must be one of {', '.join(DATA_CLASSES)}, got {header!r}",
                                 param="X-Meshd-Data-Class", code="invalid_data_class")
        return value

    def _peer_allowed(self, node_id: str, data_class: str) -> str | None:
        """Why a peer may not receive this data class, or None."""
        if data_class == "secret":
            return "secret data never leaves this node"
        if data_class == "confidential" and node_id not in self.config.confidential_peers:
            return "not allowed confidential data (routing.confidential_peers)"
        return None

    def _local(self, name: str) -> list[tuple[Candidate, bool]]:
        """Local candidates and whether each has queue room (mirrors the backend's admission).

        Scores are filled in by ``_scored`` once every candidate's speed is known.
        """
        out = []
        for backend, info in self.catalog.models():
            if name != info.id and name not in info.aliases or info.state != "ready":
                continue
            load = backend.load()
            has_room = load.in_flight + load.queued <= self._max_queue
            published = getattr(load, "tokens_per_s", None)
            tps, source = speed_estimate(self.measured_throughput(LOCAL), published)
            reported = {"in_flight": load.in_flight, "queued": load.queued}
            if published is not None:
                reported["tokens_per_s"] = published
            features = backend.capabilities().names() if hasattr(backend, "capabilities") else None
            out.append((Candidate(LOCAL, "local", info.id, 0.0,
                                  "local model" if has_room else "local queue full", 0.0, reported,
                                  (info.details or {}).get("sha256"), tps, source,
                                  features=None if features is None else tuple(features)), has_room))
        return out

    def _scored(self, candidates: list[Candidate], now: float) -> list[Candidate]:
        known = sorted(c.tokens_per_s for c in candidates if c.tokens_per_s is not None)
        ref = known[len(known) // 2] if known else None
        out = []
        for c in candidates:
            failures = 0 if c.target == LOCAL else self.breakers.recent_failures(c.target, now)
            out.append(replace(c, score=score(_busy(c.load), c.tokens_per_s, ref, failures,
                                              lower_bound=c.speed_source == "published"),
                               recent_failures=failures))
        return out

    def decide(self, name: str, data_class: str, now: float | None = None) -> Decision:
        now = time.monotonic() if now is None else now
        excluded: list[tuple[str, str]] = []
        local = self._local(name)
        locals_ok = [c for c, ok in local if ok]
        locals_full = [c for c, ok in local if not ok]  # tried last: they answer 429 if nobody else can
        known_locally = False
        for _, info in self.catalog.models():
            if name == info.id or name in info.aliases:
                known_locally = True
                if info.state != "ready":
                    excluded.append((LOCAL, f"model {info.state}"))
        peers: list[Candidate] = []
        known_remotely = False
        if self.mesh is not None:
            for node_id, link in list(self.mesh.active.items()):
                record = self.mesh.table.get(node_id)
                models = [m for m in (record.models if record else []) if _matches(m, name)]
                if not models:
                    continue
                known_remotely = True
                target = str(node_id)
                session = link.session
                why = None
                if session is None or not session.established:
                    why = "not connected"
                elif not self.mesh.trust.allows(node_id, "serve"):
                    why = "not trusted with serve"
                elif session.peer_granted_roles and "use" not in session.peer_granted_roles:
                    # Only the dialling side learns the peer's grants (from its hello ack);
                    # otherwise a peer without `use` for us refuses the stream and we fail over.
                    why = "does not grant us use"
                elif models[0].get("state", "ready") != "ready":
                    why = f"model {models[0].get('state')}"
                elif not self.breakers.allows(target, now):
                    why = f"circuit {self.breakers.state(target, now)} after failures"
                else:
                    why = self._peer_allowed(target, data_class)
                if why:
                    excluded.append((target, why))
                    continue
                load = dict(record.load) if record else {}
                rtt = record.rtt_ms if record else None
                tps, source = speed_estimate(self.measured_throughput(target), load.get("tokens_per_s"))
                features = models[0].get("capabilities")
                peers.append(Candidate(target, record.name if record else "", models[0]["id"], 0.0,
                                       "trusted peer with the model", rtt, load, models[0].get("sha256"), tps,
                                       source, features=tuple(map(str, features))
                                       if isinstance(features, (list, tuple)) else None))
        if not local and not peers:
            if not known_locally and not known_remotely:
                raise ModelNotFound(f"The model '{name}' does not exist on this node or any connected peer",
                                    param="model")
            if data_class in ("secret", "confidential") and any(
                    "data" in why or "secret" in why for _, why in excluded):
                raise DataClassForbidden(
                    f"No node allowed to handle {data_class} data serves '{name}': "
                    + "; ".join(f"{t[:16]}: {w}" for t, w in excluded))
            raise NoRoute(f"No node can serve '{name}' now: " + "; ".join(f"{t[:16]}: {w}" for t, w in excluded),
                          retry_after=2)
        scored = self._scored([*locals_ok, *peers, *locals_full], now)
        locals_ok, peers, locals_full = (scored[:len(locals_ok)], scored[len(locals_ok):len(locals_ok) + len(peers)],
                                         scored[len(locals_ok) + len(peers):])
        ordered = self._order(locals_ok, peers) + locals_full
        return Decision(name, data_class, self.config.strategy, tuple(ordered), tuple(excluded), time.time())

    def _order(self, locals_ok: list[Candidate], peers: list[Candidate]) -> list[Candidate]:
        strategy = self.config.strategy

        def rtt(c: Candidate) -> float:
            return c.rtt_ms if c.rtt_ms is not None else 1e6

        if strategy == "lowest-latency":
            return sorted([*locals_ok, *peers], key=lambda c: (rtt(c), c.score))
        if strategy == "least-loaded":
            return sorted([*locals_ok, *peers], key=lambda c: (c.score, rtt(c)))
        # local-first: local while it has queue room, then peers by load and latency
        return [*locals_ok, *sorted(peers, key=lambda c: (c.score, rtt(c)))]


__all__ = ["Candidate", "DataClassForbidden", "Decision", "LOCAL", "NoRoute", "Router", "score", "speed_estimate"]

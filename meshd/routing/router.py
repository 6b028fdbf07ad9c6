"""Which node serves a request: candidates, policy, scores, and the reason.

Pure decisions over a snapshot of the world (local models and load, the peer
table, live sessions, trust, breakers); no I/O. Every decision carries the
scored candidates and why each excluded node was excluded, for the route
header, the decision event and ``meshctl route``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..catalog import ModelCatalog
from ..config import DATA_CLASSES, RoutingConfig
from ..errors import MeshdError, ModelNotFound, ServiceUnavailable
from .breaker import CircuitBreakers

LOCAL = "local"


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

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "name": self.name, "model": self.model_id, "score": round(self.score, 3),
                "reason": self.reason, "rtt_ms": self.rtt_ms, "load": self.load, "identity": self.identity}


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


class Router:
    def __init__(self, config: RoutingConfig, catalog: ModelCatalog, mesh: Any, max_queue: int) -> None:
        self.config = config
        self.catalog = catalog
        self.mesh = mesh  # MeshService or None
        self.breakers = CircuitBreakers(config.breaker_threshold, config.breaker_cooldown_s)
        self._max_queue = max_queue

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
        """Local candidates and whether each has queue room (mirrors the backend's admission)."""
        out = []
        for backend, info in self.catalog.models():
            if name != info.id and name not in info.aliases or info.state != "ready":
                continue
            load = backend.load()
            has_room = load.in_flight + load.queued <= self._max_queue
            out.append((Candidate(LOCAL, "local", info.id, float(load.in_flight + load.queued),
                                  "local model" if has_room else "local queue full", 0.0,
                                  {"in_flight": load.in_flight, "queued": load.queued},
                                  (info.details or {}).get("sha256")), has_room))
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
                busy = float(load.get("in_flight", 0)) + float(load.get("queued", 0))
                rtt = record.rtt_ms if record else None
                peers.append(Candidate(target, record.name if record else "", models[0]["id"], busy,
                                       "trusted peer with the model", rtt, load, models[0].get("sha256")))
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


__all__ = ["Candidate", "DataClassForbidden", "Decision", "LOCAL", "NoRoute", "Router"]

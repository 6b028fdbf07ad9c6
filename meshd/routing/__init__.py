"""Routing: which node serves a request, forwarding to it, and failing over."""

from .breaker import CircuitBreakers
from .dispatch import (
    AttemptTimedOut,
    DeadlineExceeded,
    Dispatcher,
    ResumeImpossible,
    RouteDecided,
    RouteFinished,
    RouteTrace,
)
from .forward import DeadlineMissed, PeerFailed, RequestMux
from .router import Candidate, DataClassForbidden, Decision, NoRoute, Router

__all__ = [
    "AttemptTimedOut",
    "Candidate",
    "CircuitBreakers",
    "DataClassForbidden",
    "DeadlineExceeded",
    "DeadlineMissed",
    "Decision",
    "Dispatcher",
    "NoRoute",
    "PeerFailed",
    "RequestMux",
    "ResumeImpossible",
    "RouteDecided",
    "RouteFinished",
    "Router",
    "RouteTrace",
]

"""Routing: which node serves a request, forwarding to it, and failing over."""

from .dispatch import Dispatcher, ResumeImpossible, RouteTrace
from .forward import PeerFailed, RequestMux
from .router import Candidate, DataClassForbidden, Decision, NoRoute, Router

__all__ = [
    "Candidate",
    "DataClassForbidden",
    "Decision",
    "Dispatcher",
    "NoRoute",
    "PeerFailed",
    "RequestMux",
    "ResumeImpossible",
    "Router",
    "RouteTrace",
]

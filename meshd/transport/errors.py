"""The transport's error family: configuration and engine problems, each with a stable code.

Errors on a live connection are not exceptions here: they reach the session
as QUIC events (``ConnectionTerminated``, ``StreamReset``) and from there the
protocol's own error codes.
"""

from __future__ import annotations


class TransportError(Exception):
    """Base of every error raised by ``meshd.transport``."""

    code: str = "transport_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidTransportSettings(TransportError, ValueError):
    """A setting (or its environment override) is out of range or unknown."""

    code = "invalid_transport_settings"


class EngineUnavailable(TransportError):
    """The requested QUIC engine is not installed, or cannot do what the mesh needs."""

    code = "quic_engine_unavailable"


__all__ = ["EngineUnavailable", "InvalidTransportSettings", "TransportError"]

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
    """A setting is out of range or unknown, or names an engine this process cannot run.

    ``setting`` is the ``EngineSettings`` field at fault (the message starts
    with it), so configuration layers can name their own key instead.
    """

    code = "invalid_transport_settings"

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(f"{setting}: {message}" if setting else message)
        self.setting = setting
        self.reason = message  # without the setting's name


class EngineUnavailable(TransportError):
    """The requested QUIC engine is not installed, or cannot do what the mesh needs."""

    code = "quic_engine_unavailable"


__all__ = ["EngineUnavailable", "InvalidTransportSettings", "TransportError"]

"""Configuration and injected policy for a ``PeerSession``.

The session asks two questions it cannot answer itself, both injected so it
can be tested without the trust store or the identity library: which roles
this node grants a peer (``TrustCheck``), and whether a capability
announcement is authentic (``CapabilityVerifier``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .frames import PROTOCOL_VERSION
from .framing import DEFAULT_MAX_FRAME_SIZE

ROLES = ("serve", "use", "cache", "tensor")
TrustCheck = Callable[[str, str], bool]
"""``is_trusted(node_id, role)``: does this node grant ``role`` to ``node_id``?"""
CapabilityVerifier = Callable[[bytes, str, float], dict[str, Any]]
"""``verify(signed_record, peer_node_id, now)``: the announcement's payload, or raise.

``now`` is the session clock (usually monotonic); a verifier that checks
record expiry against wall-clock time reads the wall clock itself."""


@dataclass(frozen=True, slots=True)
class SessionConfig:
    protocol_version: int = PROTOCOL_VERSION
    software: str = "meshd"
    heartbeat_interval: float = 5.0
    peer_timeout: float = 15.0  # silence after which the peer is reported down
    handshake_timeout: float = 10.0
    close_linger: float = 2.0  # how long a final frame gets to reach the peer
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_control_frame_size: int = 256 * 1024
    max_peer_streams: int = 256
    send_buffer_limit: int = 8 * 1024 * 1024  # per stream
    send_buffer_high_watermark: int = 1024 * 1024
    send_buffer_low_watermark: int = 256 * 1024
    early_stream_budget: int = 256 * 1024  # peer stream bytes held until the handshake completes

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.peer_timeout:
            raise ValueError("need 0 < heartbeat_interval < peer_timeout")
        if self.handshake_timeout <= 0 or self.close_linger < 0:
            raise ValueError("handshake_timeout must be positive and close_linger not negative")
        if self.max_frame_size <= 0 or self.max_control_frame_size <= 0 or self.max_peer_streams <= 0:
            raise ValueError("frame sizes and max_peer_streams must be positive")
        if not 0 <= self.send_buffer_low_watermark <= self.send_buffer_high_watermark <= self.send_buffer_limit:
            raise ValueError("need 0 <= send_buffer_low_watermark <= send_buffer_high_watermark <= send_buffer_limit")
        if self.early_stream_budget < 0:
            raise ValueError("early_stream_budget must not be negative")


class SessionState(enum.Enum):
    HANDSHAKE = "handshake"
    ESTABLISHED = "established"
    CLOSING = "closing"  # our final frame is queued; waiting for the peer to close
    CLOSED = "closed"


def trust_roles(roles: Iterable[str]) -> TrustCheck:
    """A trust check granting the same fixed roles to any peer (tests, static setups)."""
    granted = frozenset(roles)
    return lambda node_id, role: role in granted


__all__ = ["ROLES", "CapabilityVerifier", "SessionConfig", "SessionState", "TrustCheck", "trust_roles"]

"""Transport settings: one frozen dataclass, passed down to the engine and the UDP socket.

The design keeps environment reading in ``cli/``; until ``meshd/config.py``
has ``mesh.engine`` and ``mesh.max_datagram_size``, the defaults of the two
settings an operator needs before that come from ``MESHD_QUIC_ENGINE``
(aioquic | qh3 | auto) and ``MESHD_QUIC_MAX_DATAGRAM_SIZE``, read here and
nowhere else. Every other field is a plain default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import InvalidTransportSettings

ALPN = "meshd/1"
CONNECTION_ID_LENGTH = 8
ENGINE_CHOICES = ("auto", "aioquic", "qh3")

ENV_ENGINE = "MESHD_QUIC_ENGINE"
ENV_MAX_DATAGRAM_SIZE = "MESHD_QUIC_MAX_DATAGRAM_SIZE"

# RFC 9000 14: every QUIC path carries 1200-byte datagrams; 1452 fits a
# 1500-byte Ethernet MTU over IPv6 (1500 - 40 - 8); 65527 is UDP's ceiling.
MIN_DATAGRAM_SIZE = 1200
DEFAULT_DATAGRAM_SIZE = 1452
MAX_DATAGRAM_SIZE = 65527


def engine_choice_from_env() -> str:
    choice = os.environ.get(ENV_ENGINE, "auto").strip().lower() or "auto"
    if choice not in ENGINE_CHOICES:
        raise InvalidTransportSettings(f"{ENV_ENGINE}={choice!r}: expected one of {', '.join(ENGINE_CHOICES)}")
    return choice


def _datagram_size_from_env() -> int:
    raw = os.environ.get(ENV_MAX_DATAGRAM_SIZE, "").strip()
    if not raw:
        return DEFAULT_DATAGRAM_SIZE
    try:
        return int(raw)
    except ValueError:
        raise InvalidTransportSettings(f"{ENV_MAX_DATAGRAM_SIZE}={raw!r} is not an integer") from None


def _default_engine() -> str:
    from .engine import DEFAULT_ENGINE  # the import-time choice (engine.py)

    return DEFAULT_ENGINE.name


@dataclass(frozen=True)
class EngineSettings:
    # "aioquic" or "qh3"; by default the engine chosen at import (engine.DEFAULT_ENGINE).
    engine: str = field(default_factory=_default_engine)
    # Largest QUIC datagram (UDP payload) this node sends; both ends use their own.
    # 1452 suits Ethernet; 8952 suits jumbo frames (MTU 9000) or loopback.
    max_datagram_size: int = field(default_factory=_datagram_size_from_env)
    idle_timeout_s: float = 30.0
    # Flow-control windows we grant the peer. Loopback and LAN bandwidth-delay
    # products are far below these; they are sized so a tensor stream never
    # waits for credit while the receiver keeps up (memory is bounded by them).
    max_data: int = 32 * 1024 * 1024  # connection
    max_stream_data: int = 16 * 1024 * 1024  # per stream
    # Requested SO_RCVBUF / SO_SNDBUF. Linux caps these at net.core.{r,w}mem_max
    # unless the process may use SO_*BUFFORCE; the endpoint reports what it got.
    udp_buffer_bytes: int = 8 * 1024 * 1024
    # Batched UDP I/O (recvmmsg + GRO, sendmsg + GSO) where available (Linux, qh3's
    # quinn-udp binding, usable with either engine); plain recvfrom/sendto otherwise.
    batch_io: bool = True
    # Path MTU probing above max_datagram_size (qh3 only; aioquic sends a fixed size).
    pmtu_probe: bool = False
    # aioquic only ("reno" or "cubic"); qh3 uses its native controller.
    congestion_control: str = "reno"

    def __post_init__(self) -> None:
        if self.engine not in ENGINE_CHOICES[1:]:
            raise InvalidTransportSettings(f"engine {self.engine!r}: expected aioquic or qh3")
        if not MIN_DATAGRAM_SIZE <= self.max_datagram_size <= MAX_DATAGRAM_SIZE:
            raise InvalidTransportSettings(
                f"max_datagram_size {self.max_datagram_size}: expected {MIN_DATAGRAM_SIZE}..{MAX_DATAGRAM_SIZE}")
        if self.max_stream_data <= 0 or self.max_data < self.max_stream_data:
            raise InvalidTransportSettings("need 0 < max_stream_data <= max_data")
        if self.idle_timeout_s <= 0 or self.udp_buffer_bytes <= 0:
            raise InvalidTransportSettings("idle_timeout_s and udp_buffer_bytes must be positive")


__all__ = [
    "ALPN",
    "CONNECTION_ID_LENGTH",
    "DEFAULT_DATAGRAM_SIZE",
    "ENGINE_CHOICES",
    "ENV_ENGINE",
    "ENV_MAX_DATAGRAM_SIZE",
    "EngineSettings",
    "engine_choice_from_env",
]

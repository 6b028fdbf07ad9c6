"""Transport settings: one frozen dataclass, passed down to the engine and the UDP socket.

Every field is a plain default here; operators set them through ``[mesh]`` in
the daemon's configuration (``meshd/config.py``, which also maps
``MESHD_QUIC_ENGINE`` and ``MESHD_QUIC_MAX_DATAGRAM_SIZE``), and
``meshd.mesh.service.engine_settings`` builds an ``EngineSettings`` from it.
The transport reads no environment.

A settings object names an engine this process can run: asking for qh3 when
it is not installed (or fails its self-test) is an ``InvalidTransportSettings``
at construction, so a daemon fails at start-up with the reason instead of at
its first connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import EngineUnavailable, InvalidTransportSettings

ALPN = "meshd/1"
CONNECTION_ID_LENGTH = 8
ENGINE_CHOICES = ("auto", "aioquic", "qh3")

# RFC 9000 14: every QUIC path carries 1200-byte datagrams; 1452 fits a
# 1500-byte Ethernet MTU over IPv6 (1500 - 40 - 8); 65527 is UDP's ceiling.
MIN_DATAGRAM_SIZE = 1200
DEFAULT_DATAGRAM_SIZE = 1452
MAX_DATAGRAM_SIZE = 65527

DEFAULT_MAX_DATA = 32 * 1024 * 1024
DEFAULT_MAX_STREAM_DATA = 16 * 1024 * 1024
DEFAULT_UDP_BUFFER_BYTES = 8 * 1024 * 1024
DEFAULT_BUSY_POLL_US = 300
MAX_BUSY_POLL_US = 100_000


def _default_engine() -> str:
    from .engine import DEFAULT_ENGINE  # the import-time choice (engine.py)

    return DEFAULT_ENGINE.name


@dataclass(frozen=True)
class EngineSettings:
    # "aioquic" or "qh3"; by default the engine chosen at import (engine.DEFAULT_ENGINE).
    engine: str = field(default_factory=_default_engine)
    # Largest QUIC datagram (UDP payload) this node sends; both ends use their own.
    # 1452 suits Ethernet; 8952 suits jumbo frames (MTU 9000) or loopback.
    max_datagram_size: int = DEFAULT_DATAGRAM_SIZE
    idle_timeout_s: float = 30.0
    # Flow-control windows we grant the peer. Loopback and LAN bandwidth-delay
    # products are far below these; they are sized so a tensor stream never
    # waits for credit while the receiver keeps up (memory is bounded by them).
    max_data: int = DEFAULT_MAX_DATA  # connection
    max_stream_data: int = DEFAULT_MAX_STREAM_DATA  # per stream
    # Requested SO_RCVBUF / SO_SNDBUF. Linux caps these at net.core.{r,w}mem_max
    # unless the process may use SO_*BUFFORCE; the endpoint reports what it got.
    udp_buffer_bytes: int = DEFAULT_UDP_BUFFER_BYTES
    # Batched UDP I/O (recvmmsg + GRO, sendmsg + GSO) where available (Linux, qh3's
    # quinn-udp binding, usable with either engine); plain recvfrom/sendto otherwise.
    batch_io: bool = True
    # Path MTU probing above max_datagram_size (qh3 only; aioquic sends a fixed size).
    pmtu_probe: bool = False
    # Keep the loop polling (not sleeping) this long after a datagram comes or goes
    # (busypoll.py): a request's answer then meets a running process. 0 = off.
    busy_poll_us: int = DEFAULT_BUSY_POLL_US
    # aioquic only ("reno" or "cubic"); qh3 uses its native controller.
    congestion_control: str = "reno"

    def __post_init__(self) -> None:
        if self.engine not in ENGINE_CHOICES[1:]:
            raise InvalidTransportSettings(f"{self.engine!r}: expected aioquic or qh3", setting="engine")
        if not MIN_DATAGRAM_SIZE <= self.max_datagram_size <= MAX_DATAGRAM_SIZE:
            raise InvalidTransportSettings(
                f"{self.max_datagram_size}: expected {MIN_DATAGRAM_SIZE}..{MAX_DATAGRAM_SIZE}",
                setting="max_datagram_size")
        if self.max_stream_data <= 0:
            raise InvalidTransportSettings(f"{self.max_stream_data}: must be positive", setting="max_stream_data")
        if self.max_data < self.max_stream_data:
            raise InvalidTransportSettings(
                f"{self.max_data}: must be at least max_stream_data ({self.max_stream_data})", setting="max_data")
        if self.idle_timeout_s <= 0:
            raise InvalidTransportSettings(f"{self.idle_timeout_s}: must be positive", setting="idle_timeout_s")
        if self.udp_buffer_bytes <= 0:
            raise InvalidTransportSettings(f"{self.udp_buffer_bytes}: must be positive", setting="udp_buffer_bytes")
        if not 0 <= self.busy_poll_us <= MAX_BUSY_POLL_US:
            raise InvalidTransportSettings(f"{self.busy_poll_us}: expected 0..{MAX_BUSY_POLL_US}",
                                           setting="busy_poll_us")
        if self.congestion_control not in ("reno", "cubic"):
            raise InvalidTransportSettings(f"{self.congestion_control!r}: expected reno or cubic",
                                           setting="congestion_control")
        from .engine import load_engine  # engine.py imports this module

        try:
            load_engine(self.engine)  # cached after the first success
        except EngineUnavailable as exc:
            raise InvalidTransportSettings(exc.message, setting="engine") from exc


__all__ = [
    "ALPN",
    "CONNECTION_ID_LENGTH",
    "DEFAULT_BUSY_POLL_US",
    "DEFAULT_DATAGRAM_SIZE",
    "DEFAULT_MAX_DATA",
    "DEFAULT_MAX_STREAM_DATA",
    "DEFAULT_UDP_BUFFER_BYTES",
    "ENGINE_CHOICES",
    "EngineSettings",
]

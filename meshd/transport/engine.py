"""The QUIC engine seam: everything meshd takes from aioquic comes through here.

aioquic's ``QuicConnection`` is already sans-IO; meshd runs its own UDP
endpoint around it (endpoint.py) so that it controls connection creation
(mutual TLS), timers and batching. Swapping in another engine with the same
API shape (qh3) means changing this module only.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import PACKET_TYPE_INITIAL, QuicProtocolVersion, pull_quic_header

ALPN = "meshd/1"
ENGINE_NAME = "aioquic"
CONNECTION_ID_LENGTH = 8


@dataclass(frozen=True)
class EngineSettings:
    max_datagram_size: int = 1452
    idle_timeout_s: float = 30.0
    max_data: int = 16 * 1024 * 1024  # connection-level flow-control window
    max_stream_data: int = 8 * 1024 * 1024  # per-stream window


class MeshQuicConnection(QuicConnection):
    """A QuicConnection whose server side asks the client for its certificate.

    aioquic supports mutual TLS but only exposes the switch on its TLS context,
    which exists once the first packet is handled; we flip it right there.
    The TLS layer verifies the CertificateVerify signature (possession of the
    key); meshd then checks that the certificate proves the claimed node id.
    """

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            self.tls._request_client_certificate = True

    def peer_certificate(self) -> Any:
        tls = getattr(self, "tls", None)
        return None if tls is None else tls._peer_certificate


def make_configuration(*, is_client: bool, certificate: Any, private_key: Any,
                       settings: EngineSettings) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        # No CA: peers are self-signed, and the node-id check replaces the
        # chain check (identity.node_id_from_certificate).
        verify_mode=ssl.CERT_NONE,
        idle_timeout=settings.idle_timeout_s,
        max_datagram_size=settings.max_datagram_size,
        max_data=settings.max_data,
        max_stream_data=settings.max_stream_data,
        connection_id_length=CONNECTION_ID_LENGTH,
    )
    config.certificate = certificate
    config.private_key = private_key
    return config


def stream_buffered(quic: QuicConnection, stream_id: int) -> int:
    """Bytes aioquic holds for a stream that the peer has not acknowledged yet."""
    stream = quic._streams.get(stream_id)
    return 0 if stream is None else len(stream.sender._buffer)


def is_initial_packet(data: bytes) -> tuple[bool, bytes | None]:
    """(is a v1 Initial packet, its destination connection id) for an unknown datagram."""
    try:
        header = pull_quic_header(Buffer(data=data), host_cid_length=CONNECTION_ID_LENGTH)
    except ValueError:
        return False, None
    if header.version != QuicProtocolVersion.VERSION_1 or header.packet_type != PACKET_TYPE_INITIAL:
        return False, header.destination_cid
    return True, header.destination_cid


def destination_cid(data: bytes) -> bytes | None:
    try:
        return pull_quic_header(Buffer(data=data), host_cid_length=CONNECTION_ID_LENGTH).destination_cid
    except ValueError:
        return None


__all__ = [
    "ALPN",
    "ENGINE_NAME",
    "EngineSettings",
    "MeshQuicConnection",
    "destination_cid",
    "events",
    "is_initial_packet",
    "make_configuration",
    "stream_buffered",
]

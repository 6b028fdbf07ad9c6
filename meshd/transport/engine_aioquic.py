"""The aioquic engine (pure Python QUIC; the design's reference engine).

aioquic's ``QuicConnection`` is sans-IO and does everything the mesh needs:
mutual TLS is there but switched on only through its TLS context, which
exists once the first packet is handled; ``AioquicConnection`` flips it
right there.
"""

from __future__ import annotations

import ssl
from typing import Any

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from identity import TlsIdentity

from .settings import ALPN, CONNECTION_ID_LENGTH, EngineSettings

NAME = "aioquic"


class AioquicConnection(QuicConnection):
    """A QuicConnection whose server side asks the client for its certificate.

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

    def stream_backlog(self, stream_id: int) -> int:
        """Bytes held for a stream that the peer has not acknowledged yet."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else len(stream.sender._buffer)

    def stream_data_queued(self) -> bool:
        """Whether any stream has data (or a FIN) it has not sent yet."""
        return any(not stream.sender.buffer_is_empty for stream in self._streams.values())

    def receive_datagrams(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        for data in datagrams:
            self.receive_datagram(data, addr, now)


class AioquicEngine:
    name = NAME
    events = events

    def configuration(self, tls: TlsIdentity, settings: EngineSettings, *, is_client: bool) -> QuicConfiguration:
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
            congestion_control_algorithm=settings.congestion_control,
        )
        config.certificate = tls.certificate
        config.private_key = tls.private_key
        return config

    def connect(self, configuration: QuicConfiguration, addr: tuple[str, int], now: float) -> AioquicConnection:
        quic = AioquicConnection(configuration=configuration)
        quic.connect(addr, now=now)
        return quic

    def accept(self, configuration: QuicConfiguration, original_cid: bytes) -> AioquicConnection:
        return AioquicConnection(configuration=configuration, original_destination_connection_id=original_cid)


__all__ = ["NAME", "AioquicConnection", "AioquicEngine"]

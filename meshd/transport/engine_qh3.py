"""The qh3 engine: an aioquic fork with a Rust packet core (aws-lc-rs crypto, native pacing).

Same sans-IO API shape as aioquic. What meshd adds on top:

* mutual TLS: qh3's server never requests a client certificate;
  ``qh3_tls.ClientAuthServerContext`` adds that, installed on every server
  connection's TLS context as qh3 creates it;
* Ed25519 only: qh3 leaves EdDSA out of its default signature algorithms, and
  node certificates are Ed25519, so both sides offer exactly Ed25519;
* certificates and keys in qh3's own types (it refuses ``cryptography`` ones);
* the client's ``max_udp_payload_size`` transport parameter, which qh3 pins to
  1472, follows ``max_datagram_size`` so a jumbo-frame peer may send jumbo
  datagrams back;
* concurrent streams: qh3 fixes the peer's bidirectional stream limit at 100;
  a session admits up to ``SessionConfig.max_peer_streams`` (256) and aioquic
  allows 128, so qh3 connections are built with ``MAX_STREAMS`` (256) in
  both the native core and the transport parameters;
* padded Initials: aioquic pads a client's first datagram with zeros *after*
  its Initial packet (RFC 9000 14.1 allows it). qh3 feeds its core one packet
  at a time, so the server credits only the packet, not the datagram, to its
  anti-amplification budget (RFC 9000 8.1 counts datagrams); 3 x ~500 bytes
  is less than its first flight, and qh3 2.1 then raises "packet builder
  capacity exhausted" instead of waiting. ``Qh3Connection`` hands such a
  datagram to the core whole, so the budget is right and aioquic nodes can
  dial qh3 nodes.

``self_test()`` runs a complete mutual handshake in memory; the engine is
offered only if it passes (engine.py), because the points above lean on qh3
internals that a new release could move.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from typing import Any

import qh3
from cryptography.hazmat.primitives import serialization
import qh3.quic.connection as qh3_connection
from qh3 import tls as qtls
from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3._hazmat import pull_quic_header
from qh3.quic.packet import QuicErrorCode, pull_quic_transport_parameters, push_quic_transport_parameters

from identity import TlsIdentity

from .packets import is_initial
from .qh3_tls import ED25519, ClientAuthServerContext
from .settings import ALPN, CONNECTION_ID_LENGTH, EngineSettings

NAME = "qh3"
VERSION = qh3.__version__
# qh3 2.x: Rust packet core (QuicConnectionCore) behind the Python facade.
MIN_VERSION = (2, 1)
MAX_STREAMS = 256  # concurrent bidirectional (and unidirectional) streams a peer may open
_CORE = qh3_connection.QuicConnectionCore
_CORE_PARAMETERS = [name.strip() for name in (_CORE.__text_signature__ or "()").strip("()").split(",")]


class Qh3Connection(QuicConnection):
    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        end = None
        if self._core is None and not self._is_client:
            end = _padded_initial_end(data)
        if end is None:
            super().receive_datagram(data, addr, now)
            return
        # The first datagram of an inbound connection: one Initial packet, then
        # zeros (see the module docstring). qh3's own first-datagram setup,
        # then the core gets the whole datagram: it processes the packet,
        # drops the padding, and credits every byte to the amplification budget.
        header = pull_quic_header(data, 0, CONNECTION_ID_LENGTH)
        self._remote_addr = self._normalize_address(addr)
        self._version = header[0]
        self._create_core(self._remote_addr, header[3], now)
        self._create_tls(remote_source_cid=None)
        self._call_core(self._core.receive_datagram, data, self._remote_addr, now, len(data))
        self._learn_remote_source_cid(data[:end])
        self._drain_core()

    def _create_core(self, remote_addr: Any, initial_dcid: bytes, now: float) -> None:
        with _stream_limits(MAX_STREAMS):
            super()._create_core(remote_addr, initial_dcid, now)

    def _create_tls(self, remote_source_cid: bytes | None) -> Any:
        bridge = super()._create_tls(remote_source_cid)
        changes: dict[str, int] = {"initial_max_streams_bidi": MAX_STREAMS, "initial_max_streams_uni": MAX_STREAMS}
        if self._is_client:
            changes["max_udp_payload_size"] = max(self._configuration.max_datagram_size, 1472)
        else:
            bridge.tls.__class__ = ClientAuthServerContext
        _rewrite_transport_parameters(bridge, changes)
        return bridge

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        # qh3's own loop parses every outgoing packet's header for its qlog
        # trace even when there is no logger: ~40% of the sender's time in a
        # bulk transfer. Without a logger, poll the core directly.
        if self._quic_logger is not None or self._core is None:
            return super().datagrams_to_send(now)
        poll = self._core.poll_transmit
        datagrams = []
        try:
            while (transmit := poll(now)) is not None:
                datagrams.append((transmit[0], transmit[1]))
        except RuntimeError as exc:
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
        return datagrams

    def peer_certificate(self) -> bytes | None:
        """The peer's certificate (DER), once TLS has seen it."""
        certificate = self.get_peercert()
        return None if certificate is None else certificate.public_bytes()

    def stream_backlog(self, stream_id: int) -> int:
        """Bytes queued for a stream and not yet sent once (qh3 keeps sent bytes natively)."""
        try:
            return self.get_send_buffer_size(stream_id)
        except ValueError:
            return 0

    def stream_data_queued(self) -> bool:
        """Whether any stream has bytes waiting for their first transmission."""
        core = self._core
        return core is None or core.get_send_buffer_size(None) > 0

    def send_stream_data(self, stream_id: int, data: Any, end_stream: bool = False) -> None:
        # Established, on a stream qh3 already knows we opened or the peer did:
        # straight to the native core (qh3's facade re-checks the handshake,
        # records the stream and wraps the call, ~3 µs a message). Anything
        # else (a new local stream, before the handshake) goes through qh3.
        core = self._core
        if (core is None or not self._handshake_complete or type(data) is not bytes
                or ((stream_id & 1) == (0 if self._is_client else 1)
                    and stream_id not in self._created_local_stream_ids)):
            super().send_stream_data(stream_id, data, end_stream)
            return
        try:
            core.send_stream(stream_id, data, end_stream)
        except RuntimeError as exc:
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc

    def receive_datagrams(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        # Established and not tracing: straight to the native core. qh3's own
        # receive_many_datagrams adds a trace call per datagram and a wrapper per
        # core call; for a control message that is a measurable share of the
        # receive path. Everything else (handshake, a qlog) goes through qh3.
        core = self._core
        if core is None or not self._handshake_complete or self._quic_logger is not None:
            self.receive_many_datagrams(datagrams, addr, now)
            return
        try:
            core.receive_many_datagrams(datagrams, self._normalize_address(addr), now)
        except RuntimeError as exc:
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
        self._drain_core()


def _padded_initial_end(data: bytes) -> int | None:
    """Where the packet ends if ``data`` is one QUIC v1 Initial packet followed by zeros, else None."""
    if len(data) < 1200 or not is_initial(data):
        return None
    try:
        end = pull_quic_header(data, 0, CONNECTION_ID_LENGTH)[9]
    except ValueError:
        return None
    if not 0 < end < len(data) or data.count(0, end) != len(data) - end:
        return None
    return end


@contextlib.contextmanager
def _stream_limits(limit: int) -> Iterator[None]:
    """While qh3 builds a connection's native core, give it our local stream limits.

    qh3 passes literal limits to ``QuicConnectionCore``; the constructor is
    swapped for one synchronous call (the event loop's thread builds cores).
    """
    indexes = [_CORE_PARAMETERS.index(name) for name in ("local_max_streams_bidi", "local_max_streams_uni")]

    def core(*args: Any) -> Any:
        values = list(args)
        for index in indexes:
            values[index] = limit
        return _CORE(*values)

    qh3_connection.QuicConnectionCore = core
    try:
        yield
    finally:
        qh3_connection.QuicConnectionCore = _CORE


def _rewrite_transport_parameters(bridge: Any, changes: dict[str, int]) -> None:
    extensions = bridge.tls.handshake_extensions
    for index, (kind, data) in enumerate(extensions):
        if kind == qtls.ExtensionType.QUIC_TRANSPORT_PARAMETERS:
            parameters = pull_quic_transport_parameters(qtls.Buffer(data=data))
            for name, value in changes.items():
                setattr(parameters, name, value)
            buf = qtls.Buffer(capacity=4096)
            push_quic_transport_parameters(buf, parameters)
            extensions[index] = (kind, buf.data)
            return


class Qh3Engine:
    name = NAME
    events = events

    def configuration(self, tls: TlsIdentity, settings: EngineSettings, *, is_client: bool) -> QuicConfiguration:
        config = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            verify_mode=ssl.CERT_NONE,  # self-signed; the node-id check replaces the chain check
            verify_hostname=False,
            idle_timeout=settings.idle_timeout_s,
            max_datagram_size=settings.max_datagram_size,
            probe_datagram_size=settings.pmtu_probe,
            max_data=settings.max_data,
            max_stream_data=settings.max_stream_data,
            connection_id_length=CONNECTION_ID_LENGTH,
            signature_algorithms=[ED25519],
        )
        config.certificate = qtls.X509Certificate(tls.certificate.public_bytes(serialization.Encoding.DER))
        config.private_key = qtls.load_pem_private_key(tls.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return config

    def connect(self, configuration: QuicConfiguration, addr: tuple[str, int], now: float) -> Qh3Connection:
        quic = Qh3Connection(configuration=configuration)
        quic.connect(addr, now=now)
        return quic

    def accept(self, configuration: QuicConfiguration, original_cid: bytes) -> Qh3Connection:
        return Qh3Connection(configuration=configuration, original_destination_connection_id=original_cid)


def version_supported() -> bool:
    try:
        parts = tuple(int(p) for p in VERSION.split(".")[:2])
    except ValueError:
        return False
    return parts >= MIN_VERSION


__all__ = ["NAME", "VERSION", "Qh3Connection", "Qh3Engine", "version_supported"]

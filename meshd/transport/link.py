"""PeerLink: one QUIC connection glued to one sans-IO PeerSession.

QUIC events go into the session, the session's transmits go into QUIC, and
the link owns the connection's single timer. The peer's node id comes from its
TLS certificate (never from anything it says), so the session is created only
once the handshake has completed and the certificate proved an id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from identity import CertificateError, NodeId, node_id_from_certificate

from ..protocol import (
    CloseConnection,
    Event,
    PeerSession,
    ResetStream,
    SessionClosed,
    StreamData,
    WireCode,
)
from .engine import ALPN, MeshQuicConnection, events

log = logging.getLogger(__name__)


def clock() -> float:
    """The transport's clock. time.monotonic() is the asyncio loop's own clock
    and, unlike uvloop's millisecond-cached loop.time(), fine enough to measure
    loopback RTTs; timers are armed with loop.call_at on the same base."""
    return time.monotonic()

# QUIC-level refusals before a session exists (application error codes).
AUTH_FAILED = int(WireCode.NODE_ID_MISMATCH)

SessionFactory = Callable[["PeerLink", NodeId, float], PeerSession]
EventHandler = Callable[["PeerLink", Event], None]


class PeerLink:
    # Stop pulling from the session while QUIC holds this much unsent data for a stream.
    QUIC_STREAM_BACKLOG = 1024 * 1024

    def __init__(self, endpoint: Any, quic: MeshQuicConnection, addr: tuple[str, int], *, is_client: bool,
                 expected: NodeId | None, make_session: SessionFactory, on_event: EventHandler,
                 on_closed: Callable[[PeerLink], None]) -> None:
        self.endpoint = endpoint
        self.quic = quic
        self.addr = addr
        self.is_client = is_client
        self.expected = expected
        self.node_id: NodeId | None = None
        self.session: PeerSession | None = None
        self.closed = False
        self.close_reason = ""
        self._make_session = make_session
        self._on_event = on_event
        self._on_closed = on_closed
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.created_at = clock()
        self.connected = asyncio.get_running_loop().create_future()  # resolves with the session or an error

    # --- input -----------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        self.quic.receive_datagram(data, addr, now)
        self.process(now)

    def process(self, now: float) -> None:
        """Drain QUIC events into the session and the session's output into QUIC; then send."""
        while (quic_event := self.quic.next_event()) is not None:
            self._quic_event(quic_event, now)
        self._drain_session(now)
        self.endpoint.transmit(self)
        self._arm_timer()

    def _quic_event(self, event: Any, now: float) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self._authenticate(event, now)
        elif isinstance(event, events.StreamDataReceived):
            if self.session is not None:
                self.session.receive_stream_data(event.stream_id, event.data, event.end_stream, now)
        elif isinstance(event, events.StreamReset):
            if self.session is not None:
                self.session.stream_reset(event.stream_id, now, event.error_code)
        elif isinstance(event, events.ConnectionIdIssued):
            self.endpoint.register_cid(event.connection_id, self)
        elif isinstance(event, events.ConnectionIdRetired):
            self.endpoint.unregister_cid(event.connection_id)
        elif isinstance(event, events.ConnectionTerminated):
            self._terminated(event.reason_phrase or f"closed with code {event.error_code}", now)

    def _authenticate(self, event: Any, now: float) -> None:
        if event.alpn_protocol != ALPN:
            self._refuse(f"peer negotiated ALPN {event.alpn_protocol!r}, not {ALPN}", now)
            return
        certificate = self.quic.peer_certificate()
        if certificate is None:
            self._refuse("peer presented no certificate", now)
            return
        try:
            self.node_id = node_id_from_certificate(certificate, now=time.time(), expected=self.expected)
        except CertificateError as exc:
            self._refuse(f"peer certificate rejected: {exc}", now)
            return
        self.session = self._make_session(self, self.node_id, now)
        log.debug("quic handshake done", extra={"fields": {"peer": str(self.node_id), "addr": f"{self.addr[0]}:{self.addr[1]}"}})

    def _refuse(self, reason: str, now: float) -> None:
        log.warning("refused connection", extra={"fields": {"addr": f"{self.addr[0]}:{self.addr[1]}", "reason": reason}})
        self.quic.close(error_code=AUTH_FAILED, reason_phrase=reason[:200])
        self._fail(ConnectionRefusedError(reason))

    def _fail(self, exc: BaseException) -> None:
        if not self.connected.done():
            self.connected.set_exception(exc)
            self.connected.exception()  # retrieved: callers may not be waiting

    # --- session output ----------------------------------------------------------

    def _drain_session(self, now: float) -> None:
        session = self.session
        if session is None:
            return
        for item in session.data_to_send(self._pull_budget):
            if isinstance(item, StreamData):
                self.quic.send_stream_data(item.stream_id, item.data, item.end_stream)
            elif isinstance(item, ResetStream):
                self._reset_stream(item.stream_id, item.error_code)
            elif isinstance(item, CloseConnection):
                self.quic.close(error_code=item.error_code, reason_phrase=item.reason[:200])
        while (event := session.next_event()) is not None:
            self._on_event(self, event)
            if isinstance(event, SessionClosed):
                self._fail(ConnectionError(event.reason))
        if session.established and not self.connected.done():
            self.connected.set_result(session)

    def _pull_budget(self, stream_id: int) -> int:
        # aioquic buffers whatever it is given; pull from the session's bounded
        # buffers only while QUIC holds less than the backlog for this stream
        # (unacknowledged bytes), so a slow reader never grows memory.
        return max(0, self.QUIC_STREAM_BACKLOG - self.endpoint.engine_buffered(self.quic, stream_id))

    def _reset_stream(self, stream_id: int, error_code: int) -> None:
        try:
            self.quic.reset_stream(stream_id, error_code)
        except (ValueError, AssertionError):
            pass  # the stream is already finished in that direction
        try:
            self.quic.stop_stream(stream_id, error_code)
        except (ValueError, AssertionError):
            pass

    def flush(self) -> None:
        """Called after the service asked the session to send something."""
        if not self.closed:
            self.process(clock())

    # --- timers and teardown -----------------------------------------------------

    def _arm_timer(self) -> None:
        if self.closed:
            return
        deadlines = [t for t in (self.quic.get_timer(), self.session.next_timer() if self.session else None)
                     if t is not None]
        deadline = min(deadlines) if deadlines else None
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = None if deadline is None else asyncio.get_running_loop().call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        deadline = self._timer_at
        self._timer = self._timer_at = None
        # A loop whose clock is coarser than QUIC's pacing deadlines (uvloop
        # counts milliseconds) can fire a timer slightly early; treating it as
        # not yet due re-arms the same deadline again and again and stalls the
        # connection. The deadline has been reached as far as we can tell.
        now = max(clock(), deadline or 0.0)
        quic_timer = self.quic.get_timer()
        if quic_timer is not None and quic_timer <= now:
            self.quic.handle_timer(now)
        if self.session is not None:
            session_timer = self.session.next_timer()
            if session_timer is not None and session_timer <= now:
                self.session.handle_timer(now)
        self.process(now)

    def _terminated(self, reason: str, now: float) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self._timer is not None:
            self._timer.cancel()
        if self.session is not None:
            self.session.connection_lost(now, reason)
            while (event := self.session.next_event()) is not None:
                self._on_event(self, event)
        self._fail(ConnectionError(reason))
        self._on_closed(self)

    def close(self, error_code: int = 0, reason: str = "closing") -> None:
        if not self.closed:
            self.quic.close(error_code=error_code, reason_phrase=reason)
            self.process(clock())


__all__ = ["PeerLink"]

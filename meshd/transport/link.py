"""PeerLink: one QUIC connection glued to one sans-IO PeerSession.

QUIC events go into the session, the session's transmits go into QUIC, and
the link owns the connection's single timer. The peer's node id comes from its
TLS certificate (never from anything it says), so the session is created only
once the handshake has completed and the certificate proved an id.

One ``process`` per input (a batch of datagrams, a timer, a flush): drain the
connection's events into the session and the session's output into the
connection until both are quiet, then send what QUIC has, once, and re-arm
the timer. Handlers that react to session events by calling ``flush`` inside
``process`` only mark it for another round instead of re-entering it.

Lone acknowledgements wait a little: when datagrams from the peer make the
session say nothing, what QUIC has to send is its own (an ACK, a window
update), and qh3 acknowledges every second packet at once. That send waits
until the loop has run what the input made ready (``ACK_WAIT_HOPS`` turns of
the ready queue: a coroutine awaiting the event resumes within two), so an
answer the application sends meanwhile carries the acknowledgement in the
same datagram; if it sends nothing, the ACK leaves a few loop turns late
(microseconds, far inside QUIC's ack delay). In a ping/pong it saves the
peer a wake-up and a receive every other round trip.
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
from .engine import MeshConnection
from .settings import ALPN
from .timers import EngineClock, LinkTimer, clock

log = logging.getLogger(__name__)

# QUIC-level refusals before a session exists (application error codes).
AUTH_FAILED = int(WireCode.NODE_ID_MISMATCH)

SessionFactory = Callable[["PeerLink", NodeId, float], PeerSession]
EventHandler = Callable[["PeerLink", Event], None]


class PeerLink:
    # Stop pulling from the session while QUIC holds this much of a stream's data.
    QUIC_STREAM_BACKLOG = 2 * 1024 * 1024
    # Loop turns a lone acknowledgement waits for an answer to ride on (module docstring).
    ACK_WAIT_HOPS = 2

    def __init__(self, endpoint: Any, quic: MeshConnection, addr: tuple[str, int], *, is_client: bool,
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
        self._clock = EngineClock()
        self._timer = LinkTimer(self._on_timer)
        self._processing = False
        self._again = False
        self._handed = 0  # session transmits handed to QUIC in the current process()
        self._send_waiting = False  # a lone acknowledgement waits for the loop (module docstring)
        self._loop = asyncio.get_running_loop()
        self._handlers = _handlers_for(endpoint.engine.events)
        self.created_at = clock()
        self.connected = self._loop.create_future()  # resolves with the session or an error

    @property
    def timer_runs(self) -> int:
        return self._timer.fired

    # --- input -----------------------------------------------------------------

    def datagrams_received(self, datagrams: list[bytes], addr: tuple[str, int]) -> None:
        now = self._clock.now()
        try:
            self.quic.receive_datagrams(datagrams, addr, now)
        except Exception as exc:  # an engine bug must cost this connection, not the endpoint
            self._engine_failed(exc, now)
            return
        self.process(now, from_peer=True)

    def process(self, now: float | None = None, *, from_peer: bool = False) -> None:
        """Drain QUIC events into the session and the session's output into QUIC; then send."""
        if self._processing:
            self._again = True  # a handler flushed from inside: one more round, below
            return
        now = self._clock.now(now or 0.0)
        self._processing = True
        self._handed = 0
        try:
            while True:
                self._again = False
                while (quic_event := self.quic.next_event()) is not None:
                    self._quic_event(quic_event, now)
                self._drain_session(now)
                if not self._again:
                    break
        finally:
            self._processing = False
        if from_peer and not self._handed and self._only_acks_to_send():
            # QUIC's own output only (an ACK): let an answer catch up with it (module docstring).
            # The timer is left as armed: the deferred send re-arms it.
            if not self._send_waiting:
                self._send_waiting = True
                self._loop.call_soon(self._send_lone_ack, self.ACK_WAIT_HOPS - 1)
            return
        self._send(now)

    def _only_acks_to_send(self) -> bool:
        # Not while connecting (handshake flights go at once), nor when QUIC holds
        # stream data: an ACK from the peer may have opened the window for it.
        session = self.session
        if session is None or not session.established or self.closed:
            return False
        try:
            return not self.quic.stream_data_queued()
        except Exception:  # an engine bug: send as usual, the send reports it
            return False

    def _send(self, now: float) -> None:
        self._send_waiting = False  # whatever waited leaves with this
        try:
            datagrams = self.quic.datagrams_to_send(now)
        except Exception as exc:
            self._engine_failed(exc, now)
            return
        if datagrams:
            self.endpoint.send(datagrams)
        self._arm_timer()

    def _send_lone_ack(self, hops: int) -> None:
        if not self._send_waiting or self.closed:
            return  # sent meanwhile (riding on an answer), or gone
        if hops > 0:
            self._loop.call_soon(self._send_lone_ack, hops - 1)
            return
        self._send(self._clock.now())

    # --- QUIC events ---------------------------------------------------------------

    def _quic_event(self, event: Any, now: float) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(self, event, now)

    def _handshake_completed(self, event: Any, now: float) -> None:
        self._authenticate(event.alpn_protocol, now)

    def _stream_data(self, event: Any, now: float) -> None:
        if self.session is not None:
            self.session.receive_stream_data(event.stream_id, event.data, event.end_stream, now)

    def _stream_reset(self, event: Any, now: float) -> None:
        if self.session is not None:
            self.session.stream_reset(event.stream_id, now, event.error_code)

    def _cid_issued(self, event: Any, now: float) -> None:
        self.endpoint.register_cid(event.connection_id, self)

    def _cid_retired(self, event: Any, now: float) -> None:
        self.endpoint.unregister_cid(event.connection_id)

    def _connection_terminated(self, event: Any, now: float) -> None:
        self._terminated(event.reason_phrase or f"closed with code {event.error_code}", now)

    def _authenticate(self, alpn: str | None, now: float) -> None:
        if alpn != ALPN:
            self._refuse(f"peer negotiated ALPN {alpn!r}, not {ALPN}", now)
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
        items = session.data_to_send(self._pull_budget)
        self._handed += len(items)
        for item in items:
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
        # Engines buffer whatever they are given; pull from the session's bounded
        # buffers only while QUIC holds less than the backlog for this stream,
        # so a slow reader never grows memory.
        return max(0, self.QUIC_STREAM_BACKLOG - self.quic.stream_backlog(stream_id))

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
            self.process()

    # --- timers and teardown -----------------------------------------------------

    def _arm_timer(self) -> None:
        if self.closed:
            return
        deadline = self.quic.get_timer()
        if self.session is not None:
            session_deadline = self.session.next_timer()
            if session_deadline is not None and (deadline is None or session_deadline < deadline):
                deadline = session_deadline
        self._timer.arm(deadline)

    def _on_timer(self, deadline: float) -> None:
        if self.closed:
            return
        # The deadline has been reached as far as this connection is concerned,
        # even if the loop ran the timer a little early (timers.py): whatever
        # was due then is handled now, with the same time for every call.
        now = self._clock.now(deadline)
        try:
            quic_deadline = self.quic.get_timer()
            if quic_deadline is not None and quic_deadline <= now:
                self.quic.handle_timer(now)
        except Exception as exc:
            self._engine_failed(exc, now)
            return
        if self.session is not None:
            session_deadline = self.session.next_timer()
            if session_deadline is not None and session_deadline <= now:
                self.session.handle_timer(now)
        self.process(now)

    def _engine_failed(self, exc: Exception, now: float) -> None:
        log.error("quic engine failed; dropping the connection", exc_info=exc,
                  extra={"fields": {"addr": f"{self.addr[0]}:{self.addr[1]}", "error": repr(exc)}})
        self._terminated(f"quic engine error: {exc}", now)

    def _terminated(self, reason: str, now: float) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
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
            self.process()


_HANDLER_NAMES = {
    "HandshakeCompleted": PeerLink._handshake_completed,
    "StreamDataReceived": PeerLink._stream_data,
    "StreamReset": PeerLink._stream_reset,
    "ConnectionIdIssued": PeerLink._cid_issued,
    "ConnectionIdRetired": PeerLink._cid_retired,
    "ConnectionTerminated": PeerLink._connection_terminated,
}
_handler_tables: dict[int, dict[type, Callable[[PeerLink, Any, float], None]]] = {}


def _handlers_for(events: Any) -> dict[type, Callable[[PeerLink, Any, float], None]]:
    """Event class -> handler for one engine's event module (both engines name them alike)."""
    table = _handler_tables.get(id(events))
    if table is None:
        table = {getattr(events, name): handler for name, handler in _HANDLER_NAMES.items()}
        _handler_tables[id(events)] = table
    return table


__all__ = ["PeerLink"]

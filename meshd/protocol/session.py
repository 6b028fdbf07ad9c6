"""``PeerSession``: the sans-IO protocol state of one QUIC connection to one peer.

In the style of aioquic: the transport feeds what QUIC delivers
(``receive_stream_data``, ``stream_reset``, ``connection_lost``), drains
``next_event()`` after every call, performs ``data_to_send()`` in order, and
arms a timer for ``next_timer()`` that calls ``handle_timer(now)``. ``now`` is
whatever clock the transport uses (the event loop's monotonic time); the
session never reads a clock.

Stream ids: the session allocates ids for the streams it opens itself, with
QUIC's numbering (bidirectional, low bit = initiator: the dialler uses 0, 4,
8, ... and the acceptor 1, 5, 9, ...), and the transport sends on exactly those
ids. QUIC creates a stream on its first send, so no id is reserved twice, which
``get_next_available_stream_id`` would not guarantee for two opens before a send.

Connection lifecycle: the dialler opens the control stream with ``Hello``; the
acceptor answers ``HelloAck`` or ``Refused`` (version mismatch, node id
mismatch, untrusted). A side that sends a final frame (refusal, goodbye,
protocol error) lingers until the peer closes the connection or
``close_linger`` passes; a side that receives one closes at once. Either way
``SessionClosed`` is the last event.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from .channels import (
    CHANNEL_ROLES,
    SETUP_FRAMES,
    ChannelAcceptor,
    ChannelOpener,
    RequestReceiver,
    RequestSender,
    SendBuffer,
    SetupFrame,
    StreamChannel,
)
from .config import ROLES, CapabilityVerifier, SessionConfig, SessionState, TrustCheck
from .errors import (
    LocalProtocolError,
    ProtocolError,
    TooManyStreams,
    UnexpectedChannel,
    UnexpectedFrame,
    UnknownChannelKind,
    WireCode,
)
from .events import (
    CapabilitiesReceived,
    CapabilitiesRejected,
    CloseConnection,
    Event,
    HeartbeatMeasured,
    HelloReceived,
    PeerAccepted,
    PeerRefused,
    PeerTimedOut,
    RefusedByPeer,
    SessionClosed,
    Transmit,
    VersionMismatched,
)
from .frames import (
    Capabilities,
    Frame,
    Goodbye,
    Hello,
    HelloAck,
    InferenceRequest,
    MeshEvent,
    Ping,
    Pong,
    ProtocolErrorFrame,
    Refused,
)
from .framing import ChannelKind, FrameDecoder, encode_frame
from .streams import StreamTable

logger = logging.getLogger(__name__)

_MAX_OUTSTANDING_PINGS = 8


def _wire_code_named(code: str) -> WireCode:
    try:
        return WireCode[code.upper()]
    except KeyError:
        return WireCode.PROTOCOL_ERROR


class PeerSession:
    """Protocol state for one connection; see the module docstring for the transport contract."""

    def __init__(
        self,
        *,
        local_node_id: str,
        peer_node_id: str,
        is_client: bool,
        now: float,
        is_trusted: TrustCheck,
        verify_capabilities: CapabilityVerifier,
        config: SessionConfig | None = None,
    ) -> None:
        self.config = config or SessionConfig()
        self.local_node_id = local_node_id
        self.peer_node_id = peer_node_id
        self.is_client = is_client
        self._is_trusted = is_trusted
        self._verify = verify_capabilities
        self.state = SessionState.HANDSHAKE
        self.granted_roles: frozenset[str] = frozenset()
        self.peer_granted_roles: frozenset[str] = frozenset()
        self.peer_software: str | None = None
        self.rtt: float | None = None

        self._events: deque[Event] = deque()
        self._streams = StreamTable(
            is_client=is_client,
            peer_node_id=peer_node_id,
            events=self._events,
            buffer_limit=self.config.send_buffer_limit,
            high_watermark=self.config.send_buffer_high_watermark,
            low_watermark=self.config.send_buffer_low_watermark,
            early_budget=self.config.early_stream_budget,
        )
        self._close: CloseConnection | None = None
        self._linger_close: CloseConnection | None = None
        self._capabilities: bytes | None = None

        self._clock = now  # the latest ``now`` any call passed in
        self._started_at = now
        self._last_heard = now
        self._next_ping_at: float | None = None
        self._close_at: float | None = None
        self._next_nonce = 0
        self._pings: OrderedDict[int, float] = OrderedDict()

        self._control_id: int | None = None
        self._control_out: SendBuffer | None = None
        self._control_in = FrameDecoder(self.config.max_control_frame_size)
        if is_client:
            self._control_id = self._streams.allocate_id()
            self._control_out = self._streams.new_buffer(self._control_id)
            version, software = self.config.protocol_version, self.config.software
            self._send_control(Hello(protocol_version=version, node_id=local_node_id, software=software), opening=True)

    # --- what the transport reads -----------------------------------------------------------

    @property
    def established(self) -> bool:
        return self.state is SessionState.ESTABLISHED

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self, max_bytes_per_stream: int | None | Callable[[int], int] = None) -> list[Transmit]:
        """Everything to perform now, in order: stream data, stream resets, then a connection close.

        ``max_bytes_per_stream`` (a number, or a function of the stream id)
        lets the transport pull at its own pace; what it leaves stays in each
        stream's bounded send buffer.
        """
        out: list[Transmit] = []
        control = self._control_out
        # has_output first: the transport's per-stream budget asks the QUIC engine, and most
        # calls (every received datagram, every timer) find nothing queued on the control stream.
        if control is not None and self._control_id is not None and control.has_output:
            limit = max_bytes_per_stream(self._control_id) if callable(max_bytes_per_stream) else max_bytes_per_stream
            chunk = control.take(limit)
            if chunk is not None:
                out.append(chunk)
        self._streams.collect(max_bytes_per_stream, out)
        if self._close is not None:
            out.append(self._close)
            self._close = None
        return out

    def next_timer(self) -> float | None:
        if self.state is SessionState.HANDSHAKE:
            return self._started_at + self.config.handshake_timeout
        if self.state is SessionState.ESTABLISHED:
            deadline = self._last_heard + self.config.peer_timeout
            return deadline if self._next_ping_at is None else min(deadline, self._next_ping_at)
        if self.state is SessionState.CLOSING:
            return self._close_at
        return None

    def is_writable(self, stream_id: int) -> bool:
        """False while the stream's send buffer is above its high watermark (wait for ``StreamWritable``)."""
        return stream_id in self._streams and self._streams.get(stream_id, StreamChannel).out.writable

    # --- what the transport feeds -----------------------------------------------------------

    def receive_stream_data(self, stream_id: int, data: bytes, end_stream: bool, now: float) -> None:
        if self.state in (SessionState.CLOSING, SessionState.CLOSED):
            return
        self._clock = self._last_heard = now
        data = bytes(data)
        if stream_id == self._control_id:
            self._receive_control(data, end_stream, now)
        elif stream_id in self._streams:
            self._streams.feed(stream_id, data, end_stream, now)
        elif self._streams.is_early(stream_id):
            self._streams.hold_early(stream_id, data, end_stream)
        elif self._streams.is_stale(stream_id) or not data:
            return  # stale data for a stream we forgot, or a FIN on a stream that never said anything
        else:
            self._new_peer_stream(stream_id, data, end_stream, now)

    def stream_reset(self, stream_id: int, now: float, error_code: int | None = None) -> None:
        """The peer reset its side of a stream (RESET_STREAM) or asked us to stop (STOP_SENDING)."""
        if self.state in (SessionState.CLOSING, SessionState.CLOSED):
            return
        self._clock = self._last_heard = now
        if stream_id == self._control_id:
            self._end(WireCode.PROTOCOL_ERROR, "the peer reset the control stream", by_peer=True, linger=False)
            return
        self._streams.peer_reset(stream_id, error_code)

    def connection_lost(self, now: float, reason: str = "connection lost") -> None:
        """QUIC says the connection is gone (closed by the peer, idle timeout, network)."""
        self._clock = now
        if self.state is SessionState.CLOSING:
            self.state = SessionState.CLOSED
            self._linger_close = None
        elif self.state is not SessionState.CLOSED:
            self._end(WireCode.CONNECTION_CLOSED, reason, by_peer=True, linger=False, send_close=False)

    def handle_timer(self, now: float) -> None:
        self._clock = now
        if self.state is SessionState.HANDSHAKE and now >= self._started_at + self.config.handshake_timeout:
            self._timed_out("handshake", now - self._started_at)
        elif self.state is SessionState.ESTABLISHED:
            if now - self._last_heard >= self.config.peer_timeout:
                self._timed_out("established", now - self._last_heard)
            elif self._next_ping_at is not None and now >= self._next_ping_at:
                self._send_ping(now)
        elif self.state is SessionState.CLOSING and self._close_at is not None and now >= self._close_at:
            self.state = SessionState.CLOSED
            self._close, self._linger_close = self._linger_close, None

    # --- what the daemon asks for -------------------------------------------------------------

    def announce_capabilities(self, signed_record: bytes, now: float) -> None:
        """Set our signed capability announcement; sent now if established, else at establishment."""
        frame = Capabilities(signed_record=signed_record)
        encode_frame(frame, max_frame_size=self.config.max_control_frame_size)  # refuse oversize early
        self._capabilities = frame.signed_record
        if self.established:
            self._send_control(frame)

    def trust_changed(self, now: float) -> None:
        """The trust store changed: refuse the peer if it lost every role, else refresh its roles."""
        self._clock = now
        if self.state is not SessionState.ESTABLISHED:
            return
        roles = self._roles_we_grant()
        if roles:
            self.granted_roles = roles
        else:
            self._refuse(WireCode.UNTRUSTED, "this node no longer trusts you")

    def close(self, now: float, reason: str = "shutting down", code: WireCode = WireCode.NO_ERROR) -> None:
        """Say goodbye and close (``code=DUPLICATE_CONNECTION`` for the loser of a duplicate pair)."""
        self._clock = now
        if self.state in (SessionState.CLOSING, SessionState.CLOSED):
            return
        goodbye = Goodbye(reason=reason) if self._control_out is not None else None
        self._end(code, reason, by_peer=False, linger=goodbye is not None, final_frame=goodbye)

    def open_request_stream(self, request: InferenceRequest, now: float) -> int:
        """Forward ``request`` to the peer on a new request stream; returns its stream id."""
        self._require_established()
        stream_id = self._streams.allocate_id()
        out = self._streams.new_buffer(stream_id)
        self._streams.add(RequestSender(stream_id, request, out, self.config.max_frame_size))
        return stream_id

    def cancel_request(self, stream_id: int, now: float, *, reason: str = "cancelled", graceful: bool = False) -> None:
        """Cancel a request we sent: reset the stream, or (``graceful``) send a cancel frame and
        still receive the response's closing usage or error. A reset emits no further events."""
        machine = self._streams.get(stream_id, RequestSender)
        if graceful:
            machine.cancel_gracefully(reason)
        else:
            self._streams.abort(stream_id, WireCode.REQUEST_CANCELLED)

    def send_token(
        self, stream_id: int, text: str, *, token_ids: tuple[int, ...] | None = None, finish_reason: str | None = None
    ) -> None:
        self._streams.get(stream_id, RequestReceiver).send_token(text, token_ids=token_ids, finish_reason=finish_reason)

    def send_response_body(self, stream_id: int, body: dict[str, Any]) -> None:
        self._streams.get(stream_id, RequestReceiver).send_response_body(body)

    def send_usage(self, stream_id: int, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> None:
        """Close a served response successfully."""
        self._streams.get(stream_id, RequestReceiver).send_usage(prompt_tokens, completion_tokens, cached_tokens)

    def send_request_error(self, stream_id: int, code: str, message: str, http_status: int) -> None:
        """Close a served response with an error (``code``/``http_status`` as in meshd.errors)."""
        self._streams.get(stream_id, RequestReceiver).send_error(code, message, http_status)

    def open_channel(self, setup: SetupFrame, now: float) -> int:
        """Open a tensor (``TensorOpen``), cache (``CacheOffer``/``CacheRequest``) or events
        (``EventsSubscribe``) channel; wait for ``ChannelOpened`` before sending data."""
        self._require_established()
        kind = _SETUP_KINDS.get(type(setup))
        if kind is None:
            raise LocalProtocolError(f"{type(setup).__name__} does not open a channel")
        stream_id = self._streams.allocate_id()
        out = self._streams.new_buffer(stream_id)
        self._streams.add(ChannelOpener(stream_id, kind, setup, out, self.config.max_frame_size))
        return stream_id

    def accept_channel(self, stream_id: int, params: dict[str, Any] | None = None) -> None:
        self._streams.get(stream_id, ChannelAcceptor).accept(params)

    def refuse_channel(self, stream_id: int, code: str, message: str) -> None:
        self._streams.get(stream_id, ChannelAcceptor).refuse(code, message)

    def send_channel_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Raw bytes on an open tensor or cache channel (bounded: may raise ``SendBufferFull``)."""
        machine = self._streams.get(stream_id, StreamChannel)
        if not isinstance(machine, (ChannelOpener, ChannelAcceptor)):
            raise LocalProtocolError(f"stream {stream_id} is not a tensor or cache channel")
        machine.send_data(data, end_stream=end_stream)

    def send_mesh_event(self, stream_id: int, event: MeshEvent, *, end_stream: bool = False) -> None:
        self._streams.get(stream_id, ChannelAcceptor).send_event(event, end_stream=end_stream)

    def finish_stream(self, stream_id: int) -> None:
        """Finish our side of a channel (FIN) without aborting the peer's side."""
        machine = self._streams.get(stream_id, StreamChannel)
        if not machine.out.end_queued:
            machine.out.write(b"", end=True, force=True)

    def reset_stream(self, stream_id: int, code: WireCode = WireCode.NO_ERROR) -> None:
        """Abort a stream in both directions; no further events are reported for it."""
        self._streams.get(stream_id, StreamChannel)
        self._streams.abort(stream_id, code)

    # --- control stream -----------------------------------------------------------------------

    def _receive_control(self, data: bytes, end_stream: bool, now: float) -> None:
        try:
            for frame in self._control_in.feed(data):
                self._on_control(frame, now)
                if self.state not in (SessionState.HANDSHAKE, SessionState.ESTABLISHED):
                    return
            if end_stream:
                self._control_in.finish()
                reason = "the peer finished the control stream"
                self._end(WireCode.CONNECTION_CLOSED, reason, by_peer=True, linger=False)
        except ProtocolError as exc:
            logger.warning(
                "peer broke the control stream protocol",
                extra={"peer": self.peer_node_id, "code": exc.code, "detail": exc.message},
            )
            frame = ProtocolErrorFrame(code=exc.code, message=exc.message)
            self._end(exc.wire_code, exc.message, by_peer=False, linger=True, final_frame=frame)

    def _on_control(self, frame: Frame, now: float) -> None:
        # Heartbeats first: they are nearly all the control traffic of an established session
        # (the same outcome as the chain below, which reaches them last).
        kind = type(frame)
        if kind is Ping and self.state is SessionState.ESTABLISHED:
            self._send_control(Pong(nonce=frame.nonce, sent_at=frame.sent_at))  # type: ignore[attr-defined]
            return
        if kind is Pong and self.state is SessionState.ESTABLISHED:
            self._on_pong(frame, now)  # type: ignore[arg-type]
            return
        # Frames that end the session are valid in any state, even mid-handshake.
        if isinstance(frame, Refused):
            self._on_refused(frame)
        elif isinstance(frame, Goodbye):
            self._end(WireCode.NO_ERROR, frame.reason or "goodbye", by_peer=True, linger=False)
        elif isinstance(frame, ProtocolErrorFrame):
            self._end(_wire_code_named(frame.code), f"{frame.code}: {frame.message}", by_peer=True, linger=False)
        elif self.state is SessionState.HANDSHAKE:
            if not self.is_client and isinstance(frame, Hello):
                self._on_hello(frame, now)
            elif self.is_client and isinstance(frame, HelloAck):
                self._on_hello_ack(frame, now)
            else:
                raise UnexpectedFrame(f"{frame.TAG} frame during the handshake")
        elif isinstance(frame, Capabilities):
            self._on_capabilities(frame, now)
        elif isinstance(frame, Ping):
            self._send_control(Pong(nonce=frame.nonce, sent_at=frame.sent_at))
        elif isinstance(frame, Pong):
            self._on_pong(frame, now)
        else:
            raise UnexpectedFrame(f"{frame.TAG} frame on the control stream")

    def _on_hello(self, hello: Hello, now: float) -> None:
        self._hello_received(hello.node_id, hello.protocol_version, hello.software, hello.capabilities_hint)
        if self._check_peer(hello.node_id, hello.protocol_version):
            roles = self._roles_we_grant()
            ack = HelloAck(
                protocol_version=self.config.protocol_version,
                node_id=self.local_node_id,
                software=self.config.software,
                granted_roles=tuple(sorted(roles)),  # type: ignore[arg-type]  # ROLES are RoleName values
            )
            self._send_control(ack)
            self._establish(roles, frozenset(), now)

    def _on_hello_ack(self, ack: HelloAck, now: float) -> None:
        self._hello_received(ack.node_id, ack.protocol_version, ack.software, None)
        if self._check_peer(ack.node_id, ack.protocol_version):
            self._establish(self._roles_we_grant(), frozenset(ack.granted_roles), now)

    def _hello_received(self, node_id: str, version: int, software: str, hint: dict[str, Any] | None) -> None:
        self.peer_software = software
        self._events.append(HelloReceived(node_id, version, software, hint))

    def _check_peer(self, node_id: str, version: int) -> bool:
        """Version, identity and trust gates of the handshake; refuses and returns False on failure."""
        local_version = self.config.protocol_version
        if version != local_version:
            logger.warning(
                "protocol version mismatch",
                extra={"peer": self.peer_node_id, "local_version": local_version, "peer_version": version},
            )
            self._events.append(VersionMismatched(self.peer_node_id, local_version, version))
            message = f"protocol version {version} is not supported; this node speaks {local_version}"
            self._refuse(WireCode.VERSION_MISMATCH, message)
        elif node_id != self.peer_node_id:
            self._refuse(WireCode.NODE_ID_MISMATCH, f"hello names {node_id}, but TLS authenticated {self.peer_node_id}")
        elif not self._roles_we_grant():
            self._refuse(WireCode.UNTRUSTED, "this node does not trust you")
        else:
            return True
        return False

    def _establish(self, roles: frozenset[str], peer_roles: frozenset[str], now: float) -> None:
        self.state = SessionState.ESTABLISHED
        self.granted_roles = roles
        self.peer_granted_roles = peer_roles
        self._events.append(PeerAccepted(self.peer_node_id, self.peer_software or "", roles, peer_roles))
        if self._capabilities is not None:
            self._send_control(Capabilities(signed_record=self._capabilities))
        self._send_ping(now)  # measure RTT right away rather than one interval later
        for stream_id, data, end_stream in self._streams.take_early():
            if self.state is not SessionState.ESTABLISHED:
                break
            self._new_peer_stream(stream_id, data, end_stream, now)

    def _refuse(self, code: WireCode, message: str) -> None:
        logger.info("refusing peer", extra={"peer": self.peer_node_id, "code": code.code, "detail": message})
        self._events.append(PeerRefused(self.peer_node_id, code.code, message))
        version = self.config.protocol_version if code is WireCode.VERSION_MISMATCH else None
        refusal = Refused(code=code.code, message=message, protocol_version=version)
        self._end(code, message, by_peer=False, linger=True, final_frame=refusal)

    def _on_refused(self, frame: Refused) -> None:
        if frame.code == WireCode.VERSION_MISMATCH.code and frame.protocol_version is not None:
            local_version = self.config.protocol_version
            self._events.append(VersionMismatched(self.peer_node_id, local_version, frame.protocol_version))
        logger.info("refused by peer", extra={"peer": self.peer_node_id, "code": frame.code, "detail": frame.message})
        self._events.append(RefusedByPeer(self.peer_node_id, frame.code, frame.message))
        self._end(_wire_code_named(frame.code), frame.message, by_peer=True, linger=False)

    def _on_capabilities(self, frame: Capabilities, now: float) -> None:
        try:
            payload = self._verify(frame.signed_record, self.peer_node_id, now)
        except Exception as exc:  # noqa: BLE001 - the verifier's contract is "raise on failure"
            logger.warning(
                "capability announcement rejected",
                extra={"peer": self.peer_node_id, "error": type(exc).__name__, "detail": str(exc)},
            )
            self._events.append(CapabilitiesRejected(self.peer_node_id, f"{type(exc).__name__}: {exc}"))
            return
        if not isinstance(payload, dict):
            reason = f"verifier returned {type(payload).__name__}, not a map"
            self._events.append(CapabilitiesRejected(self.peer_node_id, reason))
            return
        self._events.append(CapabilitiesReceived(self.peer_node_id, payload))

    def _send_ping(self, now: float) -> None:
        nonce = self._next_nonce
        self._next_nonce += 1
        self._pings[nonce] = now
        while len(self._pings) > _MAX_OUTSTANDING_PINGS:
            self._pings.popitem(last=False)
        self._send_control(Ping(nonce=nonce, sent_at=now))
        self._next_ping_at = now + self.config.heartbeat_interval

    def _on_pong(self, pong: Pong, now: float) -> None:
        # RTT comes from our own record of the send time, not the echoed value, so a
        # peer cannot make itself look closer than it is.
        sent_at = self._pings.pop(pong.nonce, None)
        if sent_at is None:
            logger.debug("pong for an unknown ping", extra={"peer": self.peer_node_id, "nonce": pong.nonce})
            return
        self.rtt = max(0.0, now - sent_at)
        self._events.append(HeartbeatMeasured(self.peer_node_id, self.rtt))

    def _timed_out(self, phase: str, silent_for: float) -> None:
        logger.warning("peer timed out", extra={"peer": self.peer_node_id, "phase": phase, "silent_for": silent_for})
        self._events.append(PeerTimedOut(self.peer_node_id, phase, silent_for))
        self._end(WireCode.PEER_TIMEOUT, f"nothing heard for {silent_for:.1f} s", by_peer=False, linger=False)

    def _end(
        self,
        code: WireCode,
        reason: str,
        *,
        by_peer: bool,
        linger: bool,
        final_frame: Frame | None = None,
        send_close: bool = True,
    ) -> None:
        """Fail every stream, report ``SessionClosed``, and close now or after the linger."""
        if self.state in (SessionState.CLOSING, SessionState.CLOSED):
            return
        self._streams.fail_all(WireCode.CONNECTION_CLOSED.code, reason)
        self._events.append(SessionClosed(self.peer_node_id, code.code, reason, by_peer))
        if final_frame is not None and self._control_out is not None and not self._control_out.end_queued:
            data = encode_frame(final_frame, max_frame_size=self.config.max_control_frame_size)
            self._control_out.write(data, end=True, force=True)
        if linger and send_close and self._control_out is not None:
            self.state = SessionState.CLOSING
            self._close_at = self._clock + self.config.close_linger
            self._linger_close = CloseConnection(int(code), reason)
        else:
            self.state = SessionState.CLOSED
            if send_close:
                self._close = CloseConnection(int(code), reason)

    # --- streams ------------------------------------------------------------------------------

    def _new_peer_stream(self, stream_id: int, data: bytes, end_stream: bool, now: float) -> None:
        try:
            kind = ChannelKind(data[0])
        except ValueError:
            self._streams.reject(stream_id, UnknownChannelKind(data[0]))
            return
        if stream_id & 2:
            self._streams.reject(stream_id, UnexpectedChannel("unidirectional streams are not used"))
        elif kind is ChannelKind.CONTROL:
            if self.is_client or self._control_id is not None:
                self._streams.reject(stream_id, UnexpectedChannel("only the dialler opens the one control stream"))
                return
            self._control_id = stream_id
            self._control_out = self._streams.new_buffer(stream_id)
            self._receive_control(data[1:], end_stream, now)
        elif self.state is SessionState.HANDSHAKE:
            self._streams.hold_early(stream_id, data, end_stream)
        elif self._streams.peer_stream_count() >= self.config.max_peer_streams:
            self._streams.reject(stream_id, TooManyStreams(f"more than {self.config.max_peer_streams} open streams"))
        else:
            role = CHANNEL_ROLES[kind]
            allowed = bool(self.granted_roles) if role is None else self._is_trusted(self.peer_node_id, role)
            out = self._streams.new_buffer(stream_id)
            machine: StreamChannel
            if kind is ChannelKind.REQUEST:
                machine = RequestReceiver(stream_id, out, self.config.max_frame_size, allowed=allowed)
            else:
                machine = ChannelAcceptor(stream_id, kind, out, self.config.max_frame_size, allowed=allowed)
            self._streams.add(machine)
            self._streams.feed(stream_id, data[1:], end_stream, now)

    def _require_established(self) -> None:
        if self.state is not SessionState.ESTABLISHED:
            raise LocalProtocolError(f"the session with {self.peer_node_id} is {self.state.value}, not established")

    def _roles_we_grant(self) -> frozenset[str]:
        return frozenset(role for role in ROLES if self._is_trusted(self.peer_node_id, role))

    def _send_control(self, frame: Frame, *, opening: bool = False) -> None:
        if self._control_out is None or self._control_out.end_queued:
            return
        data = encode_frame(frame, max_frame_size=self.config.max_control_frame_size)
        self._control_out.write(bytes([ChannelKind.CONTROL]) + data if opening else data, force=True)


_SETUP_KINDS: dict[type[Frame], ChannelKind] = {
    frame_type: kind for kind, frame_types in SETUP_FRAMES.items() for frame_type in frame_types
}


__all__ = ["PeerSession"]

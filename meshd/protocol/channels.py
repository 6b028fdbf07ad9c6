"""Per-stream state machines: bounded send buffers, request streams, setup channels.

Every stream starts with one ``ChannelKind`` byte written by the side that
opens it. The session (``session.py``) reads that byte, checks the peer's role,
and hands the rest of the stream to one of the machines here. A machine turns
the peer's bytes into events (appended to a list the session passes in, so
events produced before a protocol error are kept) and raises a
``ProtocolError`` when the peer breaks the channel's rules; the session then
resets the stream and asks the machine for its terminal events (``failed``).

Request stream (requester -> server, then server -> requester)::

    requester: [REQUEST] InferenceRequest [Cancel] FIN
    server:    (TokenChunk* | ResponseBody) (Usage | RequestError) FIN
               RequestError FIN                  (refusal, or failure before output)

Tensor / cache / events channels (opener -> acceptor, acceptor -> opener)::

    opener:    [KIND] setup frame  ... after ChannelAck: raw bytes (tensor, cache) ... FIN
    acceptor:  ChannelAck ... raw bytes (tensor, cache) or MeshEvent* (events) ... FIN
               Refused FIN

Setup frames: tensor -> TensorOpen; cache -> CacheOffer or CacheRequest;
events -> EventsSubscribe. The opener sends nothing after the setup frame
until it has the ack.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any, ClassVar

from .errors import (
    LocalProtocolError,
    SendBufferFull,
    StreamEndedEarly,
    UnexpectedFrame,
    WireCode,
    describe_wire_code,
)
from .events import (
    ChannelAborted,
    ChannelDataReceived,
    ChannelEnded,
    ChannelOpened,
    ChannelRefused,
    ChannelRequested,
    Event,
    MeshEventReceived,
    RequestCancelled,
    RequestCompleted,
    RequestFailed,
    RequestReceived,
    RequestRefused,
    ResponseReceived,
    StreamData,
    TokenReceived,
)
from .frames import (
    CacheOffer,
    CacheRequest,
    Cancel,
    ChannelAck,
    EventsSubscribe,
    Frame,
    InferenceRequest,
    MeshEvent,
    Refused,
    RequestError,
    ResponseBody,
    TensorOpen,
    TokenChunk,
    Usage,
)
from .framing import ChannelKind, FrameDecoder, encode_frame

CHANNEL_ROLES: dict[ChannelKind, str | None] = {
    ChannelKind.REQUEST: "use",
    ChannelKind.TENSOR: "tensor",
    ChannelKind.CACHE: "cache",
    ChannelKind.EVENTS: None,  # any trusted peer may subscribe
}
"""The role the peer needs for us to accept a channel it opens (None: any role)."""

SETUP_FRAMES: dict[ChannelKind, tuple[type[Frame], ...]] = {
    ChannelKind.TENSOR: (TensorOpen,),
    ChannelKind.CACHE: (CacheOffer, CacheRequest),
    ChannelKind.EVENTS: (EventsSubscribe,),
}
RAW_KINDS = frozenset({ChannelKind.TENSOR, ChannelKind.CACHE})

SetupFrame = TensorOpen | CacheOffer | CacheRequest | EventsSubscribe


class SendBuffer:
    """A stream's outgoing bytes, bounded: the backpressure signal for producers.

    ``write`` refuses data beyond ``limit`` with ``SendBufferFull`` (protocol
    frames the session must send, such as refusals, pass ``force``). When the
    buffer has reached ``high_watermark`` and then drains to
    ``low_watermark``, ``drained`` reports it once, and the session emits
    ``StreamWritable``.

    The bytes are kept as the chunks written (a deque, plus an offset into the
    first), not in one growing bytearray: a bulk producer writes 256 KiB at a
    time and the transport takes up to a few MiB, and appending to and cutting
    the front off one buffer re-allocated, page-faulted and moved the pending
    bytes on every call (10-20% of a bulk sender). A write keeps its ``bytes``
    as they are (other buffers are copied once), and a take copies only the
    bytes it hands out, none when that is exactly one whole chunk.
    """

    __slots__ = ("stream_id", "limit", "high_watermark", "low_watermark", "_chunks", "_offset", "_pending",
                 "end_queued", "end_sent", "_was_high")

    def __init__(self, stream_id: int, *, limit: int, high_watermark: int, low_watermark: int) -> None:
        if not 0 <= low_watermark <= high_watermark <= limit:
            raise ValueError("send buffer needs 0 <= low_watermark <= high_watermark <= limit")
        self.stream_id = stream_id
        self.limit = limit
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # bytes of _chunks[0] already taken
        self._pending = 0
        self.end_queued = False
        self.end_sent = False
        self._was_high = False

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def writable(self) -> bool:
        return not self.end_queued and self._pending < self.high_watermark

    @property
    def has_output(self) -> bool:
        """``take`` would return something: bytes, or a FIN not yet sent."""
        return self._pending > 0 or (self.end_queued and not self.end_sent)

    def write(self, data: bytes | bytearray | memoryview, *, end: bool = False, force: bool = False) -> None:
        if self.end_queued:
            raise LocalProtocolError(f"stream {self.stream_id}: our side is already finished")
        if type(data) is not bytes:
            # bytes are immutable and kept as they are; any other buffer is copied
            # once, so the caller may reuse it.
            data = bytes(memoryview(data))
        size = len(data)
        if not force and self._pending + size > self.limit:
            raise SendBufferFull(self.stream_id, self._pending, self.limit)
        if size:
            self._chunks.append(data)
            self._pending += size
            if self._pending >= self.high_watermark:
                self._was_high = True
        self.end_queued = end

    def take(self, max_bytes: int | None = None) -> StreamData | None:
        """Up to ``max_bytes`` queued bytes (all if None), with FIN once everything is out."""
        if self.end_sent:
            return None
        pending = self._pending
        n = pending if max_bytes is None or max_bytes >= pending else max(max_bytes, 0)
        data = self._pop(n) if n else b""
        end = self.end_queued and not self._pending
        if not data and not end:
            return None
        self.end_sent = end
        return StreamData(self.stream_id, data, end)

    def _pop(self, n: int) -> bytes:
        """The first ``n`` pending bytes (0 < n <= pending), removed from the buffer."""
        chunks, offset = self._chunks, self._offset
        self._pending -= n
        head = chunks[0]
        available = len(head) - offset
        if n < available:  # inside the first chunk: keep the rest of it where it is
            self._offset = offset + n
            with memoryview(head) as view:
                return bytes(view[offset : offset + n])
        chunks.popleft()
        self._offset = 0
        if n == available:
            if not offset:
                return head  # exactly one whole chunk: no copy at all
            with memoryview(head) as view:
                return bytes(view[offset:])
        parts: list[bytes | memoryview] = [memoryview(head)[offset:] if offset else head]
        n -= available
        while n:
            chunk = chunks[0]
            if n < len(chunk):
                parts.append(memoryview(chunk)[:n])
                self._offset = n
                break
            parts.append(chunks.popleft())
            n -= len(chunk)
        return b"".join(parts)  # the one copy: exactly the bytes handed out

    def drained(self) -> bool:
        """True, once, when the buffer fell to the low watermark after reaching the high one."""
        if self._was_high and self._pending <= self.low_watermark and not self.end_queued:
            self._was_high = False
            return True
        return False

    def abort(self) -> None:
        """The stream was reset: drop everything and accept nothing more."""
        self._chunks.clear()
        self._offset = self._pending = 0
        self.end_queued = self.end_sent = True


class StreamChannel:
    """Base of the per-stream machines (the control stream is the session's own)."""

    kind: ClassVar[ChannelKind]

    def __init__(self, stream_id: int, out: SendBuffer, max_frame_size: int) -> None:
        self.stream_id = stream_id
        self.out = out
        self.max_frame_size = max_frame_size
        self.decoder = FrameDecoder(max_frame_size)
        self.recv_ended = False

    @property
    def finished(self) -> bool:
        """Both directions are done; the session forgets the stream."""
        return self.recv_ended and self.out.end_sent

    def receive(self, data: bytes, end_stream: bool, now: float, emit: list[Event]) -> None:
        raise NotImplementedError

    def peer_reset(self, error_code: int | None, emit: list[Event]) -> None:
        """The peer reset the stream; report what that means for this channel."""
        raise NotImplementedError

    def failed(self, code: str, message: str, emit: list[Event]) -> None:
        """The stream is being reset (protocol error, connection ended): report the loss."""
        raise NotImplementedError

    def _send(self, frame: Frame, *, end: bool = False, force: bool = False, opening: bool = False) -> None:
        data = encode_frame(frame, max_frame_size=self.max_frame_size)
        if opening:
            data = bytes([self.kind]) + data
        self.out.write(data, end=end, force=force)


# --- request streams ---------------------------------------------------------------------


class _Response(enum.Enum):
    WAITING = "waiting"  # request sent, nothing back yet
    STREAMING = "streaming"  # token chunks flowing
    BODY = "body"  # non-streamed body received / sent, usage still due
    DONE = "done"  # usage: success
    FAILED = "failed"  # request error
    ABORTED = "aborted"  # reset or protocol error

    @property
    def terminal(self) -> bool:
        return self in (_Response.DONE, _Response.FAILED, _Response.ABORTED)


class RequestSender(StreamChannel):
    """Our side of a request we forward to the peer."""

    kind = ChannelKind.REQUEST

    def __init__(self, stream_id: int, request: InferenceRequest, out: SendBuffer, max_frame_size: int) -> None:
        super().__init__(stream_id, out, max_frame_size)
        self.request = request
        self.state = _Response.WAITING
        self.next_index = 0
        self.cancelling = False
        self._send(request, force=True, opening=True)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def receive(self, data: bytes, end_stream: bool, now: float, emit: list[Event]) -> None:
        for frame in self.decoder.feed(data):
            self._on_frame(frame, emit)
        if end_stream:
            self.decoder.finish()
            self.recv_ended = True
            if not self.state.terminal:
                raise StreamEndedEarly("the response ended without usage or a request error")

    def _on_frame(self, frame: Frame, emit: list[Event]) -> None:
        if self.state.terminal:
            raise UnexpectedFrame(f"{frame.TAG} frame after the end of the response")
        if getattr(frame, "request_id", None) != self.request_id:
            raise UnexpectedFrame(f"{frame.TAG} frame does not belong to request {self.request_id!r}")
        if isinstance(frame, TokenChunk) and self.state in (_Response.WAITING, _Response.STREAMING):
            if frame.index != self.next_index:
                raise UnexpectedFrame(f"token chunk {frame.index} where {self.next_index} was due")
            self.next_index += 1
            self.state = _Response.STREAMING
            emit.append(TokenReceived(self.stream_id, self.request_id, frame))
        elif isinstance(frame, ResponseBody) and self.state is _Response.WAITING:
            self.state = _Response.BODY
            emit.append(ResponseReceived(self.stream_id, self.request_id, frame.body))
        elif isinstance(frame, Usage):
            self.state = _Response.DONE
            self._close_our_side()
            emit.append(RequestCompleted(self.stream_id, self.request_id, frame.prompt_tokens, frame.completion_tokens,
                                         frame.cached_tokens))
        elif isinstance(frame, RequestError):
            self.state = _Response.FAILED
            self._close_our_side()
            emit.append(
                RequestFailed(self.stream_id, self.request_id, frame.code, frame.message, frame.http_status, True)
            )
        else:
            raise UnexpectedFrame(f"{frame.TAG} frame is not allowed in a response ({self.state.value})")

    def _close_our_side(self) -> None:
        if not self.out.end_queued:
            self.out.write(b"", end=True, force=True)

    def cancel_gracefully(self, reason: str) -> None:
        """Send a cancel frame; the server still closes the response with usage or an error."""
        if self.state.terminal or self.cancelling:
            raise LocalProtocolError(f"request {self.request_id!r} is already finished or cancelling")
        self.cancelling = True
        self._send(Cancel(request_id=self.request_id, reason=reason), end=True, force=True)

    def peer_reset(self, error_code: int | None, emit: list[Event]) -> None:
        self.failed(describe_wire_code(error_code), "the peer reset the request stream", emit)

    def failed(self, code: str, message: str, emit: list[Event]) -> None:
        if not self.state.terminal:
            self.state = _Response.ABORTED
            emit.append(RequestFailed(self.stream_id, self.request_id, code, message, None, False))


class RequestReceiver(StreamChannel):
    """Our side of a request the peer asks us to serve."""

    kind = ChannelKind.REQUEST

    def __init__(self, stream_id: int, out: SendBuffer, max_frame_size: int, *, allowed: bool) -> None:
        super().__init__(stream_id, out, max_frame_size)
        self.allowed = allowed
        self.request: InferenceRequest | None = None
        self.state = _Response.WAITING
        self.refused = False
        self.next_index = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id if self.request is not None else ""

    def receive(self, data: bytes, end_stream: bool, now: float, emit: list[Event]) -> None:
        for frame in self.decoder.feed(data):
            self._on_frame(frame, now, emit)
        if end_stream:
            self.decoder.finish()
            self.recv_ended = True
            if self.request is None:
                raise StreamEndedEarly("the request stream ended before its request frame")

    def _on_frame(self, frame: Frame, now: float, emit: list[Event]) -> None:
        if self.request is None:
            if not isinstance(frame, InferenceRequest):
                raise UnexpectedFrame(f"a request stream must start with a request frame, not {frame.TAG}")
            self.request = frame
            if not self.allowed:
                self.refused = True
                self.state = _Response.FAILED
                refusal = RequestError(
                    request_id=frame.request_id,
                    code="forbidden",
                    message="this node does not grant you the 'use' role",
                    http_status=403,
                )
                self._send(refusal, end=True, force=True)
                emit.append(RequestRefused(self.stream_id, frame.request_id, "forbidden"))
                return
            deadline_at = None if frame.deadline is None else now + frame.deadline
            emit.append(RequestReceived(self.stream_id, frame, deadline_at))
        elif isinstance(frame, Cancel) and frame.request_id == self.request_id:
            if not self.state.terminal:  # a cancel crossing our final frame is not an error
                emit.append(RequestCancelled(self.stream_id, self.request_id, frame.reason, True))
        else:
            raise UnexpectedFrame(f"{frame.TAG} frame is not allowed from the requester")

    def _require(self, *states: _Response, action: str) -> str:
        if self.request is None or self.refused or self.state not in states:
            raise LocalProtocolError(f"stream {self.stream_id}: cannot {action} in state {self.state.value}")
        return self.request.request_id

    def send_token(
        self, text: str, *, token_ids: tuple[int, ...] | None = None, finish_reason: str | None = None
    ) -> None:
        request_id = self._require(_Response.WAITING, _Response.STREAMING, action="send a token")
        chunk = TokenChunk(
            request_id=request_id, index=self.next_index, text=text, token_ids=token_ids, finish_reason=finish_reason
        )
        self._send(chunk)
        self.next_index += 1
        self.state = _Response.STREAMING

    def send_response_body(self, body: dict[str, Any]) -> None:
        request_id = self._require(_Response.WAITING, action="send a response body")
        self._send(ResponseBody(request_id=request_id, body=body))
        self.state = _Response.BODY

    def send_usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> None:
        request_id = self._require(_Response.WAITING, _Response.STREAMING, _Response.BODY, action="send usage")
        usage = Usage(request_id=request_id, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      cached_tokens=cached_tokens)
        self._send(usage, end=True, force=True)
        self.state = _Response.DONE

    def send_error(self, code: str, message: str, http_status: int) -> None:
        request_id = self._require(_Response.WAITING, _Response.STREAMING, _Response.BODY, action="send an error")
        error = RequestError(request_id=request_id, code=code, message=message, http_status=http_status)
        self._send(error, end=True, force=True)
        self.state = _Response.FAILED

    def peer_reset(self, error_code: int | None, emit: list[Event]) -> None:
        reason = "cancelled" if error_code == WireCode.REQUEST_CANCELLED else describe_wire_code(error_code)
        self.failed(reason, "the requester reset the stream", emit)

    def failed(self, code: str, message: str, emit: list[Event]) -> None:
        if self.request is not None and not self.state.terminal:
            self.state = _Response.ABORTED
            emit.append(RequestCancelled(self.stream_id, self.request_id, code, False))


# --- tensor, cache and events channels ---------------------------------------------------


class _Setup(enum.Enum):
    AWAITING = "awaiting"  # opener: waiting for the ack; acceptor: waiting for the setup frame
    PENDING = "pending"  # acceptor: setup received, local decision due
    OPEN = "open"
    REFUSED = "refused"
    CLOSED = "closed"  # ended or aborted


class ChannelOpener(StreamChannel):
    """Our side of a tensor, cache or events channel we opened."""

    def __init__(
        self, stream_id: int, kind: ChannelKind, setup: SetupFrame, out: SendBuffer, max_frame_size: int
    ) -> None:
        if not isinstance(setup, SETUP_FRAMES.get(kind, ())):
            raise LocalProtocolError(f"a {kind.name.lower()} channel cannot open with a {setup.TAG} frame")
        self.kind = kind  # type: ignore[misc]  # per instance: one class serves three kinds
        super().__init__(stream_id, out, max_frame_size)
        self.setup = setup
        self.state = _Setup.AWAITING
        self._send(setup, force=True, opening=True)

    def receive(self, data: bytes, end_stream: bool, now: float, emit: list[Event]) -> None:
        if self.state is _Setup.AWAITING and data:
            frames, data = self.decoder.feed_until(data, max_frames=1)
            for frame in frames:
                self._on_answer(frame, emit)
        if data:
            if self.state is not _Setup.OPEN:
                raise UnexpectedFrame(f"data on a {self.state.value} channel")
            if self.kind in RAW_KINDS:
                emit.append(ChannelDataReceived(self.stream_id, data))
            else:
                for frame in self.decoder.feed(data):
                    if not isinstance(frame, MeshEvent):
                        raise UnexpectedFrame(f"{frame.TAG} frame on an events channel")
                    emit.append(MeshEventReceived(self.stream_id, frame))
        if end_stream:
            self.decoder.finish()
            self.recv_ended = True
            if self.state is _Setup.AWAITING:
                raise StreamEndedEarly("the channel ended before it was accepted or refused")
            if self.state is _Setup.OPEN:
                self.state = _Setup.CLOSED
                emit.append(ChannelEnded(self.stream_id))

    def _on_answer(self, frame: Frame, emit: list[Event]) -> None:
        if isinstance(frame, ChannelAck):
            self.state = _Setup.OPEN
            emit.append(ChannelOpened(self.stream_id, self.kind, frame.params))
        elif isinstance(frame, Refused):
            self.state = _Setup.REFUSED
            if not self.out.end_queued:
                self.out.write(b"", end=True, force=True)
            emit.append(ChannelRefused(self.stream_id, self.kind, frame.code, frame.message, True))
        else:
            raise UnexpectedFrame(f"{frame.TAG} frame where a channel ack or refusal was due")

    def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        if self.state is not _Setup.OPEN or self.kind not in RAW_KINDS:
            raise LocalProtocolError(f"stream {self.stream_id}: no raw data on a {self.state.value} channel")
        self.out.write(data, end=end_stream)

    def peer_reset(self, error_code: int | None, emit: list[Event]) -> None:
        self.failed(describe_wire_code(error_code), "the peer reset the channel", emit)

    def failed(self, code: str, message: str, emit: list[Event]) -> None:
        if self.state in (_Setup.AWAITING, _Setup.OPEN):
            emit.append(ChannelAborted(self.stream_id, code))
        self.state = _Setup.CLOSED


class ChannelAcceptor(StreamChannel):
    """Our side of a tensor, cache or events channel the peer opened."""

    def __init__(
        self, stream_id: int, kind: ChannelKind, out: SendBuffer, max_frame_size: int, *, allowed: bool
    ) -> None:
        self.kind = kind  # type: ignore[misc]
        super().__init__(stream_id, out, max_frame_size)
        self.allowed = allowed
        self.state = _Setup.AWAITING
        self.setup: SetupFrame | None = None

    def receive(self, data: bytes, end_stream: bool, now: float, emit: list[Event]) -> None:
        if self.state is _Setup.AWAITING and data:
            frames, data = self.decoder.feed_until(data, max_frames=1)
            for frame in frames:
                self._on_setup(frame, emit)
        if data and self.state is not _Setup.REFUSED:
            # Once refused, bytes the opener sent before reading the refusal are dropped.
            if self.state is not _Setup.OPEN or self.kind not in RAW_KINDS:
                raise UnexpectedFrame(f"data from the opener on a {self.state.value} {self.kind.name.lower()} channel")
            emit.append(ChannelDataReceived(self.stream_id, data))
        if end_stream:
            if self.state is _Setup.AWAITING:
                self.decoder.finish()
                raise StreamEndedEarly("the channel ended before its setup frame")
            self.recv_ended = True
            if self.state in (_Setup.OPEN, _Setup.PENDING):
                emit.append(ChannelEnded(self.stream_id))

    def _on_setup(self, frame: Frame, emit: list[Event]) -> None:
        if not isinstance(frame, SETUP_FRAMES[self.kind]):
            raise UnexpectedFrame(f"a {self.kind.name.lower()} channel cannot open with a {frame.TAG} frame")
        self.setup = frame  # type: ignore[assignment]
        if not self.allowed:
            role = CHANNEL_ROLES[self.kind]
            message = f"this node does not grant you the {role!r} role"
            self._refuse("forbidden", message)
            emit.append(ChannelRefused(self.stream_id, self.kind, "forbidden", message, False))
            return
        self.state = _Setup.PENDING
        emit.append(ChannelRequested(self.stream_id, self.kind, frame))  # type: ignore[arg-type]

    def _refuse(self, code: str, message: str) -> None:
        self.state = _Setup.REFUSED
        self._send(Refused(code=code, message=message), end=True, force=True)

    def accept(self, params: dict[str, Any] | None = None) -> None:
        if self.state is not _Setup.PENDING:
            raise LocalProtocolError(f"stream {self.stream_id}: cannot accept a {self.state.value} channel")
        self._send(ChannelAck(params=params or {}), force=True)
        self.state = _Setup.OPEN

    def refuse(self, code: str, message: str) -> None:
        if self.state is not _Setup.PENDING:
            raise LocalProtocolError(f"stream {self.stream_id}: cannot refuse a {self.state.value} channel")
        self._refuse(code, message)

    def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        if self.state is not _Setup.OPEN or self.kind not in RAW_KINDS:
            raise LocalProtocolError(f"stream {self.stream_id}: no raw data on a {self.state.value} channel")
        self.out.write(data, end=end_stream)

    def send_event(self, event: MeshEvent, *, end_stream: bool = False) -> None:
        if self.state is not _Setup.OPEN or self.kind is not ChannelKind.EVENTS:
            raise LocalProtocolError(f"stream {self.stream_id}: not an open events channel")
        self._send(event, end=end_stream)

    def peer_reset(self, error_code: int | None, emit: list[Event]) -> None:
        self.failed(describe_wire_code(error_code), "the peer reset the channel", emit)

    def failed(self, code: str, message: str, emit: list[Event]) -> None:
        if self.state in (_Setup.PENDING, _Setup.OPEN):
            emit.append(ChannelAborted(self.stream_id, code))
        self.state = _Setup.CLOSED


__all__ = [
    "CHANNEL_ROLES",
    "RAW_KINDS",
    "SETUP_FRAMES",
    "ChannelAcceptor",
    "ChannelKind",
    "ChannelOpener",
    "RequestReceiver",
    "RequestSender",
    "SendBuffer",
    "StreamChannel",
]

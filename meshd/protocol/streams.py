"""The session's table of open streams (everything but the control stream).

Allocates our stream ids with QUIC's numbering, feeds the peer's bytes to each
stream's machine, turns a machine's ``ProtocolError`` into a reset of that one
stream, remembers recently closed ids so late data is ignored, holds peer
streams that race ahead of the handshake (bounded), and collects what is
ready to send. Events go to the deque the session owns.
"""

from __future__ import annotations

from collections.abc import Callable

import logging
from collections import OrderedDict, deque
from typing import TypeVar

from .channels import SendBuffer, StreamChannel
from .errors import LocalProtocolError, ProtocolError, UnexpectedChannel, WireCode, describe_wire_code
from .events import Event, ResetStream, StreamProtocolError, StreamWritable, Transmit

logger = logging.getLogger(__name__)

RECENTLY_CLOSED = 1024  # ids remembered; QUIC itself drops frames for long-finished streams
# Peer reset codes that mean "your bytes broke the protocol" (reported as StreamProtocolError).
PROTOCOL_WIRE_CODES = frozenset(range(WireCode.PROTOCOL_ERROR, WireCode.SEND_BUFFER_FULL + 1))

M = TypeVar("M", bound=StreamChannel)


class StreamTable:
    def __init__(
        self,
        *,
        is_client: bool,
        peer_node_id: str,
        events: deque[Event],
        buffer_limit: int,
        high_watermark: int,
        low_watermark: int,
        early_budget: int,
    ) -> None:
        self.is_client = is_client
        self.peer_node_id = peer_node_id
        self._events = events
        self._buffer_limits = (buffer_limit, high_watermark, low_watermark)
        self._early_budget = early_budget
        self._next_id = 0 if is_client else 1
        self._streams: dict[int, StreamChannel] = {}
        self._closed: OrderedDict[int, None] = OrderedDict()
        self._early: dict[int, list[tuple[bytes, bool]]] = {}
        self._early_bytes = 0
        self._resets: list[ResetStream] = []

    # --- ids and buffers ----------------------------------------------------------------------

    def allocate_id(self) -> int:
        stream_id = self._next_id
        self._next_id += 4
        return stream_id

    def is_local(self, stream_id: int) -> bool:
        return (stream_id & 1) == (0 if self.is_client else 1)

    def new_buffer(self, stream_id: int) -> SendBuffer:
        limit, high, low = self._buffer_limits
        return SendBuffer(stream_id, limit=limit, high_watermark=high, low_watermark=low)

    # --- lookup -------------------------------------------------------------------------------

    def __contains__(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def get(self, stream_id: int, cls: type[M]) -> M:
        """The open stream ``stream_id`` if it is a ``cls``; ``LocalProtocolError`` otherwise."""
        machine = self._streams.get(stream_id)
        if not isinstance(machine, cls):
            raise LocalProtocolError(f"stream {stream_id} is not an open {cls.__name__} stream")
        return machine

    def is_stale(self, stream_id: int) -> bool:
        """Data for this id belongs to a stream we closed or never opened: ignore it."""
        return stream_id in self._closed or self.is_local(stream_id)

    def peer_stream_count(self) -> int:
        return sum(1 for stream_id in self._streams if not self.is_local(stream_id))

    def add(self, machine: StreamChannel) -> None:
        self._streams[machine.stream_id] = machine

    # --- the peer's bytes ---------------------------------------------------------------------

    def feed(self, stream_id: int, data: bytes, end_stream: bool, now: float) -> None:
        """Hand bytes to an open stream's machine; a protocol error resets just that stream."""
        machine = self._streams[stream_id]
        emit: list[Event] = []
        try:
            machine.receive(data, end_stream, now, emit)
        except ProtocolError as exc:
            machine.failed(exc.code, exc.message, emit)
            self._events.extend(emit)
            del self._streams[stream_id]
            machine.out.abort()
            self.reject(stream_id, exc)
            return
        self._events.extend(emit)
        self._forget_if_finished(machine)

    def reject(self, stream_id: int, exc: ProtocolError) -> None:
        """Reset a stream because of ``exc`` and report it."""
        logger.warning(
            "stream protocol error",
            extra={"peer": self.peer_node_id, "stream_id": stream_id, "code": exc.code, "detail": exc.message},
        )
        self._remember_closed(stream_id)
        self._events.append(StreamProtocolError(stream_id, exc.code, int(exc.wire_code), exc.message, False))
        self._resets.append(ResetStream(stream_id, int(exc.wire_code)))

    def peer_reset(self, stream_id: int, error_code: int | None) -> None:
        if self._early.pop(stream_id, None) is not None:
            return
        machine = self._streams.pop(stream_id, None)
        if machine is None:
            return
        self._remember_closed(stream_id)
        emit: list[Event] = []
        machine.peer_reset(error_code, emit)
        if error_code in PROTOCOL_WIRE_CODES:
            code = describe_wire_code(error_code)
            emit.append(StreamProtocolError(stream_id, code, int(error_code or 0), "reset by the peer", True))
        self._events.extend(emit)
        if not machine.out.end_sent:
            # Abort our direction too, so QUIC stops retransmitting what nobody will read.
            machine.out.abort()
            self._resets.append(ResetStream(stream_id, WireCode.NO_ERROR if error_code is None else error_code))

    def abort(self, stream_id: int, code: WireCode) -> None:
        """Reset a stream on the local side's request; no events."""
        machine = self._streams.pop(stream_id)
        self._remember_closed(stream_id)
        machine.out.abort()
        self._resets.append(ResetStream(stream_id, int(code)))

    # --- streams that raced ahead of the handshake --------------------------------------------

    def is_early(self, stream_id: int) -> bool:
        return stream_id in self._early

    def hold_early(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Keep a peer stream that arrived before the handshake completed, within a byte budget."""
        if self._early_bytes + len(data) > self._early_budget:
            self._early.pop(stream_id, None)
            self.reject(stream_id, UnexpectedChannel("too much stream data before the handshake completed"))
            return
        self._early_bytes += len(data)
        self._early.setdefault(stream_id, []).append((data, end_stream))

    def take_early(self) -> list[tuple[int, bytes, bool]]:
        """The held streams as (stream id, all their bytes, ended), in arrival order."""
        early, self._early, self._early_bytes = self._early, {}, 0
        return [
            (stream_id, b"".join(chunk for chunk, _ in chunks), any(end for _, end in chunks))
            for stream_id, chunks in early.items()
        ]

    # --- output and teardown ------------------------------------------------------------------

    def collect(self, max_bytes: int | None | Callable[[int], int], out: list[Transmit]) -> None:
        """Append every stream's ready bytes, then the pending resets, to ``out``.

        ``max_bytes`` is one cap for every stream, or a function of the stream
        id (the transport's per-stream room), or None for everything.
        """
        for machine in list(self._streams.values()):
            limit = max_bytes(machine.stream_id) if callable(max_bytes) else max_bytes
            chunk = machine.out.take(limit)
            if chunk is not None:
                out.append(chunk)
            if machine.out.drained():
                self._events.append(StreamWritable(machine.stream_id))
            self._forget_if_finished(machine)
        out.extend(self._resets)
        self._resets.clear()

    def fail_all(self, code: str, reason: str) -> None:
        """The connection is ending: every open stream reports its loss; nothing more is sent."""
        emit: list[Event] = []
        for machine in self._streams.values():
            machine.failed(code, reason, emit)
            machine.out.abort()
        self._events.extend(emit)
        self._streams.clear()
        self._early.clear()
        self._early_bytes = 0
        self._resets.clear()

    def forget_if_finished(self, stream_id: int) -> None:
        machine = self._streams.get(stream_id)
        if machine is not None:
            self._forget_if_finished(machine)

    def _forget_if_finished(self, machine: StreamChannel) -> None:
        if machine.finished and self._streams.get(machine.stream_id) is machine:
            del self._streams[machine.stream_id]
            self._remember_closed(machine.stream_id)

    def _remember_closed(self, stream_id: int) -> None:
        self._closed[stream_id] = None
        while len(self._closed) > RECENTLY_CLOSED:
            self._closed.popitem(last=False)


__all__ = ["StreamTable"]

"""The protocol error family and the wire codes they carry.

Every error has a stable string ``code`` (for logs, events and the admin API)
and a small-integer ``wire_code``: the QUIC application error code used when a
stream is reset or the connection is closed because of it. ``WireCode`` is the
complete list; docs/protocol.md has the table.

Errors raised while handling the peer's bytes (``FrameError``,
``ChannelError``) close one stream or, on the control stream, the connection.
``LocalProtocolError`` means the local caller misused the session API; it is
never sent to the peer.
"""

from __future__ import annotations

import enum


class WireCode(enum.IntEnum):
    """QUIC application error codes (RESET_STREAM, STOP_SENDING, CONNECTION_CLOSE)."""

    NO_ERROR = 0x00
    PROTOCOL_ERROR = 0x01
    FRAME_TOO_LARGE = 0x02
    MALFORMED_FRAME = 0x03
    UNKNOWN_FRAME_TYPE = 0x04
    INVALID_FRAME = 0x05
    UNEXPECTED_FRAME = 0x06
    TRUNCATED_FRAME = 0x07
    UNKNOWN_CHANNEL = 0x08
    UNEXPECTED_CHANNEL = 0x09
    TOO_MANY_STREAMS = 0x0A
    SEND_BUFFER_FULL = 0x0B
    VERSION_MISMATCH = 0x10
    UNTRUSTED = 0x11
    FORBIDDEN = 0x12
    NODE_ID_MISMATCH = 0x13
    PEER_TIMEOUT = 0x14
    DUPLICATE_CONNECTION = 0x15
    CONNECTION_CLOSED = 0x16
    REQUEST_CANCELLED = 0x20
    CACHE_REJECTED = 0x21  # a KV cache failed verification (checksum, model, descriptor) and was not loaded
    TUNNEL_BROKEN = 0x22  # the local end of a tensor tunnel (e.g. an RPC worker) went away

    @property
    def code(self) -> str:
        """The string form used in events and refusal frames, e.g. ``"frame_too_large"``."""
        return self.name.lower()


def describe_wire_code(value: int | None) -> str:
    """The string code for a wire code received from the peer (``"unknown_0x2a"`` if unknown)."""
    if value is None:
        return "unknown"
    try:
        return WireCode(value).code
    except ValueError:
        return f"unknown_{value:#x}"


class ProtocolError(Exception):
    """Base of every error raised by ``meshd.protocol``."""

    code: str = "protocol_error"
    wire_code: WireCode = WireCode.PROTOCOL_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- one frame could not be decoded or encoded ------------------------------------------


class FrameError(ProtocolError):
    """A single frame is unusable; the stream it arrived on is closed."""


class FrameTooLarge(FrameError):
    code = "frame_too_large"
    wire_code = WireCode.FRAME_TOO_LARGE

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the {limit}-byte limit")
        self.size = size
        self.limit = limit


class MalformedFrame(FrameError):
    """The bytes are not one msgpack map."""

    code = "malformed_frame"
    wire_code = WireCode.MALFORMED_FRAME


class UnknownFrameType(FrameError):
    code = "unknown_frame_type"
    wire_code = WireCode.UNKNOWN_FRAME_TYPE

    def __init__(self, tag: object) -> None:
        super().__init__(f"unknown frame type {tag!r}")
        self.tag = tag


class InvalidFrame(FrameError):
    """A known frame type with missing, unknown or wrongly typed fields."""

    code = "invalid_frame"
    wire_code = WireCode.INVALID_FRAME


class TruncatedFrame(FrameError):
    """The stream ended in the middle of a frame."""

    code = "truncated_frame"
    wire_code = WireCode.TRUNCATED_FRAME


# --- a stream broke its channel's rules --------------------------------------------------


class ChannelError(ProtocolError):
    """A stream's bytes are well-formed frames but break the channel's state machine."""


class UnknownChannelKind(ChannelError):
    code = "unknown_channel"
    wire_code = WireCode.UNKNOWN_CHANNEL

    def __init__(self, kind: int) -> None:
        super().__init__(f"unknown channel kind {kind:#04x}")
        self.kind = kind


class UnexpectedChannel(ChannelError):
    """A known channel kind where it is not allowed (a second control stream, say)."""

    code = "unexpected_channel"
    wire_code = WireCode.UNEXPECTED_CHANNEL


class UnexpectedFrame(ChannelError):
    """A valid frame in the wrong place: wrong channel, wrong order, wrong request id."""

    code = "unexpected_frame"
    wire_code = WireCode.UNEXPECTED_FRAME


class StreamEndedEarly(ChannelError):
    """The peer finished its side of a stream before the channel's closing frame."""

    code = "stream_ended_early"
    wire_code = WireCode.TRUNCATED_FRAME


class TooManyStreams(ChannelError):
    code = "too_many_streams"
    wire_code = WireCode.TOO_MANY_STREAMS


# --- the local caller misused the API ----------------------------------------------------


class LocalProtocolError(ProtocolError):
    """The local caller asked for something the protocol does not allow right now."""

    code = "local_protocol_error"


class SendBufferFull(LocalProtocolError):
    """A stream's bounded send buffer is full: wait for ``StreamWritable`` and retry."""

    code = "send_buffer_full"
    wire_code = WireCode.SEND_BUFFER_FULL

    def __init__(self, stream_id: int, pending: int, limit: int) -> None:
        super().__init__(f"stream {stream_id} has {pending} bytes queued; the limit is {limit}")
        self.stream_id = stream_id
        self.pending = pending
        self.limit = limit


__all__ = [
    "ChannelError",
    "FrameError",
    "FrameTooLarge",
    "InvalidFrame",
    "LocalProtocolError",
    "MalformedFrame",
    "ProtocolError",
    "SendBufferFull",
    "StreamEndedEarly",
    "TooManyStreams",
    "TruncatedFrame",
    "UnexpectedChannel",
    "UnexpectedFrame",
    "UnknownChannelKind",
    "UnknownFrameType",
    "WireCode",
    "describe_wire_code",
]

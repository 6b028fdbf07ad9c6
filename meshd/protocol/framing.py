"""Length-prefixed msgpack framing and a bounded, sans-IO frame decoder.

On the wire a frame is a 4-byte big-endian unsigned length followed by that
many bytes holding exactly one msgpack map (see ``frames``). Lengths of zero
or above the decoder's ``max_frame_size`` are errors; the decoder rejects an
oversize frame as soon as its header arrives, so it never holds more than
``HEADER_SIZE + max_frame_size`` bytes of the peer's data.
"""

from __future__ import annotations

import enum
import struct
import threading

import msgpack

from .errors import FrameTooLarge, InvalidFrame, MalformedFrame, ProtocolError, TruncatedFrame
from .frames import Frame, frame_from_map

HEADER_SIZE = 4
DEFAULT_MAX_FRAME_SIZE = 4 * 1024 * 1024
"""Large enough for a long chat prompt in one ``request`` frame."""
HARD_MAX_FRAME_SIZE = 2**32 - 1


class ChannelKind(enum.IntEnum):
    """The one byte that starts every stream and selects its channel."""

    CONTROL = 0x01  # one per connection, opened by the dialler: hello, capabilities, heartbeats
    REQUEST = 0x02  # one per forwarded inference request
    TENSOR = 0x03  # tensor envelopes or tunnelled shard traffic (raw bytes after setup)
    CACHE = 0x04  # KV-cache transfer (raw bytes after setup)
    EVENTS = 0x05  # a subscription to mesh events


# Errors msgpack raises for bytes that are not one well-formed object: bad
# type bytes, truncation, trailing data, invalid UTF-8, non-string map keys,
# nesting beyond its stack limit.
_UNPACK_ERRORS = (ValueError, TypeError, OverflowError, msgpack.UnpackException)
_HEADER = struct.Struct(">I")  # HEADER_SIZE bytes, big-endian length
_packers = threading.local()  # one reusable Packer per thread (msgpack.packb builds one per call)


def _packer() -> msgpack.Packer:
    try:
        return _packers.packer
    except AttributeError:
        # autoreset: pack() returns the bytes and starts empty again, also after an error
        _packers.packer = msgpack.Packer(use_bin_type=True)
        return _packers.packer


def encode_frame(frame: Frame, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Serialize ``frame`` with its length prefix.

    Raises ``InvalidFrame`` if a map field holds something msgpack cannot
    carry, and ``FrameTooLarge`` if the body exceeds ``max_frame_size``: the
    peer would reject it, so it is refused before it is sent.
    """
    try:
        body = _packer().pack(frame.to_wire())
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidFrame(f"{frame.TAG}: cannot be encoded: {exc}") from exc
    if len(body) > max_frame_size:
        raise FrameTooLarge(len(body), max_frame_size)
    return _HEADER.pack(len(body)) + body


def decode_frame_body(body: bytes | memoryview) -> Frame:
    """Decode one frame body (without its length prefix)."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except _UNPACK_ERRORS as exc:
        raise MalformedFrame(f"frame body is not one msgpack object: {exc}") from exc
    if type(obj) is not dict:  # msgpack builds plain dicts; anything else is another msgpack type
        raise MalformedFrame(f"frame body is a msgpack {type(obj).__name__}, not a map")
    return frame_from_map(obj)  # ours alone: consumed, not copied


class FrameDecoder:
    """Turns a stream's bytes into frames, holding at most one partial frame.

    After it raises, the decoder is broken: the stream must be closed, and
    every later call raises the same error again.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if not 0 < max_frame_size <= HARD_MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be in 1..{HARD_MAX_FRAME_SIZE}, got {max_frame_size}")
        self.max_frame_size = max_frame_size
        self._partial = bytearray()
        self._body_length: int | None = None  # known once the header is complete
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of the current partial frame held (header or body)."""
        return len(self._partial)

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is held: ending the stream here is clean."""
        return self._body_length is None and not self._partial

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Consume ``data`` and return every frame it completes."""
        if type(data) is bytes and self._body_length is None and not self._partial and self._error is None:
            # The usual control and request message: exactly one whole frame in one chunk.
            size = len(data)
            if size > HEADER_SIZE and _HEADER.unpack_from(data)[0] == size - HEADER_SIZE <= self.max_frame_size:
                try:
                    with memoryview(data) as view:
                        return [decode_frame_body(view[HEADER_SIZE:])]
                except ProtocolError as exc:
                    self._error = exc
                    raise
        frames, _ = self.feed_until(data, max_frames=None)
        return frames

    def feed_until(self, data: bytes | bytearray | memoryview, max_frames: int | None) -> tuple[list[Frame], bytes]:
        """Decode at most ``max_frames`` frames; return them and the bytes after the last one.

        Channels that switch to raw bytes after a setup frame use this with
        ``max_frames=1``; the remainder is returned, not buffered.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._feed(memoryview(data).cast("B"), max_frames)
        except ProtocolError as exc:
            self._error = exc
            self._partial = bytearray()
            raise

    def finish(self) -> None:
        """The stream ended: raise ``TruncatedFrame`` if a frame was cut short."""
        if self._error is not None:
            raise self._error
        if not self.at_boundary:
            self._error = TruncatedFrame(f"stream ended inside a frame ({len(self._partial)} bytes held)")
            raise self._error

    def _feed(self, view: memoryview, max_frames: int | None) -> tuple[list[Frame], bytes]:
        frames: list[Frame] = []
        pos, end = 0, len(view)
        while pos < end and (max_frames is None or len(frames) < max_frames):
            if self._body_length is None:
                if not self._partial and end - pos >= HEADER_SIZE:
                    (length,) = _HEADER.unpack_from(view, pos)
                    pos += HEADER_SIZE
                else:
                    take = min(HEADER_SIZE - len(self._partial), end - pos)
                    self._partial += view[pos : pos + take]
                    pos += take
                    if len(self._partial) < HEADER_SIZE:
                        break
                    length = int.from_bytes(self._partial, "big")
                    self._partial.clear()
                if length == 0:
                    raise MalformedFrame("zero-length frame")
                if length > self.max_frame_size:
                    raise FrameTooLarge(length, self.max_frame_size)
                self._body_length = length
                continue
            need = self._body_length - len(self._partial)
            if not self._partial and end - pos >= need:
                # Fast path: the whole body is in this chunk; decode it without copying.
                frames.append(decode_frame_body(view[pos : pos + need]))
                pos += need
            else:
                take = min(need, end - pos)
                self._partial += view[pos : pos + take]
                pos += take
                if len(self._partial) < self._body_length:
                    break
                frames.append(decode_frame_body(bytes(self._partial)))
                self._partial.clear()
            self._body_length = None
        return frames, bytes(view[pos:])


__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "ChannelKind",
    "HEADER_SIZE",
    "FrameDecoder",
    "decode_frame_body",
    "encode_frame",
]

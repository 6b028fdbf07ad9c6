"""What a ``PeerSession`` reports (events) and what it asks the transport to do (transmits).

Events are frozen dataclasses named in the past tense, returned one at a time
by ``PeerSession.next_event()``. Transmits are returned in order by
``PeerSession.data_to_send()``; the QUIC glue performs them in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .frames import CacheOffer, CacheRequest, EventsSubscribe, InferenceRequest, MeshEvent, TensorOpen, TokenChunk
from .framing import ChannelKind


class Event:
    """Base of every session event."""

    __slots__ = ()


# --- connection level --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloReceived(Event):
    """The peer introduced itself (a hello or hello ack), before any decision about it."""

    node_id: str
    protocol_version: int
    software: str
    capabilities_hint: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class PeerAccepted(Event):
    """The handshake completed: both sides trust each other at the same version.

    ``granted_roles`` are the roles we grant the peer; ``peer_granted_roles``
    the roles it grants us (known to the dialler from the hello ack; empty on
    the acceptor's side, which is not told).
    """

    node_id: str
    software: str
    granted_roles: frozenset[str]
    peer_granted_roles: frozenset[str]


@dataclass(frozen=True, slots=True)
class PeerRefused(Event):
    """We refused the peer (``untrusted``, ``node_id_mismatch``, ``version_mismatch``)."""

    node_id: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class RefusedByPeer(Event):
    """The peer refused us; the connection is being closed."""

    node_id: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class VersionMismatched(Event):
    """The two sides speak different protocol versions; no traffic is possible."""

    node_id: str
    local_version: int
    peer_version: int


@dataclass(frozen=True, slots=True)
class CapabilitiesReceived(Event):
    """A capability announcement passed the verifier; ``payload`` is what it returned."""

    node_id: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CapabilitiesRejected(Event):
    """A capability announcement failed verification and was ignored."""

    node_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class HeartbeatMeasured(Event):
    node_id: str
    rtt: float


@dataclass(frozen=True, slots=True)
class PeerTimedOut(Event):
    """Nothing was heard from the peer for ``silent_for`` seconds (``phase``: handshake or established)."""

    node_id: str
    phase: str
    silent_for: float


@dataclass(frozen=True, slots=True)
class SessionClosed(Event):
    """The session is over; always the last event. ``code`` is a ``WireCode`` string code."""

    node_id: str
    code: str
    reason: str
    by_peer: bool


# --- any stream --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamProtocolError(Event):
    """A stream was closed because of a protocol error (ours to report, or the peer's reset).

    ``by_peer`` is False when we detected the error in the peer's bytes and
    reset the stream with ``wire_code``; True when the peer reset a stream
    with a protocol error code.
    """

    stream_id: int
    code: str
    wire_code: int
    message: str
    by_peer: bool


@dataclass(frozen=True, slots=True)
class StreamWritable(Event):
    """A stream's send buffer drained below its low watermark after being above the high one."""

    stream_id: int


# --- request channel ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived(Event):
    """A trusted peer with the ``use`` role asked us to serve ``request``.

    ``deadline_at`` is the request's time budget on the session clock.
    """

    stream_id: int
    request: InferenceRequest
    deadline_at: float | None


@dataclass(frozen=True, slots=True)
class RequestRefused(Event):
    """We refused a request stream (the peer lacks ``use``); it got a request error."""

    stream_id: int
    request_id: str
    code: str


@dataclass(frozen=True, slots=True)
class RequestCancelled(Event):
    """The requester cancelled: ``graceful`` with a cancel frame (still close with usage or
    error), otherwise by resetting the stream (stop at once, send nothing more)."""

    stream_id: int
    request_id: str
    reason: str
    graceful: bool


@dataclass(frozen=True, slots=True)
class TokenReceived(Event):
    stream_id: int
    request_id: str
    chunk: TokenChunk


@dataclass(frozen=True, slots=True)
class ResponseReceived(Event):
    """The whole body of a non-streamed response."""

    stream_id: int
    request_id: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RequestCompleted(Event):
    stream_id: int
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class RequestFailed(Event):
    """A request we sent ended without success.

    ``by_peer`` is True for a request error frame from the server (its
    ``code``/``http_status``); False for local causes such as a protocol error,
    a reset, or the connection closing (``http_status`` is then None).
    """

    stream_id: int
    request_id: str
    code: str
    message: str
    http_status: int | None
    by_peer: bool


# --- tensor, cache and events channels ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelRequested(Event):
    """The peer opened a channel we may accept; answer with ``accept_channel`` or ``refuse_channel``."""

    stream_id: int
    kind: ChannelKind
    setup: TensorOpen | CacheOffer | CacheRequest | EventsSubscribe


@dataclass(frozen=True, slots=True)
class ChannelOpened(Event):
    """The peer accepted a channel we opened."""

    stream_id: int
    kind: ChannelKind
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ChannelRefused(Event):
    """A channel was refused: by the peer (``by_peer``) or by us for a missing role."""

    stream_id: int
    kind: ChannelKind
    code: str
    message: str
    by_peer: bool


@dataclass(frozen=True, slots=True)
class ChannelDataReceived(Event):
    """Raw bytes on an open tensor or cache channel."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MeshEventReceived(Event):
    stream_id: int
    event: MeshEvent


@dataclass(frozen=True, slots=True)
class ChannelEnded(Event):
    """The peer finished its side of an open channel cleanly."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ChannelAborted(Event):
    """An open channel was reset (by the peer, or because the connection ended)."""

    stream_id: int
    code: str


# --- what the transport must do ----------------------------------------------------------


class Transmit:
    """Base of what ``data_to_send()`` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class StreamData(Transmit):
    """Send ``data`` on ``stream_id`` (creating it if new); ``end_stream`` sends FIN."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(frozen=True, slots=True)
class ResetStream(Transmit):
    """Abort both directions of ``stream_id``: RESET_STREAM and STOP_SENDING with ``error_code``."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class CloseConnection(Transmit):
    """Close the QUIC connection (CONNECTION_CLOSE with an application error code)."""

    error_code: int
    reason: str


__all__ = [
    "CapabilitiesReceived",
    "CapabilitiesRejected",
    "ChannelAborted",
    "ChannelDataReceived",
    "ChannelEnded",
    "ChannelOpened",
    "ChannelRefused",
    "ChannelRequested",
    "CloseConnection",
    "Event",
    "HeartbeatMeasured",
    "HelloReceived",
    "MeshEventReceived",
    "PeerAccepted",
    "PeerRefused",
    "PeerTimedOut",
    "RefusedByPeer",
    "RequestCancelled",
    "RequestCompleted",
    "RequestFailed",
    "RequestReceived",
    "RequestRefused",
    "ResetStream",
    "ResponseReceived",
    "SessionClosed",
    "StreamData",
    "StreamProtocolError",
    "StreamWritable",
    "TokenReceived",
    "Transmit",
    "VersionMismatched",
]

"""Property tests: whatever a peer sends, a PeerSession answers with events, never exceptions."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.protocol import (
    ROLES,
    Cancel,
    ChannelKind,
    Event,
    InferenceRequest,
    PeerSession,
    RequestCompleted,
    RequestFailed,
    RequestReceived,
    ResetStream,
    SessionClosed,
    StreamProtocolError,
    TokenChunk,
    TokenReceived,
    Transmit,
    Usage,
    encode_frame,
    trust_roles,
)
from meshd.protocol.loopback import Loopback, drain

# FUZZ_EXAMPLES=5000 runs a deeper search by hand; the default keeps the suite fast.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FUZZ_STREAMS = st.sampled_from([400, 404, 408, 412])  # client-initiated ids far above the real ones


def verify(record: bytes, node_id: str, now: float) -> dict[str, Any]:
    return {"record": record}


def established() -> tuple[PeerSession, PeerSession, Loopback]:
    def session(local: str, peer: str, is_client: bool) -> PeerSession:
        return PeerSession(
            local_node_id=local, peer_node_id=peer, is_client=is_client, now=0.0,
            is_trusted=trust_roles(ROLES), verify_capabilities=verify,
        )

    client, server = session("NODEA", "NODEB", True), session("NODEB", "NODEA", False)
    link = Loopback(client, server)
    link.pump(0.0)
    drain(client)
    drain(server)
    return client, server, link


def chat(request_id: str) -> InferenceRequest:
    return InferenceRequest(request_id=request_id, kind="chat", model="m", body={"x": 1}, data_class="public")


def feed(session: PeerSession, stream_id: int, data: bytes, end: bool) -> tuple[list[Event], list[Transmit]]:
    session.receive_stream_data(stream_id, data, end, 1.0)
    events, transmits = drain(session), session.data_to_send()
    assert all(isinstance(e, Event) for e in events)
    assert all(isinstance(t, Transmit) for t in transmits)
    for error in events:
        if isinstance(error, StreamProtocolError):
            assert ResetStream(error.stream_id, error.wire_code) in transmits
    return events, transmits


def still_serving(client: PeerSession, server: PeerSession, link: Loopback) -> None:
    assert client.established and server.established
    stream_id = client.open_request_stream(chat("after-fuzz"), 2.0)
    link.pump(2.0)
    received = [e for e in drain(server) if isinstance(e, RequestReceived)]
    assert [e.request.request_id for e in received] == ["after-fuzz"]
    server.send_usage(received[0].stream_id, 1, 0)
    link.pump(2.0)
    assert drain(client) == [RequestCompleted(stream_id, "after-fuzz", 1, 0)]


def mutate(data: st.DataObject, wire: bytes) -> bytes:
    mutated = bytearray(wire)
    for _ in range(data.draw(st.integers(0, 4), label="mutations")):
        position = data.draw(st.integers(0, max(0, len(mutated) - 1)))
        action = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        if not mutated:
            break
        if action == "flip":
            mutated[position] ^= data.draw(st.integers(1, 255))
        elif action == "delete":
            del mutated[position]
        elif action == "insert":
            mutated.insert(position, data.draw(st.integers(0, 255)))
        else:
            del mutated[position:]
    return bytes(mutated)


def split(data: st.DataObject, wire: bytes) -> list[bytes]:
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(wire)), max_size=4), label="cuts")))
    return [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]


@given(chunks=st.lists(st.tuples(FUZZ_STREAMS, st.binary(max_size=200), st.booleans()), max_size=10))
@FUZZ
def test_arbitrary_stream_bytes_only_close_streams(chunks: list[tuple[int, bytes, bool]]) -> None:
    client, server, link = established()
    for stream_id, payload, end in chunks:
        feed(server, stream_id, payload, end)
    still_serving(client, server, link)


@given(data=st.data())
@FUZZ
def test_mutated_request_streams_only_close_streams(data: st.DataObject) -> None:
    client, server, link = established()
    wire = bytes([ChannelKind.REQUEST]) + encode_frame(chat("fuzz"))
    if data.draw(st.booleans(), label="with cancel"):
        wire += encode_frame(Cancel(request_id="fuzz", reason="bye"))
    pieces = split(data, mutate(data, wire))
    for index, piece in enumerate(pieces):
        events, _ = feed(server, 400, piece, index == len(pieces) - 1)
        assert len([e for e in events if isinstance(e, RequestReceived)]) <= 1
    still_serving(client, server, link)


@given(data=st.data())
@FUZZ
def test_mutated_responses_end_a_request_exactly_once_at_most(data: st.DataObject) -> None:
    client, server, link = established()
    stream_id = client.open_request_stream(chat("r"), 1.0)
    frames = [TokenChunk(request_id="r", index=i, text=f"t{i}") for i in range(data.draw(st.integers(0, 3)))]
    wire = b"".join(encode_frame(f) for f in [*frames, Usage(request_id="r", prompt_tokens=1, completion_tokens=2)])
    ended = False
    pieces = split(data, mutate(data, wire))
    for index, piece in enumerate(pieces):
        events, _ = feed(client, stream_id, piece, index == len(pieces) - 1)
        for event in events:
            if isinstance(event, (TokenReceived, RequestCompleted, RequestFailed)):
                assert not ended, f"{event} after the request ended"
                ended = not isinstance(event, TokenReceived)
    assert ended  # the stream was finished, so the request must have ended one way or the other
    assert client.established


@given(payload=st.binary(max_size=300), end=st.booleans())
@FUZZ
def test_arbitrary_control_bytes_close_the_session_cleanly(payload: bytes, end: bool) -> None:
    client, server, link = established()
    events, _ = feed(server, 0, payload, end)
    if not server.established:
        assert isinstance(events[-1], SessionClosed)
        assert feed(server, 0, b"more", True) == ([], [])  # a closed session stays silent


@given(first=st.binary(min_size=1, max_size=300), stream_id=st.sampled_from([0, 4, 2]))
@FUZZ
def test_arbitrary_bytes_before_the_hello(first: bytes, stream_id: int) -> None:
    server = PeerSession(
        local_node_id="NODEB", peer_node_id="NODEA", is_client=False, now=0.0,
        is_trusted=trust_roles(ROLES), verify_capabilities=verify,
    )
    feed(server, stream_id, first, False)
    server.handle_timer(100.0)
    assert not server.established

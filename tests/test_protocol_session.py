"""PeerSession: two sessions paired in memory (meshd.protocol.loopback), no sockets."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from meshd.protocol import (
    ROLES,
    CacheRequest,
    CapabilitiesReceived,
    CapabilitiesRejected,
    ChannelDataReceived,
    ChannelEnded,
    ChannelKind,
    ChannelOpened,
    ChannelRefused,
    ChannelRequested,
    CloseConnection,
    EventsSubscribe,
    FrameDecoder,
    HeartbeatMeasured,
    Hello,
    HelloReceived,
    InferenceRequest,
    LocalProtocolError,
    MeshEvent,
    MeshEventReceived,
    PeerAccepted,
    PeerRefused,
    PeerSession,
    PeerTimedOut,
    Ping,
    Pong,
    ProtocolErrorFrame,
    Refused,
    RefusedByPeer,
    RequestCancelled,
    RequestCompleted,
    RequestFailed,
    RequestReceived,
    RequestRefused,
    ResetStream,
    ResponseReceived,
    SendBufferFull,
    SessionClosed,
    SessionConfig,
    SessionState,
    StreamData,
    StreamProtocolError,
    StreamWritable,
    TensorOpen,
    TokenChunk,
    TokenReceived,
    VersionMismatched,
    WireCode,
    encode_frame,
    trust_roles,
)
from meshd.protocol.loopback import Loopback, drain

CLIENT_ID = "NODEA"
SERVER_ID = "NODEB"


def verify_prefixed(record: bytes, node_id: str, now: float) -> dict[str, Any]:
    """A stand-in for identity's verifier: records are b"signed-by:<node>:<payload>"."""
    prefix = f"signed-by:{node_id}:".encode()
    if not record.startswith(prefix):
        raise ValueError(f"not signed by {node_id}")
    return {"payload": record[len(prefix) :].decode(), "checked_at": now}


def make_pair(
    now: float = 0.0,
    *,
    client_grants: Iterable[str] = ROLES,
    server_grants: Iterable[str] = ROLES,
    client_config: SessionConfig | None = None,
    server_config: SessionConfig | None = None,
    server_expects: str = CLIENT_ID,
    verify: Any = verify_prefixed,
    handshake: bool = True,
) -> tuple[PeerSession, PeerSession, Loopback]:
    client = PeerSession(
        local_node_id=CLIENT_ID, peer_node_id=SERVER_ID, is_client=True, now=now,
        is_trusted=trust_roles(client_grants), verify_capabilities=verify, config=client_config,
    )
    server = PeerSession(
        local_node_id=SERVER_ID, peer_node_id=server_expects, is_client=False, now=now,
        is_trusted=trust_roles(server_grants), verify_capabilities=verify, config=server_config,
    )
    link = Loopback(client, server)
    if handshake:
        link.pump(now)
    return client, server, link


def established(now: float = 0.0, **kwargs: Any) -> tuple[PeerSession, PeerSession, Loopback]:
    client, server, link = make_pair(now, **kwargs)
    assert client.established and server.established
    drain(client)
    drain(server)
    return client, server, link


def chat(request_id: str = "r1", **overrides: Any) -> InferenceRequest:
    fields: dict[str, Any] = dict(
        request_id=request_id, kind="chat", model="smollm2", body={"messages": [{"role": "user", "content": "hi"}]},
        data_class="public", stream=True, deadline=30.0,
    )
    return InferenceRequest(**{**fields, **overrides})


def frames_on(transmits: list[Any], stream_id: int, *, skip_kind: bool = True) -> list[Any]:
    data = b"".join(t.data for t in transmits if isinstance(t, StreamData) and t.stream_id == stream_id)
    return FrameDecoder().feed(data[1:] if skip_kind else data)


def of_type(events: list[Any], cls: type) -> list[Any]:
    return [event for event in events if isinstance(event, cls)]


def round_trip(client: PeerSession, server: PeerSession, link: Loopback, now: float, request_id: str) -> list[Any]:
    """A complete streamed request; returns the client's events."""
    stream_id = client.open_request_stream(chat(request_id), now)
    link.pump(now)
    (received,) = of_type(drain(server), RequestReceived)
    server.send_token(received.stream_id, "ok", finish_reason="stop")
    server.send_usage(received.stream_id, 1, 1)
    link.pump(now)
    events = drain(client)
    assert [type(e) for e in events] == [TokenReceived, RequestCompleted]
    assert all(e.stream_id == stream_id for e in events)
    return events


# --- handshake and trust ----------------------------------------------------------------------


def test_handshake_establishes_both_sides() -> None:
    client, server, link = make_pair(client_grants={"serve"}, server_grants={"use", "cache"})
    client_events, server_events = drain(client), drain(server)
    assert client_events[0] == HelloReceived(SERVER_ID, 1, "meshd", None)
    assert client_events[1] == PeerAccepted(SERVER_ID, "meshd", frozenset({"serve"}), frozenset({"use", "cache"}))
    assert server_events[0] == HelloReceived(CLIENT_ID, 1, "meshd", None)
    assert server_events[1] == PeerAccepted(CLIENT_ID, "meshd", frozenset({"use", "cache"}), frozenset())
    assert client.state is server.state is SessionState.ESTABLISHED
    # The control stream is the dialler's first bidirectional stream and starts with its kind byte.
    first = link.sent_by_client[0]
    assert isinstance(first, StreamData) and first.stream_id == 0 and first.data[0] == ChannelKind.CONTROL


def test_version_mismatch_is_explicit_on_both_sides() -> None:
    client, server, link = make_pair(server_config=SessionConfig(protocol_version=2))
    client_events, server_events = drain(client), drain(server)
    assert VersionMismatched(SERVER_ID, 1, 2) in client_events
    assert VersionMismatched(CLIENT_ID, 2, 1) in server_events
    assert of_type(client_events, RefusedByPeer)[0].code == "version_mismatch"
    assert of_type(server_events, PeerRefused)[0].code == "version_mismatch"
    assert client_events[-1] == SessionClosed(SERVER_ID, "version_mismatch", client_events[-1].reason, True)
    assert server_events[-1].code == "version_mismatch" and not server_events[-1].by_peer
    assert not of_type(client_events + server_events, PeerAccepted)
    # The refused side closes the connection at once with the matching code.
    closes = of_type(link.sent_by_client, CloseConnection)
    assert closes == [CloseConnection(WireCode.VERSION_MISMATCH, closes[0].reason)]


def test_untrusted_peer_gets_a_refusal_and_nothing_else() -> None:
    client, server, link = make_pair(handshake=False, server_grants=())
    server.announce_capabilities(b"signed-by:NODEB:secret models", 0.0)
    link.pump(0.0)
    server_events = drain(server)
    assert [type(e) for e in server_events] == [HelloReceived, PeerRefused, SessionClosed]
    assert server_events[1].code == "untrusted"
    # Everything the server sent: one refusal frame with FIN on the control stream, no kind byte
    # (the dialler opened that stream), no hello ack, no capabilities, no ping.
    assert all(isinstance(t, StreamData) and t.stream_id == 0 for t in link.sent_by_server)
    assert link.sent_by_server[-1].end_stream
    data = b"".join(t.data for t in link.sent_by_server)
    (refusal,) = FrameDecoder().feed(data)
    assert refusal == Refused(code="untrusted", message=refusal.message)
    client_events = drain(client)
    assert of_type(client_events, RefusedByPeer)[0].code == "untrusted"
    assert client.state is SessionState.CLOSED
    with pytest.raises(LocalProtocolError):
        client.open_request_stream(chat(), 0.0)


def test_untrusted_peer_streams_sent_before_the_hello_get_nothing() -> None:
    client, server, link = make_pair(handshake=False, server_grants=())
    # A request stream racing ahead of the hello is held, then dropped with the refusal.
    server.receive_stream_data(4, bytes([ChannelKind.REQUEST]) + encode_frame(chat()), False, 0.0)
    link.pump(0.0)
    assert not of_type(drain(server), RequestReceived)
    assert {t.stream_id for t in link.sent_by_server if isinstance(t, StreamData)} == {0}
    assert not of_type(link.sent_by_server, ResetStream)


def test_hello_naming_another_node_is_refused() -> None:
    client, server, link = make_pair(server_expects="NODEX")
    assert of_type(drain(server), PeerRefused)[0].code == "node_id_mismatch"
    assert of_type(drain(client), RefusedByPeer)[0].code == "node_id_mismatch"


def test_dialler_refuses_a_server_it_does_not_trust() -> None:
    client, server, link = make_pair(client_grants=())
    assert of_type(drain(client), PeerRefused)[0].code == "untrusted"
    server_events = drain(server)
    assert of_type(server_events, RefusedByPeer)[0].code == "untrusted"
    assert server_events[-1].by_peer and server.state is SessionState.CLOSED


def test_trust_revoked_mid_session_refuses_the_peer() -> None:
    granted = set(ROLES)
    client, server, link = established()
    server._is_trusted = lambda node_id, role: role in granted  # the trust store reloaded
    granted.discard("use")
    server.trust_changed(1.0)
    assert server.established and server.granted_roles == frozenset({"serve", "cache", "tensor"})
    granted.clear()
    server.trust_changed(2.0)
    link.pump(2.0)
    assert of_type(drain(client), RefusedByPeer)[0].code == "untrusted"
    assert of_type(drain(server), PeerRefused)[0].code == "untrusted"


# --- capabilities -----------------------------------------------------------------------------


def test_capabilities_are_exchanged_and_reannounced() -> None:
    client, server, link = make_pair(handshake=False)
    client.announce_capabilities(b"signed-by:NODEA:gpu=1", 0.0)
    server.announce_capabilities(b"signed-by:NODEB:gpu=0", 0.0)
    link.pump(0.5)
    assert of_type(drain(server), CapabilitiesReceived) == [
        CapabilitiesReceived(CLIENT_ID, {"payload": "gpu=1", "checked_at": 0.5})
    ]
    assert of_type(drain(client), CapabilitiesReceived)[0].payload["payload"] == "gpu=0"
    client.announce_capabilities(b"signed-by:NODEA:gpu=2", 1.0)  # load changed
    link.pump(1.0)
    assert of_type(drain(server), CapabilitiesReceived)[0].payload["payload"] == "gpu=2"


def test_failed_verification_is_reported_and_ignored() -> None:
    client, server, link = established()
    client.announce_capabilities(b"signed-by:SOMEONE-ELSE:gpu=1", 1.0)
    link.pump(1.0)
    events = drain(server)
    assert len(events) == 1 and isinstance(events[0], CapabilitiesRejected)
    assert "not signed by NODEA" in events[0].reason
    assert server.established
    round_trip(client, server, link, 1.0, "after-rejection")


def test_verifier_returning_a_non_map_is_a_rejection() -> None:
    client, server, link = established(verify=lambda record, node, now: ["not", "a", "map"])
    client.announce_capabilities(b"x", 1.0)
    link.pump(1.0)
    assert isinstance(drain(server)[0], CapabilitiesRejected)


# --- heartbeats and timeouts ------------------------------------------------------------------


def test_heartbeat_rtt_uses_the_controlled_clock() -> None:
    client, server, link = established()
    assert client.next_timer() == 5.0  # heartbeat_interval after the first ping at establishment
    client.handle_timer(5.0)
    link.client_to_server(5.030)  # ping arrives 30 ms later; the pong leaves at once
    link.server_to_client(5.070)  # pong arrives 40 ms after that
    (measured,) = of_type(drain(client), HeartbeatMeasured)
    assert measured.rtt == pytest.approx(0.070)
    assert client.rtt == pytest.approx(0.070)
    assert client.next_timer() == 10.0


def test_rtt_ignores_the_echoed_timestamp() -> None:
    client, server, link = established()
    client.handle_timer(5.0)
    (ping,) = FrameDecoder().feed(client.data_to_send()[0].data)
    assert isinstance(ping, Ping) and ping.sent_at == 5.0
    # A peer claiming the ping left later than it did cannot shrink its RTT.
    client.receive_stream_data(0, encode_frame(Pong(nonce=ping.nonce, sent_at=5.05)), False, 5.06)
    assert of_type(drain(client), HeartbeatMeasured)[0].rtt == pytest.approx(0.06)


def test_pong_for_an_unknown_ping_produces_no_rtt() -> None:
    client, server, link = established()
    client.receive_stream_data(0, encode_frame(Pong(nonce=999, sent_at=4.99)), False, 5.0)
    assert not of_type(drain(client), HeartbeatMeasured)
    assert client.established


def test_silent_peer_is_reported_down() -> None:
    client, server, link = established()
    for now in (5.0, 10.0):
        client.handle_timer(now)  # pings go out; nothing comes back
    client.handle_timer(14.9)
    assert client.established
    assert client.next_timer() == 15.0
    client.handle_timer(15.0)
    events = drain(client)
    assert events[0] == PeerTimedOut(SERVER_ID, "established", 15.0)
    assert events[-1].code == "peer_timeout"
    assert client.data_to_send()[-1] == CloseConnection(WireCode.PEER_TIMEOUT, events[-1].reason)
    assert client.next_timer() is None


def test_traffic_keeps_the_peer_alive() -> None:
    client, server, link = established()
    now = 0.0
    while now < 60.0:
        now += 5.0
        client.handle_timer(now)
        server.handle_timer(now)
        link.pump(now)
    assert client.established and server.established
    assert len(of_type(drain(client), HeartbeatMeasured)) == 12


def test_handshake_timeout() -> None:
    client, server, link = make_pair(handshake=False)
    assert client.next_timer() == 10.0
    client.handle_timer(10.0)
    assert drain(client)[0] == PeerTimedOut(SERVER_ID, "handshake", 10.0)


# --- request streams --------------------------------------------------------------------------


def test_streaming_request_round_trip() -> None:
    client, server, link = established()
    stream_id = client.open_request_stream(chat(resume_text="Hel", resume_token_ids=(9,)), 1.0)
    assert stream_id == 4  # the dialler's next bidirectional stream after the control stream
    link.pump(1.0)
    (received,) = drain(server)
    assert isinstance(received, RequestReceived)
    assert received.request.resume_text == "Hel" and received.deadline_at == 31.0
    server.send_token(received.stream_id, "lo", token_ids=(5, 6))
    server.send_token(received.stream_id, "!", finish_reason="stop")
    server.send_usage(received.stream_id, prompt_tokens=7, completion_tokens=3)
    link.pump(1.1)
    events = drain(client)
    assert [(e.chunk.index, e.chunk.text, e.chunk.token_ids) for e in events[:2]] == [
        (0, "lo", (5, 6)), (1, "!", None)
    ]
    assert events[1].chunk.finish_reason == "stop"
    assert events[2] == RequestCompleted(stream_id, "r1", 7, 3)
    assert len(events) == 3
    # Both sides finished both directions: the stream is forgotten everywhere.
    assert stream_id not in client._streams and stream_id not in server._streams
    assert link.sent_by_client[-1] == StreamData(stream_id, b"", True)


def test_non_streamed_response() -> None:
    client, server, link = established()
    stream_id = client.open_request_stream(chat(kind="embedding", stream=False), 1.0)
    link.pump(1.0)
    (received,) = drain(server)
    server.send_response_body(received.stream_id, {"data": [{"embedding": [0.5, 0.25]}]})
    server.send_usage(received.stream_id, 4, 0)
    link.pump(1.0)
    assert drain(client) == [
        ResponseReceived(stream_id, "r1", {"data": [{"embedding": [0.5, 0.25]}]}),
        RequestCompleted(stream_id, "r1", 4, 0),
    ]


def test_request_error_from_the_server() -> None:
    client, server, link = established()
    stream_id = client.open_request_stream(chat(), 1.0)
    link.pump(1.0)
    (received,) = drain(server)
    server.send_token(received.stream_id, "par")
    server.send_request_error(received.stream_id, "backend_error", "the model crashed", 500)
    link.pump(1.0)
    events = drain(client)
    assert isinstance(events[0], TokenReceived)
    assert events[1] == RequestFailed(stream_id, "r1", "backend_error", "the model crashed", 500, True)
    with pytest.raises(LocalProtocolError):
        server.send_token(received.stream_id, "more")


def test_cancel_by_reset() -> None:
    client, server, link = established()
    stream_id = client.open_request_stream(chat(), 1.0)
    link.pump(1.0)
    (received,) = drain(server)
    server.send_token(received.stream_id, "a")
    link.pump(1.0)
    client.cancel_request(stream_id, 1.1)
    link.pump(1.1)
    assert drain(server) == [RequestCancelled(received.stream_id, "r1", "cancelled", False)]
    assert ResetStream(stream_id, WireCode.REQUEST_CANCELLED) in link.sent_by_client
    with pytest.raises(LocalProtocolError):
        server.send_token(received.stream_id, "b")  # the stream is gone
    assert [type(e) for e in drain(client)] == [TokenReceived]  # nothing after the cancel


def test_graceful_cancel_still_ends_with_usage() -> None:
    client, server, link = established()
    stream_id = client.open_request_stream(chat(), 1.0)
    link.pump(1.0)
    (received,) = drain(server)
    client.cancel_request(stream_id, 1.1, reason="client went away", graceful=True)
    link.pump(1.1)
    assert drain(server) == [RequestCancelled(received.stream_id, "r1", "client went away", True)]
    server.send_usage(received.stream_id, 5, 0)
    link.pump(1.2)
    assert drain(client) == [RequestCompleted(stream_id, "r1", 5, 0)]
    assert stream_id not in client._streams and stream_id not in server._streams


def test_request_from_a_peer_without_use_is_refused() -> None:
    client, server, link = established(server_grants={"serve", "cache"})
    stream_id = client.open_request_stream(chat(), 1.0)
    link.pump(1.0)
    assert drain(server) == [RequestRefused(stream_id, "r1", "forbidden")]
    (failed,) = drain(client)
    assert failed == RequestFailed(stream_id, "r1", "forbidden", failed.message, 403, True)
    assert "'use'" in failed.message


def test_local_misuse_raises() -> None:
    client, server, link = make_pair(handshake=False)
    with pytest.raises(LocalProtocolError):
        client.open_request_stream(chat(), 0.0)
    link.pump(0.0)
    with pytest.raises(LocalProtocolError):
        server.send_token(99, "x")
    stream_id = client.open_request_stream(chat(), 0.0)
    with pytest.raises(LocalProtocolError):
        client.send_token(stream_id, "x")  # the requester cannot answer its own request
    link.pump(0.0)
    received = of_type(drain(server), RequestReceived)[0]
    server.send_usage(received.stream_id, 1, 1)
    with pytest.raises(LocalProtocolError):
        server.send_usage(received.stream_id, 1, 1)


def test_out_of_order_token_fails_the_request() -> None:
    client, server, link = established()
    stream_id = client.open_request_stream(chat(), 1.0)
    link.pump(1.0)
    drain(server)
    good, bad = (encode_frame(TokenChunk(request_id="r1", index=i, text="x")) for i in (0, 3))
    client.receive_stream_data(stream_id, good + bad, False, 1.0)
    events = drain(client)
    assert [type(e) for e in events] == [TokenReceived, RequestFailed, StreamProtocolError]
    assert events[1].code == "unexpected_frame" and not events[1].by_peer
    assert events[2].wire_code == WireCode.UNEXPECTED_FRAME
    assert ResetStream(stream_id, WireCode.UNEXPECTED_FRAME) in client.data_to_send()


def test_response_cut_short_fails_the_request() -> None:
    client, server, link = established()
    stream_id = client.open_request_stream(chat(), 1.0)
    client.receive_stream_data(stream_id, b"", True, 1.0)  # FIN with no usage or error
    (failed,) = of_type(drain(client), RequestFailed)
    assert failed.code == "stream_ended_early" and not failed.by_peer


# --- stream-level protocol errors -------------------------------------------------------------


def _oversize() -> bytes:
    return bytes([ChannelKind.REQUEST]) + struct.pack(">I", 10 * 1024 * 1024)


@pytest.mark.parametrize(
    ("data", "code", "wire_code"),
    [
        (b"\x7fwhatever", "unknown_channel", WireCode.UNKNOWN_CHANNEL),
        (b"\x00", "unknown_channel", WireCode.UNKNOWN_CHANNEL),
        (_oversize(), "frame_too_large", WireCode.FRAME_TOO_LARGE),
        (bytes([ChannelKind.REQUEST]) + b"\x00\x00\x00\x02\xc1\xc1", "malformed_frame", WireCode.MALFORMED_FRAME),
        (
            bytes([ChannelKind.REQUEST]) + encode_frame(Ping(nonce=1, sent_at=0.0)),
            "unexpected_frame", WireCode.UNEXPECTED_FRAME,
        ),
        (bytes([ChannelKind.TENSOR]) + encode_frame(chat()), "unexpected_frame", WireCode.UNEXPECTED_FRAME),
        (bytes([ChannelKind.CONTROL]), "unexpected_channel", WireCode.UNEXPECTED_CHANNEL),
    ],
    ids=["unknown-kind", "zero-kind", "oversize", "malformed", "wrong-first-frame", "wrong-setup", "second-control"],
)
def test_stream_errors_close_only_that_stream(data: bytes, code: str, wire_code: WireCode) -> None:
    client, server, link = established()
    server.receive_stream_data(8, data, False, 1.0)
    events = drain(server)
    assert events[-1] == StreamProtocolError(8, code, wire_code, events[-1].message, False)
    assert ResetStream(8, wire_code) in server.data_to_send()
    assert server.established
    round_trip(client, server, link, 1.0, "still-serving")
    # Late bytes for the closed stream are ignored, not re-parsed as a new stream.
    server.receive_stream_data(8, b"\x7f more", True, 1.0)
    assert drain(server) == []


def test_unidirectional_streams_are_refused() -> None:
    client, server, link = established()
    server.receive_stream_data(2, bytes([ChannelKind.REQUEST]) + encode_frame(chat()), False, 1.0)
    assert drain(server)[-1].code == "unexpected_channel"


def test_peer_reset_with_protocol_code_is_reported() -> None:
    client, server, link = established()
    stream_id = client.open_request_stream(chat(), 1.0)
    client.stream_reset(stream_id, 1.0, WireCode.MALFORMED_FRAME)
    events = drain(client)
    assert of_type(events, RequestFailed)[0].code == "malformed_frame"
    assert of_type(events, StreamProtocolError)[0].by_peer


def test_too_many_peer_streams() -> None:
    client, server, link = established(server_config=SessionConfig(max_peer_streams=2))
    for _ in range(3):
        client.open_request_stream(chat(), 1.0)
    link.pump(1.0)
    events = drain(server)
    assert len(of_type(events, RequestReceived)) == 2
    assert of_type(events, StreamProtocolError)[0].code == "too_many_streams"
    assert of_type(drain(client), RequestFailed)[0].code == "too_many_streams"


def test_control_stream_garbage_closes_the_connection_after_a_protocol_error_frame() -> None:
    client, server, link = established()
    server.receive_stream_data(0, b"\x00\x00\x00\x01\xc1", False, 3.0)
    events = drain(server)
    assert events[-1] == SessionClosed(CLIENT_ID, "malformed_frame", events[-1].reason, False)
    sent = server.data_to_send()
    assert isinstance(FrameDecoder().feed(sent[0].data)[0], ProtocolErrorFrame) and sent[0].end_stream
    assert not of_type(sent, CloseConnection)  # lingers so the frame can arrive
    assert server.next_timer() == 5.0
    server.handle_timer(5.0)
    assert server.data_to_send() == [CloseConnection(WireCode.MALFORMED_FRAME, events[-1].reason)]


def test_hello_sent_to_the_dialler_breaks_the_handshake() -> None:
    client, server, link = make_pair(handshake=False)
    client.receive_stream_data(0, encode_frame(Hello(protocol_version=1, node_id=SERVER_ID, software="x")), False, 0.1)
    events = drain(client)
    assert events[-1] == SessionClosed(SERVER_ID, "unexpected_frame", events[-1].reason, False)
    assert not of_type(events, PeerAccepted)


def test_goodbye_closes_both_sides_and_fails_open_requests() -> None:
    client, server, link = established()
    stream_id = client.open_request_stream(chat(), 1.0)
    link.pump(1.0)
    drain(server)
    server.close(2.0, reason="restarting")
    assert server.state is SessionState.CLOSING
    link.pump(2.0)
    events = drain(client)
    assert events[0] == RequestFailed(stream_id, "r1", "connection_closed", "restarting", None, False)
    assert events[-1] == SessionClosed(SERVER_ID, "no_error", "restarting", True)
    assert of_type(link.sent_by_client, CloseConnection)
    assert server.state is SessionState.CLOSED  # connection_lost ended the linger


def test_connection_lost_reports_closed() -> None:
    client, server, link = established()
    client.connection_lost(1.0, "idle timeout")
    assert drain(client) == [SessionClosed(SERVER_ID, "connection_closed", "idle timeout", True)]
    assert client.data_to_send() == []


# --- tensor, cache and events channels --------------------------------------------------------


def test_tensor_channel_carries_raw_bytes_both_ways() -> None:
    client, server, link = established()
    stream_id = client.open_channel(TensorOpen(purpose="tunnel", tag="rpc-0", model="smollm2"), 1.0)
    with pytest.raises(LocalProtocolError):
        client.send_channel_data(stream_id, b"too early")
    link.pump(1.0)
    (requested,) = drain(server)
    assert requested == ChannelRequested(stream_id, ChannelKind.TENSOR, requested.setup)
    assert requested.setup.tag == "rpc-0"
    server.accept_channel(stream_id, {"window": 4})
    link.pump(1.0)
    assert drain(client) == [ChannelOpened(stream_id, ChannelKind.TENSOR, {"window": 4})]
    client.send_channel_data(stream_id, b"\x00\x01layer weights", end_stream=True)
    server.send_channel_data(stream_id, b"ok")
    server.finish_stream(stream_id)
    link.pump(1.0)
    assert drain(server) == [ChannelDataReceived(stream_id, b"\x00\x01layer weights"), ChannelEnded(stream_id)]
    assert drain(client) == [ChannelDataReceived(stream_id, b"ok"), ChannelEnded(stream_id)]
    assert stream_id not in client._streams and stream_id not in server._streams


def test_channel_without_the_role_is_refused() -> None:
    client, server, link = established(server_grants={"use"})
    stream_id = client.open_channel(TensorOpen(purpose="envelopes", tag="t"), 1.0)
    link.pump(1.0)
    message = "this node does not grant you the 'tensor' role"
    assert drain(server) == [ChannelRefused(stream_id, ChannelKind.TENSOR, "forbidden", message, False)]
    assert drain(client) == [ChannelRefused(stream_id, ChannelKind.TENSOR, "forbidden", message, True)]
    assert stream_id not in client._streams and stream_id not in server._streams


def test_cache_channel_refused_by_the_application() -> None:
    client, server, link = established()
    request = CacheRequest(cache_id="c1", model="m", prefix_sha256="ab" * 32, token_count=128)
    stream_id = client.open_channel(request, 1.0)
    link.pump(1.0)
    (requested,) = drain(server)
    assert requested.kind is ChannelKind.CACHE and requested.setup == request
    server.refuse_channel(stream_id, "not_cached", "no such prefix")
    link.pump(1.0)
    assert drain(client) == [ChannelRefused(stream_id, ChannelKind.CACHE, "not_cached", "no such prefix", True)]


def test_events_channel_delivers_mesh_events() -> None:
    client, server, link = established()
    stream_id = client.open_channel(EventsSubscribe(topics=("peers", "routing")), 1.0)
    link.pump(1.0)
    (requested,) = drain(server)
    assert requested.setup.topics == ("peers", "routing")
    server.accept_channel(stream_id)
    event = MeshEvent(topic="peers", at=1.5, data={"node": "NODEC", "up": True})
    server.send_mesh_event(stream_id, event)
    link.pump(1.5)
    assert drain(client) == [ChannelOpened(stream_id, ChannelKind.EVENTS, {}), MeshEventReceived(stream_id, event)]
    with pytest.raises(LocalProtocolError):
        server.send_channel_data(stream_id, b"raw")  # events channels carry frames only


def test_bounded_send_buffer_signals_backpressure() -> None:
    config = SessionConfig(send_buffer_limit=1000, send_buffer_high_watermark=600, send_buffer_low_watermark=200)
    client, server, link = established(client_config=config)
    stream_id = client.open_channel(TensorOpen(purpose="envelopes", tag="t"), 1.0)
    link.pump(1.0)
    drain(server)
    server.accept_channel(stream_id)
    link.pump(1.0)
    drain(client)
    client.send_channel_data(stream_id, b"a" * 500)
    assert client.is_writable(stream_id)
    client.send_channel_data(stream_id, b"b" * 200)
    assert not client.is_writable(stream_id)
    with pytest.raises(SendBufferFull) as caught:
        client.send_channel_data(stream_id, b"c" * 400)  # refused whole, nothing queued
    assert caught.value.pending == 700
    sizes = []
    while not of_type(drain(client), StreamWritable):
        (chunk,) = client.data_to_send(max_bytes_per_stream=100)
        sizes.append(len(chunk.data))
        server.receive_stream_data(chunk.stream_id, chunk.data, chunk.end_stream, 1.0)
    assert sizes == [100] * 5  # 700 -> 200 bytes: the low watermark
    assert client.is_writable(stream_id)
    link.pump(1.0, max_bytes_per_stream=100)
    received = b"".join(e.data for e in drain(server) if isinstance(e, ChannelDataReceived))
    assert received == b"a" * 500 + b"b" * 200
    assert not of_type(drain(client), StreamWritable)  # reported once per episode


def test_peer_stream_racing_ahead_of_the_hello_ack_is_replayed() -> None:
    client, server, link = make_pair(handshake=False)
    link.client_to_server(0.0)  # hello reaches the server, which answers and is established
    stream_id = server.open_channel(EventsSubscribe(topics=("load",)), 0.0)
    sent = server.data_to_send()
    # Deliver the new stream before the control stream's hello ack, as loss and reordering can.
    for transmit in sorted(sent, key=lambda t: t.stream_id == 0):
        client.receive_stream_data(transmit.stream_id, transmit.data, transmit.end_stream, 0.01)
    events = drain(client)
    assert [type(e) for e in events][:2] == [HelloReceived, PeerAccepted]
    assert ChannelRequested(stream_id, ChannelKind.EVENTS, EventsSubscribe(topics=("load",))) in events


def test_the_protocol_imports_no_event_loop_or_quic_library() -> None:
    code = (
        "import sys, meshd.protocol, meshd.protocol.loopback\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('asyncio', 'aioquic', 'qh3', 'uvloop'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr

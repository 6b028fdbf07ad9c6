"""Per-stream machines and the bounded send buffer (meshd.protocol.channels), without a session."""

from __future__ import annotations

import pytest

from meshd.protocol import (
    ChannelKind,
    InferenceRequest,
    LocalProtocolError,
    RequestCompleted,
    RequestReceived,
    SendBuffer,
    SendBufferFull,
    StreamData,
    StreamEndedEarly,
    TensorOpen,
    TokenChunk,
    UnexpectedFrame,
    Usage,
    encode_frame,
)
from meshd.protocol.channels import ChannelAcceptor, ChannelOpener, RequestReceiver, RequestSender


def buffer(stream_id: int = 4, limit: int = 100, high: int = 60, low: int = 20) -> SendBuffer:
    return SendBuffer(stream_id, limit=limit, high_watermark=high, low_watermark=low)


def chat() -> InferenceRequest:
    return InferenceRequest(request_id="r", kind="chat", model="m", body={}, data_class="public", stream=True)


def test_send_buffer_is_bounded_and_reports_draining_once() -> None:
    out = buffer()
    out.write(b"x" * 70)
    assert not out.writable
    with pytest.raises(SendBufferFull):
        out.write(b"y" * 31)
    out.write(b"y" * 31, force=True)  # protocol frames may exceed the limit
    assert out.pending == 101
    assert out.take(81) == StreamData(4, b"x" * 70 + b"y" * 11, False)
    assert out.drained() and not out.drained()
    out.write(b"", end=True)
    assert out.take() == StreamData(4, b"y" * 20, True)
    assert out.take() is None
    with pytest.raises(LocalProtocolError):
        out.write(b"z")


def test_send_buffer_sends_a_bare_fin() -> None:
    out = buffer()
    assert out.take() is None
    out.write(b"", end=True)
    assert out.take() == StreamData(4, b"", True)
    assert out.end_sent


def test_send_buffer_limits_must_be_ordered() -> None:
    with pytest.raises(ValueError):
        buffer(limit=10, high=20, low=5)


def test_request_sender_enforces_response_order() -> None:
    sender = RequestSender(4, chat(), buffer(limit=10_000, high=5000, low=100), 1 << 20)
    opening = sender.out.take()
    assert opening is not None and opening.data[0] == ChannelKind.REQUEST
    events: list = []
    sender.receive(encode_frame(Usage(request_id="r", prompt_tokens=1, completion_tokens=0)), False, 0.0, events)
    assert events == [RequestCompleted(4, "r", 1, 0)]
    with pytest.raises(UnexpectedFrame, match="after the end"):
        sender.receive(encode_frame(TokenChunk(request_id="r", index=0, text="late")), False, 0.0, events)


def test_request_sender_rejects_a_foreign_request_id() -> None:
    sender = RequestSender(4, chat(), buffer(limit=10_000, high=5000, low=100), 1 << 20)
    with pytest.raises(UnexpectedFrame, match="does not belong"):
        sender.receive(encode_frame(TokenChunk(request_id="other", index=0, text="x")), False, 0.0, [])


def test_request_receiver_needs_the_request_first() -> None:
    receiver = RequestReceiver(4, buffer(), 1 << 20, allowed=True)
    with pytest.raises(StreamEndedEarly):
        receiver.receive(b"", True, 0.0, [])
    receiver = RequestReceiver(8, buffer(limit=10_000, high=5000, low=100), 1 << 20, allowed=True)
    events: list = []
    receiver.receive(encode_frame(chat()), True, 2.0, events)  # the requester may half-close at once
    assert events == [RequestReceived(8, chat(), None)]
    receiver.send_token("a")
    with pytest.raises(LocalProtocolError):
        receiver.send_response_body({})  # a streamed response cannot switch to a body


def test_channel_opener_rejects_the_wrong_setup_frame() -> None:
    with pytest.raises(LocalProtocolError):
        ChannelOpener(4, ChannelKind.CACHE, TensorOpen(purpose="tunnel", tag="t"), buffer(), 1 << 20)


def test_channel_acceptor_refuses_data_before_it_accepts() -> None:
    acceptor = ChannelAcceptor(4, ChannelKind.TENSOR, buffer(), 1 << 20, allowed=True)
    events: list = []
    with pytest.raises(UnexpectedFrame, match="pending"):
        acceptor.receive(encode_frame(TensorOpen(purpose="tunnel", tag="t")) + b"raw", False, 0.0, events)
    assert len(events) == 1  # the request was still reported before the violation

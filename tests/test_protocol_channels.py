"""Per-stream machines and the bounded send buffer (meshd.protocol.channels), without a session."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


class ReferenceBuffer:
    """The send buffer's contract, written the obvious way (one bytearray): the oracle."""

    def __init__(self, limit: int, high: int, low: int) -> None:
        self.limit, self.high, self.low = limit, high, low
        self.data = bytearray()
        self.end_queued = self.end_sent = self.was_high = False

    def write(self, data: bytes, end: bool, force: bool) -> None:
        if self.end_queued:
            raise LocalProtocolError("finished")
        if not force and len(self.data) + len(data) > self.limit:
            raise SendBufferFull(4, len(self.data), self.limit)
        self.data += data
        if len(self.data) >= self.high:
            self.was_high = True
        self.end_queued = end

    def take(self, max_bytes: int | None) -> StreamData | None:
        if self.end_sent:
            return None
        n = len(self.data) if max_bytes is None else max_bytes
        data = bytes(self.data[:n])
        del self.data[:n]
        end = self.end_queued and not self.data
        if not data and not end:
            return None
        self.end_sent = end
        return StreamData(4, data, end)

    def drained(self) -> bool:
        if self.was_high and len(self.data) <= self.low and not self.end_queued:
            self.was_high = False
            return True
        return False

    def abort(self) -> None:
        self.data.clear()
        self.end_queued = self.end_sent = True


# Small sizes as well as large ones, so buffers land exactly on the limits and watermarks.
_payload = st.one_of(st.binary(max_size=8), st.binary(max_size=90))
_operations = st.lists(st.one_of(
    st.tuples(st.just("write"), _payload, st.integers(0, 7).map(lambda i: i == 0),  # end: now and then
              st.booleans(), st.sampled_from(["bytes", "bytearray", "view"])),
    st.tuples(st.just("take"), st.one_of(st.none(), st.integers(0, 10), st.integers(0, 120))),
    st.tuples(st.just("drained")),
), max_size=60)


def _outcome(call):  # type: ignore[no-untyped-def]
    try:
        return ("ok", call())
    except (LocalProtocolError, SendBufferFull) as exc:
        return ("raised", type(exc))


@settings(max_examples=1000, deadline=None)
@given(operations=_operations, limits=st.sampled_from([(100, 60, 20), (64, 64, 0), (300, 40, 40), (10, 5, 1), (6, 4, 2)]),
       abort_at=st.one_of(st.none(), st.integers(0, 59)))
def test_send_buffer_behaves_like_one_bytearray(operations: list, limits: tuple[int, int, int],
                                                abort_at: int | None) -> None:
    """Random writes (forced or not, any buffer type), takes of any size, drains, an abort:
    every result, error, FIN and watermark report matches the one-bytearray reference."""
    limit, high, low = limits
    out, ref = buffer(limit=limit, high=high, low=low), ReferenceBuffer(limit, high, low)
    for index, op in enumerate(operations):
        if index == abort_at:  # a reset stream: nothing more goes out
            out.abort()
            ref.abort()
        if op[0] == "write":
            _, data, end, force, kind = op
            given_data = {"bytes": data, "bytearray": bytearray(data), "view": memoryview(bytearray(data))}[kind]
            assert _outcome(lambda: out.write(given_data, end=end, force=force)) == \
                _outcome(lambda: ref.write(data, end, force))
            if kind != "bytes":
                given_data[:] = bytes(len(data))  # the caller reuses its buffer: what was written must not change
        elif op[0] == "take":
            assert out.take(op[1]) == ref.take(op[1])
            assert out.drained() == ref.drained()  # as the session asks after every take
        else:
            assert out.drained() == ref.drained()
        assert (out.pending, out.writable, out.end_queued, out.end_sent) == \
            (len(ref.data), not ref.end_queued and len(ref.data) < high, ref.end_queued, ref.end_sent)


@settings(max_examples=200, deadline=None)
@given(writes=st.lists(st.integers(1, 3000), min_size=1, max_size=40),
       takes=st.lists(st.one_of(st.none(), st.integers(1, 5000)), min_size=1, max_size=40))
def test_send_buffer_hands_out_exactly_the_bytes_written_in_order(writes: list[int], takes: list) -> None:
    out = buffer(limit=10**9, high=10**6, low=0)
    sent = bytearray()
    for i, size in enumerate(writes):
        chunk = bytes((i * 7 + j) % 251 for j in range(size))
        out.write(chunk, end=i == len(writes) - 1)
        sent += chunk
    received = bytearray()
    fins = 0
    for max_bytes in takes + [None]:
        item = out.take(max_bytes)
        if item is not None:
            assert max_bytes is None or len(item.data) <= max_bytes
            received += item.data
            fins += item.end_stream
    assert received == sent and fins == 1 and out.pending == 0 and out.take() is None


def test_send_buffer_hands_out_a_whole_written_chunk_without_copying_it() -> None:
    out = buffer(limit=1 << 20, high=1 << 19, low=0)
    first, second = b"a" * 1000, b"b" * 1000
    out.write(first)
    out.write(second)
    assert out.take(1000).data is first  # type: ignore[union-attr]
    assert out.take().data is second  # type: ignore[union-attr]


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

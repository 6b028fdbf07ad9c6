"""Frames, their validation, and the length-prefixed framing (meshd.protocol.frames / framing)."""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meshd.protocol import (
    HEADER_SIZE,
    Cancel,
    ChannelKind,
    Frame,
    FrameDecoder,
    FrameError,
    FrameTooLarge,
    Hello,
    InferenceRequest,
    InvalidFrame,
    MalformedFrame,
    Ping,
    ProtocolError,
    TokenChunk,
    TruncatedFrame,
    UnknownFrameType,
    Usage,
    WireCode,
    decode_frame_body,
    describe_wire_code,
    encode_frame,
    frame_types,
)
from meshd.protocol.frames import FRAME_TYPES, INT_MIN, U64_MAX, Bounds, Length, Pattern, frame

# FUZZ_EXAMPLES=5000 runs a deeper search by hand; the default keeps the suite fast.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# --- strategies derived from each frame's type hints ---------------------------------------------

_msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(INT_MIN, U64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_msgpack_values = st.recursive(
    _msgpack_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def strategy_for(hint: Any) -> st.SearchStrategy[Any]:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        return _constrained(args[0], args[1:])
    if origin in (Union, types.UnionType):
        (inner,) = [arg for arg in args if arg is not type(None)]
        return st.none() | strategy_for(inner)
    if origin is Literal:
        return st.sampled_from(args)
    if origin is tuple:
        return st.lists(strategy_for(args[0]), max_size=6).map(tuple)
    if origin is dict:
        return st.dictionaries(st.text(max_size=10), _msgpack_values, max_size=5)
    return {
        int: st.integers(INT_MIN, U64_MAX),
        float: st.floats(allow_nan=False, allow_infinity=False),
        str: st.text(max_size=40),
        bytes: st.binary(max_size=64),
        bool: st.booleans(),
    }[hint]


def _constrained(base: Any, rules: tuple[Any, ...]) -> st.SearchStrategy[Any]:
    (rule,) = rules
    if isinstance(rule, Bounds) and base is int:
        return st.integers(int(rule.low), int(rule.high))
    if isinstance(rule, Bounds):
        return st.floats(min_value=rule.low, max_value=rule.high, allow_nan=False, allow_infinity=False)
    if isinstance(rule, Pattern):
        return st.from_regex(rule.regex, fullmatch=True)
    if isinstance(rule, Length) and base is str:
        return st.text(min_size=rule.low, max_size=min(rule.high or 40, 40))
    if isinstance(rule, Length) and base is bytes:
        return st.binary(min_size=rule.low, max_size=64)
    if isinstance(rule, Length):  # tuple[X, ...]
        return st.lists(strategy_for(get_args(base)[0]), min_size=rule.low, max_size=6).map(tuple)
    raise TypeError(f"no strategy for {base!r} with {rule!r}")


@st.composite
def frames(draw: st.DrawFn, cls: type[Frame] | None = None) -> Frame:
    cls = cls or draw(st.sampled_from(sorted(FRAME_TYPES.values(), key=lambda c: c.TAG)))
    hints = get_type_hints(cls, include_extras=True)
    kwargs = {f.name: draw(strategy_for(hints[f.name])) for f in dataclasses.fields(cls)}
    try:
        return cls(**kwargs)
    except InvalidFrame:  # cross-field rules (e.g. streamed embeddings): not a valid frame
        assume(False)
        raise


def request(**overrides: Any) -> InferenceRequest:
    fields: dict[str, Any] = dict(
        request_id="r1", kind="chat", model="smollm2", body={"messages": [{"role": "user", "content": "hi"}]},
        data_class="public", stream=True,
    )
    return InferenceRequest(**{**fields, **overrides})


# --- frames -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", sorted(FRAME_TYPES.values(), key=lambda c: c.TAG), ids=lambda c: c.TAG)
@given(data=st.data())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_frame_type_round_trips(cls: type[Frame], data: st.DataObject) -> None:
    original = data.draw(frames(cls))
    wire = encode_frame(original)
    assert int.from_bytes(wire[:HEADER_SIZE], "big") == len(wire) - HEADER_SIZE
    decoded = FrameDecoder().feed(wire)
    assert decoded == [original]
    assert type(decoded[0]) is cls


def test_registry_covers_every_frame_in_the_issue() -> None:
    expected = {
        "hello", "hello_ack", "refused", "capabilities", "ping", "pong", "goodbye", "protocol_error",
        "request", "token", "usage", "response", "request_error", "cancel",
        "tensor_open", "cache_offer", "cache_request", "events_subscribe", "mesh_event", "channel_ack",
    }
    assert set(frame_types()) == expected
    with pytest.raises(TypeError):
        frame_types()["x"] = Ping  # type: ignore[index]


def test_a_new_frame_is_one_dataclass() -> None:
    @frame("test_only_note")
    class Note(Frame):
        text: Annotated[str, Length(1, 10)]
        count: int = 0

    try:
        note = Note(text="hi", count=3)
        assert FrameDecoder().feed(encode_frame(note)) == [note]
        with pytest.raises(InvalidFrame, match="test_only_note.text"):
            Note(text="")
        with pytest.raises(ValueError, match="already registered"):
            frame("test_only_note")(type("Again", (Frame,), {"__annotations__": {}}))
    finally:
        FRAME_TYPES.pop("test_only_note")


def test_wrong_field_types_are_rejected() -> None:
    with pytest.raises(InvalidFrame, match="ping.nonce: expected int"):
        Ping(nonce=True, sent_at=1.0)  # bool is not an int on the wire
    with pytest.raises(InvalidFrame, match="ping.sent_at: expected float"):
        Ping(nonce=1, sent_at="now")  # type: ignore[arg-type]
    with pytest.raises(InvalidFrame, match="must be finite"):
        Ping(nonce=1, sent_at=math.nan)
    with pytest.raises(InvalidFrame, match="outside"):
        Ping(nonce=-1, sent_at=0.0)
    with pytest.raises(InvalidFrame, match="fit in 64 bits"):
        TokenChunk(request_id="r", index=0, text="", token_ids=(2**64,))
    with pytest.raises(InvalidFrame, match="request.kind"):
        request(kind="speech")
    with pytest.raises(InvalidFrame, match="embeddings cannot be streamed"):
        request(kind="embedding", stream=True)
    with pytest.raises(InvalidFrame, match="map keys must be strings"):
        request(body={1: "x"})
    with pytest.raises(InvalidFrame, match="does not match"):
        frame_types()["cache_request"](cache_id="c", model="m", prefix_sha256="ABC", token_count=1)


def test_values_are_normalised_for_the_wire() -> None:
    chunk = TokenChunk(request_id="r", index=0, text="a", token_ids=[1, 2])  # type: ignore[arg-type]
    assert chunk.token_ids == (1, 2)
    ping = Ping(nonce=1, sent_at=3)
    assert ping.sent_at == 3.0 and type(ping.sent_at) is float
    verdict = request(verdict=bytearray(b"sig")).verdict
    assert verdict == b"sig" and type(verdict) is bytes


@pytest.mark.parametrize(
    ("obj", "error", "match"),
    [
        ({"t": "nope"}, UnknownFrameType, "nope"),
        ({"nonce": 1}, InvalidFrame, "type tag"),
        ({"t": 7}, InvalidFrame, "type tag"),
        ({"t": "ping", "nonce": 1}, InvalidFrame, "missing field"),
        ({"t": "ping", "nonce": 1, "sent_at": 0.0, "extra": 1}, InvalidFrame, "unknown field"),
        ({"t": "ping", "nonce": "1", "sent_at": 0.0}, InvalidFrame, "expected int"),
        ({"t": "usage", "request_id": "", "prompt_tokens": 1, "completion_tokens": 1}, InvalidFrame, "length 0"),
    ],
)
def test_decoding_is_strict(obj: dict[str, Any], error: type[FrameError], match: str) -> None:
    with pytest.raises(error, match=match):
        decode_frame_body(msgpack.packb(obj))


# --- the generated per-class code matches the reference it replaces -------------------------


def _reference_wire(frame_: Frame) -> dict[str, Any]:
    """The frame's map as the generic code built it: the tag, then every field in order."""
    wire: dict[str, Any] = {"t": frame_.TAG}
    for spec in frame_.SPECS:
        wire[spec.name] = getattr(frame_, spec.name)
    return wire


@pytest.mark.parametrize("cls", sorted(FRAME_TYPES.values(), key=lambda c: c.TAG), ids=lambda c: c.TAG)
@given(data=st.data())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_bytes_on_the_wire_are_what_the_generic_encoder_produced(cls: type[Frame], data: st.DataObject) -> None:
    original = data.draw(frames(cls))
    reference = _reference_wire(original)
    assert list(original.to_wire().items()) == list(reference.items())  # same keys, same order
    body = msgpack.packb(reference, use_bin_type=True)
    assert encode_frame(original) == struct.pack(">I", len(body)) + body


class _Str(str):
    pass


_TRICKY = [None, True, False, 0, 1, -1, 99, 600, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 0.0, -0.0, 1.5,
           -2.5, math.nan, math.inf, -math.inf, "", "x", "chat", "tunnel", "use", "a" * 64, "0" * 64, "x" * 257,
           _Str("chat"), b"", b"x", bytearray(b"x"), memoryview(b"xy"), [], [1, 2], [1, -1], (3,), ("a",), ["a"] * 65,
           {}, {"a": 1}, {1: "a"}, object()]


def _outcome(make: Any) -> tuple[str, ...]:
    try:
        built = make()
    except InvalidFrame as exc:
        return ("InvalidFrame", str(exc))
    return ("ok",) + tuple(f"{type(getattr(built, spec.name)).__name__}:{getattr(built, spec.name)!r}"
                           for spec in built.SPECS)


@pytest.mark.parametrize("cls", sorted(FRAME_TYPES.values(), key=lambda c: c.TAG), ids=lambda c: c.TAG)
@given(data=st.data())
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_generated_validation_accepts_normalises_and_rejects_like_the_reference(
        cls: type[Frame], data: st.DataObject) -> None:
    """Every field of every frame, given each awkward value in turn: the generated __post_init__
    and the reference loop over the field checkers (Frame.__post_init__) agree exactly."""
    valid = data.draw(frames(cls))
    for spec in cls.SPECS:
        for value in _TRICKY:
            fields = {s.name: getattr(valid, s.name) for s in cls.SPECS} | {spec.name: value}

            def reference() -> Frame:
                built = object.__new__(cls)
                for name, field_value in fields.items():
                    object.__setattr__(built, name, field_value)
                Frame.__post_init__(built)
                return built

            assert _outcome(lambda: cls(**fields)) == _outcome(reference), (spec.name, value)


def test_optional_fields_may_be_omitted_on_the_wire() -> None:
    body = msgpack.packb({"t": "token", "request_id": "r", "index": 0, "text": "x"})
    assert decode_frame_body(body) == TokenChunk(request_id="r", index=0, text="x")


# --- framing ----------------------------------------------------------------------------------


def test_wire_codes_are_stable_and_unique() -> None:
    # These numbers are a wire contract with peers running other builds.
    assert (WireCode.NO_ERROR, WireCode.PROTOCOL_ERROR, WireCode.FRAME_TOO_LARGE) == (0, 1, 2)
    assert (WireCode.UNKNOWN_CHANNEL, WireCode.VERSION_MISMATCH, WireCode.REQUEST_CANCELLED) == (8, 0x10, 0x20)
    assert len({int(code) for code in WireCode}) == len(WireCode)
    assert describe_wire_code(2) == "frame_too_large"
    assert describe_wire_code(0x99) == "unknown_0x99"
    assert describe_wire_code(None) == "unknown"
    for error in (FrameTooLarge(5, 4), MalformedFrame("x"), UnknownFrameType("x"), InvalidFrame("x")):
        assert isinstance(error.wire_code, WireCode) and error.code == error.wire_code.code


def test_channel_kind_bytes() -> None:
    assert [int(kind) for kind in ChannelKind] == [1, 2, 3, 4, 5]


@given(data=st.data())
@FUZZ
def test_decoder_handles_any_split(data: st.DataObject) -> None:
    sent = data.draw(st.lists(frames(), min_size=1, max_size=5))
    wire = b"".join(encode_frame(f) for f in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    decoder, received = FrameDecoder(), []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        received += decoder.feed(wire[start:end])
    decoder.finish()
    assert received == sent
    assert decoder.at_boundary


def test_decoder_byte_by_byte() -> None:
    sent = [Ping(nonce=1, sent_at=1.5), Usage(request_id="r", prompt_tokens=1, completion_tokens=2)]
    wire = b"".join(encode_frame(f) for f in sent)
    decoder, received = FrameDecoder(), []
    for i in range(len(wire)):
        received += decoder.feed(wire[i : i + 1])
    assert received == sent


def test_oversize_frame_is_rejected_at_its_header() -> None:
    decoder = FrameDecoder(max_frame_size=1000)
    with pytest.raises(FrameTooLarge) as caught:
        decoder.feed(struct.pack(">I", 1001))  # the body never needs to arrive
    assert caught.value.wire_code == WireCode.FRAME_TOO_LARGE
    assert caught.value.size == 1001 and caught.value.limit == 1000
    assert decoder.buffered == 0


def test_frame_at_the_limit_is_accepted() -> None:
    big = Cancel(request_id="r", reason="x")
    size = len(encode_frame(big)) - HEADER_SIZE
    assert FrameDecoder(max_frame_size=size).feed(encode_frame(big)) == [big]
    with pytest.raises(FrameTooLarge):
        encode_frame(big, max_frame_size=size - 1)


@given(chunks=st.lists(st.binary(min_size=1, max_size=300), max_size=20))
@FUZZ
def test_decoder_never_buffers_more_than_one_frame(chunks: list[bytes]) -> None:
    limit = 100
    decoder = FrameDecoder(max_frame_size=limit)
    for chunk in chunks:
        try:
            decoder.feed(chunk)
        except FrameError:
            return
        assert decoder.buffered <= HEADER_SIZE + limit


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"\xc1", MalformedFrame),  # never-used msgpack type byte
        (msgpack.packb([1, 2]), MalformedFrame),  # not a map
        (msgpack.packb({"t": "ping"}) + b"\x00", MalformedFrame),  # trailing data
        (b"\x81\xa1t\xa4pi", MalformedFrame),  # truncated inside the body
        (b"\x81\xa1t\xa2\xff\xfe", MalformedFrame),  # invalid UTF-8
        (b"\x81\x01\x02", MalformedFrame),  # integer map key
        (msgpack.packb({"t": "zzz"}), UnknownFrameType),
        (msgpack.packb({"t": "ping", "nonce": msgpack.ExtType(5, b"x"), "sent_at": 0.0}), InvalidFrame),
    ],
)
def test_malformed_bodies_raise_typed_errors(body: bytes, error: type[FrameError]) -> None:
    with pytest.raises(error):
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)


def test_zero_length_frame_is_malformed() -> None:
    with pytest.raises(MalformedFrame):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


def test_decoder_stays_broken_after_an_error() -> None:
    decoder = FrameDecoder()
    with pytest.raises(MalformedFrame):
        decoder.feed(b"\x00\x00\x00\x01\xc1")
    with pytest.raises(MalformedFrame):
        decoder.feed(encode_frame(Ping(nonce=1, sent_at=0.0)))


def test_stream_ending_inside_a_frame_is_truncated() -> None:
    wire = encode_frame(Ping(nonce=1, sent_at=0.0))
    decoder = FrameDecoder()
    assert decoder.feed(wire[:-1]) == []
    with pytest.raises(TruncatedFrame):
        decoder.finish()
    header_only = FrameDecoder()
    header_only.feed(wire[:2])
    with pytest.raises(TruncatedFrame):
        header_only.finish()


def test_feed_until_returns_the_bytes_after_the_setup_frame() -> None:
    hello = Hello(protocol_version=1, node_id="n", software="s")
    decoder = FrameDecoder()
    frames_, rest = decoder.feed_until(encode_frame(hello)[:3], max_frames=1)
    assert (frames_, rest) == ([], b"")
    frames_, rest = decoder.feed_until(encode_frame(hello)[3:] + b"raw tensor bytes", max_frames=1)
    assert frames_ == [hello] and rest == b"raw tensor bytes"


def test_unencodable_map_values_are_invalid_frames() -> None:
    with pytest.raises(InvalidFrame, match="cannot be encoded"):
        encode_frame(request(body={"x": object()}))


def test_decoder_limit_must_be_sane() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_size=0)


@given(data=st.binary(max_size=400))
@FUZZ
def test_arbitrary_bytes_give_frames_or_typed_errors(data: bytes) -> None:
    decoder = FrameDecoder(max_frame_size=256)
    try:
        for item in decoder.feed(data):
            assert isinstance(item, Frame)
        decoder.finish()
    except FrameError as exc:
        assert isinstance(exc.wire_code, WireCode)


@given(data=st.data())
@FUZZ
def test_mutated_valid_frames_give_frames_or_typed_errors(data: st.DataObject) -> None:
    wire = bytearray(b"".join(encode_frame(f) for f in data.draw(st.lists(frames(), min_size=1, max_size=3))))
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, len(wire) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if action == "flip":
            wire[position] ^= data.draw(st.integers(1, 255))
        elif action == "delete" and len(wire) > 1:
            del wire[position]
        else:
            wire.insert(position, data.draw(st.integers(0, 255)))
    decoder = FrameDecoder(max_frame_size=64 * 1024)
    try:
        for item in decoder.feed(bytes(wire)):
            assert isinstance(item, Frame)
        decoder.finish()
    except ProtocolError as exc:
        assert isinstance(exc, FrameError)


def test_docs_describe_every_frame_and_wire_code() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    for tag, cls in FRAME_TYPES.items():
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{tag}` |")), None)
        assert row is not None, f"docs/protocol.md has no row for frame {tag!r}"
        for field in dataclasses.fields(cls):
            assert f"`{field.name}`" in row, f"docs/protocol.md: {tag} row lacks field {field.name!r}"
    for code in WireCode:
        assert f"| 0x{int(code):02X} | `{code.code}` |" in doc, f"docs/protocol.md has no row for {code.name}"

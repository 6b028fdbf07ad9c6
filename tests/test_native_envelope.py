"""Tensor envelope encode/decode in both implementations, against an independent wire oracle.

``raw_envelope`` below packs the documented byte layout with ``struct`` and a
bitwise CRC32C, independently of meshd_native, so these tests pin the wire
format itself and let us build every kind of bad input by hand.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest

import meshd_native
from conftest import native_or_skip
from meshd_native import (
    DType,
    EnvelopeChecksumMismatch,
    EnvelopeError,
    EnvelopeHeader,
    EnvelopeMalformed,
    EnvelopeOversized,
    EnvelopeTruncated,
    EnvelopeVersionMismatch,
    KernelError,
    Kind,
    Layout,
    Limits,
    QuantDescriptor,
    QuantFormat,
    TensorSpec,
)


def crc32c_ref(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


FIXED = struct.Struct("<4sBBBBBBHIQQIIQQQII")
PAYLOAD = bytes(range(128))


def raw_envelope(payload: bytes = PAYLOAD, **override: Any) -> bytes:
    """A (4, 8) float32 tensor in one chunk, with any field overridden."""
    fields: dict[str, Any] = {
        "magic": b"MTNS", "version": 1, "kind": 1, "dtype": 1, "layout": 1, "ndim": None,
        "qformat": 0, "qblock": 0, "layout_block": 0, "tensor_id": 42, "sequence": 3,
        "chunk_index": 0, "chunk_count": 1, "chunk_offset": 0, "total_length": 128,
        "payload_length": None, "payload_crc": None, "reserved": 0, "shape": (4, 8),
        "header_crc": None,
    }  # fmt: skip
    fields.update(override)
    shape = fields.pop("shape")
    header_crc = fields.pop("header_crc")
    if fields["ndim"] is None:
        fields["ndim"] = len(shape)
    if fields["payload_length"] is None:
        fields["payload_length"] = len(payload)
    if fields["payload_crc"] is None:
        fields["payload_crc"] = crc32c_ref(payload)
    head = FIXED.pack(*fields.values()) + struct.pack(f"<{len(shape)}Q", *shape)
    crc = crc32c_ref(head) if header_crc is None else header_crc
    return head + struct.pack("<I", crc) + payload


SPEC = TensorSpec(42, Kind.ACTIVATION, DType.F32, (4, 8), sequence=3)


def test_decodes_the_documented_layout(impl: meshd_native.Implementation) -> None:
    decoded = impl.decode_envelope(raw_envelope())
    assert decoded.header == EnvelopeHeader(SPEC, 0, 1, 0, 128, 128, crc32c_ref(PAYLOAD))
    assert bytes(decoded.payload) == PAYLOAD


def test_encodes_the_documented_layout(impl: meshd_native.Implementation) -> None:
    encoded = impl.encode_envelope(SPEC, PAYLOAD)
    assert encoded.to_bytes() == raw_envelope()
    assert encoded.header_bytes + bytes(encoded.payload) == raw_envelope()
    assert encoded.nbytes == len(raw_envelope())
    assert encoded.header.envelope_size == encoded.nbytes


def test_roundtrip_all_field_ranges(impl: meshd_native.Implementation) -> None:
    spec = TensorSpec(
        2**64 - 1, Kind.KV_BLOCK, DType.BF16, (2, 3, 64), Layout.ROW_MAJOR, 0,
        QuantDescriptor(QuantFormat.Q4_0, 32), 2**64 - 2,
    )  # fmt: skip
    payload = bytes(range(256)) * 2 + bytes(range(200))
    total = spec.nbytes
    encoded = impl.encode_envelope(
        spec, payload[:100], chunk_index=6, chunk_count=7, chunk_offset=total - 100,
        total_length=total,
    )  # fmt: skip
    decoded = impl.decode_envelope(encoded.to_bytes())
    assert decoded.header == encoded.header
    assert decoded.header.spec == spec


def test_zero_copy_in_and_out(impl: meshd_native.Implementation) -> None:
    array = np.arange(4 * 8, dtype=np.float32).reshape(4, 8)
    encoded = impl.encode_envelope(SPEC, array)
    assert np.shares_memory(np.frombuffer(encoded.payload, dtype=np.uint8), array)
    wire = bytearray(encoded.to_bytes())
    decoded = impl.decode_envelope(wire)
    view = np.frombuffer(decoded.payload, dtype=np.uint8)
    assert np.shares_memory(view, np.frombuffer(wire, dtype=np.uint8))
    as_array = decoded.array()
    assert np.array_equal(as_array, array)
    wire[decoded.header.header_size] ^= 0xFF  # the array is a view of the wire buffer
    assert not np.array_equal(as_array, array)


def test_encode_into_matches_two_buffer_form(impl: meshd_native.Implementation) -> None:
    payload = np.random.default_rng(5).standard_normal(32).astype(np.float32)
    out = bytearray(500)
    written = impl.encode_envelope_into(out, SPEC, payload)
    assert bytes(out[:written]) == impl.encode_envelope(SPEC, payload).to_bytes()
    with pytest.raises(KernelError):
        impl.encode_envelope_into(bytearray(100), SPEC, payload)
    with pytest.raises(KernelError):
        impl.encode_envelope_into(bytes(500), SPEC, payload)


def test_native_and_twin_encode_identically() -> None:
    native = native_or_skip()
    rng = np.random.default_rng(11)
    for dtype, shape in [(np.float16, (3, 5, 7)), (np.int64, (9,)), (np.uint8, ())]:
        array = rng.integers(0, 100, shape).astype(dtype)
        a = [e.to_bytes() for e in native.split_array(array, 16, tensor_id=1, kind=Kind.RAW)]
        b = [e.to_bytes() for e in meshd_native.twin.split_array(array, 16, tensor_id=1, kind=Kind.RAW)]
        assert a == b


BAD_INPUTS: list[tuple[str, bytes, type[EnvelopeError], str]] = [
    ("empty", b"", EnvelopeTruncated, "short_header"),
    ("fixed part cut", raw_envelope()[:71], EnvelopeTruncated, "short_header"),
    ("shape cut", raw_envelope()[:80], EnvelopeTruncated, "short_header"),
    ("payload cut", raw_envelope()[:-1], EnvelopeTruncated, "short_payload"),
    ("trailing", raw_envelope() + b"\0", EnvelopeMalformed, "trailing_bytes"),
    ("magic", raw_envelope(magic=b"MTNX"), EnvelopeMalformed, "bad_magic"),
    ("version", raw_envelope(version=2), EnvelopeVersionMismatch, "bad_version"),
    ("ndim", raw_envelope(shape=(1,) * 9, total_length=4), EnvelopeOversized, "too_many_dims"),
    ("header crc", raw_envelope(header_crc=0), EnvelopeChecksumMismatch, "header_checksum"),
    ("payload crc", raw_envelope(payload_crc=1), EnvelopeChecksumMismatch, "payload_checksum"),
    ("reserved", raw_envelope(reserved=1), EnvelopeMalformed, "reserved_nonzero"),
    ("kind", raw_envelope(kind=0), EnvelopeMalformed, "bad_kind"),
    ("dtype", raw_envelope(dtype=99), EnvelopeMalformed, "bad_dtype"),
    ("layout", raw_envelope(layout=7), EnvelopeMalformed, "bad_layout"),
    ("qformat", raw_envelope(qformat=5), EnvelopeMalformed, "bad_quant_format"),
    ("blocked no tile", raw_envelope(layout=3), EnvelopeMalformed, "bad_layout_block"),
    ("tile not blocked", raw_envelope(layout_block=4), EnvelopeMalformed, "bad_layout_block"),
    ("block no quant", raw_envelope(qblock=32), EnvelopeMalformed, "bad_quant_block"),
    ("q8 block 16", raw_envelope(qformat=8, qblock=16), EnvelopeMalformed, "bad_quant_block"),
    ("q8 of ints", raw_envelope(qformat=8, qblock=32, dtype=9), EnvelopeMalformed, "bad_quant_dtype"),
    ("q8 column major", raw_envelope(qformat=8, qblock=32, layout=2), EnvelopeMalformed, "bad_quant_layout"),
    ("q8 partial block", raw_envelope(qformat=8, qblock=32), EnvelopeMalformed, "bad_quant_shape"),
    ("q8 scalar", raw_envelope(qformat=8, qblock=32, shape=()), EnvelopeMalformed, "bad_quant_shape"),
    ("dim", raw_envelope(shape=(2**41, 0)), EnvelopeOversized, "dim_too_large"),
    ("tensor", raw_envelope(shape=(2**40,) * 8), EnvelopeOversized, "tensor_too_large"),
    ("tensor q4", raw_envelope(qformat=2, qblock=32, shape=(2**40, 2**30)), EnvelopeOversized, "tensor_too_large"),
    ("total", raw_envelope(total_length=127), EnvelopeMalformed, "bad_total_length"),
    ("zero dim total", raw_envelope(b"", shape=(2**40, 0), total_length=1), EnvelopeMalformed, "bad_total_length"),
    ("count 0", raw_envelope(chunk_count=0), EnvelopeMalformed, "bad_chunk_count"),
    ("count huge", raw_envelope(chunk_count=2**21), EnvelopeOversized, "too_many_chunks"),
    ("index", raw_envelope(chunk_index=1), EnvelopeMalformed, "bad_chunk_index"),
    ("payload huge", raw_envelope(payload_length=2**31, shape=(2**30,), total_length=2**32), EnvelopeOversized, "payload_too_large"),
    ("range", raw_envelope(chunk_offset=1), EnvelopeMalformed, "bad_chunk_range"),
    ("range wrap", raw_envelope(chunk_offset=2**64 - 1), EnvelopeMalformed, "bad_chunk_range"),
    ("length > total", raw_envelope(payload_length=129), EnvelopeMalformed, "bad_chunk_range"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "error", "reason"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_rejects_bad_input(
    impl: meshd_native.Implementation, data: bytes, error: type[EnvelopeError], reason: str
) -> None:
    with pytest.raises(error) as info:
        impl.decode_envelope(data)
    assert info.value.reason == reason
    assert info.value.code == error.code
    assert meshd_native.REASONS[reason] is error


def test_limits_are_enforced(impl: meshd_native.Implementation) -> None:
    data = raw_envelope()
    tight = [
        (Limits(max_ndim=1), "too_many_dims"),
        (Limits(max_dim=7), "dim_too_large"),
        (Limits(max_tensor_bytes=127), "tensor_too_large"),
        (Limits(max_payload_length=127), "payload_too_large"),
        (Limits(max_chunks=0), "too_many_chunks"),
    ]
    for limits, reason in tight:
        with pytest.raises(EnvelopeError) as info:
            impl.decode_envelope(data, limits)
        assert info.value.reason == reason
    exact = Limits(max_ndim=2, max_dim=8, max_tensor_bytes=128, max_payload_length=128, max_chunks=1)
    assert impl.decode_envelope(data, exact).header.payload_length == 128


def test_limits_validate_themselves() -> None:
    with pytest.raises(ValueError):
        Limits(max_ndim=17)
    with pytest.raises(ValueError):
        Limits(max_tensor_bytes=2**63)


def test_encoder_refuses_what_the_decoder_would(impl: meshd_native.Implementation) -> None:
    cases = [
        (TensorSpec(-1, Kind.RAW, DType.U8, (128,)), "field_out_of_range"),
        (TensorSpec(2**64, Kind.RAW, DType.U8, (128,)), "field_out_of_range"),
        (TensorSpec(1, Kind.RAW, DType.U8, (128,), sequence=-5), "field_out_of_range"),
        (TensorSpec(1, Kind.RAW, DType.U8, (64,)), "bad_total_length"),
        (TensorSpec(1, Kind.RAW, DType.U8, (1,) * 7 + (128,)), "too_many_dims"),
        (TensorSpec(1, Kind.RAW, DType.U8, (128,), Layout.BLOCKED), "bad_layout_block"),
        (TensorSpec(1, 9, DType.U8, (128,)), "bad_kind"),  # type: ignore[arg-type]
    ]
    for spec, reason in cases:
        with pytest.raises(EnvelopeError) as info:
            impl.encode_envelope(spec, PAYLOAD, limits=Limits(max_ndim=7))
        assert info.value.reason == reason, spec


def test_peek_header_size() -> None:
    data = raw_envelope(shape=(2, 4, 4), total_length=128)
    assert meshd_native.peek_header_size(data[:9]) == 72 + 3 * 8 + 4
    with pytest.raises(EnvelopeTruncated):
        meshd_native.peek_header_size(data[:8])
    with pytest.raises(EnvelopeMalformed):
        meshd_native.peek_header_size(b"XXXX" + data[4:9])
    with pytest.raises(EnvelopeVersionMismatch):
        meshd_native.peek_header_size(raw_envelope(version=9)[:9])


def test_decode_header_ignores_payload_bytes(impl: meshd_native.Implementation) -> None:
    data = raw_envelope()
    header = impl.decode_header(data[: 72 + 16 + 4])
    assert header.spec == SPEC and header.header_size == 92
    assert impl.encode_header(header) == data[:92]


def test_non_buffer_input_is_a_kernel_error(impl: meshd_native.Implementation) -> None:
    with pytest.raises(KernelError):
        impl.decode_envelope("text")  # type: ignore[arg-type]
    with pytest.raises(KernelError):
        impl.encode_envelope(SPEC, np.zeros((8, 8), np.float32)[:, ::2])


def test_single_chunk_array_view_only(impl: meshd_native.Implementation) -> None:
    envelopes = list(impl.split_array(np.zeros(64, np.float32), 64, tensor_id=1, kind=Kind.RAW))
    with pytest.raises(KernelError):
        impl.decode_envelope(envelopes[0].to_bytes()).array()


def test_spec_for_array() -> None:
    arr = np.zeros((3, 4), dtype=np.float16)
    spec = meshd_native.spec_for_array(arr, tensor_id=5, kind=Kind.EMBEDDING, sequence=2)
    assert spec == TensorSpec(5, Kind.EMBEDDING, DType.F16, (3, 4), Layout.ROW_MAJOR, sequence=2)
    fortran = meshd_native.spec_for_array(np.asfortranarray(arr), tensor_id=5, kind=Kind.RAW)
    assert fortran.layout == Layout.COLUMN_MAJOR
    bits = np.zeros(4, np.uint16)
    assert meshd_native.spec_for_array(bits, tensor_id=1, kind=Kind.RAW).dtype == DType.U16
    assert meshd_native.spec_for_array(bits, tensor_id=1, kind=Kind.RAW, dtype=DType.BF16).dtype == DType.BF16
    for bad in (np.zeros(4, ">f4"), np.zeros(4, bool), np.zeros((4, 4))[:, ::2]):
        with pytest.raises(KernelError):
            meshd_native.spec_for_array(bad, tensor_id=1, kind=Kind.RAW)
    with pytest.raises(KernelError):
        meshd_native.spec_for_array(bits, tensor_id=1, kind=Kind.RAW, dtype=DType.F32)

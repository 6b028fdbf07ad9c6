"""Chunking and any-order reassembly of tensors, in both implementations."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import meshd_native
from meshd_native import (
    DType,
    DuplicateChunk,
    InconsistentChunk,
    KernelError,
    Kind,
    Layout,
    ReassemblerConfig,
    ReassemblyOverflow,
    TensorSpec,
)


def _wire(impl: meshd_native.Implementation, array: np.ndarray, chunk: int, **kw: object) -> list[bytes]:
    kw.setdefault("tensor_id", 9)
    kw.setdefault("kind", Kind.KV_BLOCK)
    return [e.to_bytes() for e in impl.split_array(array, chunk, **kw)]  # type: ignore[arg-type]


def _feed(reassembler: meshd_native.Reassembler, chunks: list[bytes]) -> list[meshd_native.TensorReassembled]:
    return [done for data in chunks if (done := reassembler.add(data)) is not None]


DTYPES = [np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.int64]


@settings(max_examples=150, deadline=None)
@given(
    array=hnp.arrays(
        st.sampled_from(DTYPES),
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9),
    ),
    chunk=st.integers(1, 700),
    fortran=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_order_reassembly_and_native_equals_twin(
    array: np.ndarray, chunk: int, fortran: bool, seed: int
) -> None:
    if fortran:
        array = np.asfortranarray(array)
    wires = {}
    for name, impl in meshd_native.implementations().items():
        chunks = _wire(impl, array, chunk, sequence=seed % 7)
        wires[name] = chunks
        order = list(range(len(chunks)))
        random.Random(seed).shuffle(order)
        reassembler = impl.reassembler()
        done = _feed(reassembler, [chunks[i] for i in order])
        assert len(done) == 1
        result = done[0]
        assert result.chunk_count == len(chunks) == max(1, -(-array.nbytes // chunk))
        assert result.array.dtype == array.dtype and result.array.shape == array.shape
        assert result.array.tobytes(order="A") == array.tobytes(order="A")
        assert np.array_equal(result.array, array, equal_nan=array.dtype.kind == "f")
        expected = Layout.ROW_MAJOR if array.flags.c_contiguous else Layout.COLUMN_MAJOR
        assert result.spec.layout == expected
        assert result.array.flags.c_contiguous == array.flags.c_contiguous
        assert reassembler.pending_tensors == 0 and reassembler.pending_bytes == 0
    if len(wires) == 2:
        assert wires["native"] == wires["twin"]


def test_quantized_and_bf16_tensors_travel(impl: meshd_native.Implementation) -> None:
    values = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    blocks = impl.quantize(values, meshd_native.QuantFormat.Q8_0)
    spec = TensorSpec(3, Kind.KV_BLOCK, DType.F32, (4, 64), quant=meshd_native.Q8_0)
    chunks = [e.to_bytes() for e in impl.split_tensor(spec, blocks, 50)]
    (done,) = _feed(impl.reassembler(), chunks[::-1])
    assert np.array_equal(done.array, blocks)
    assert np.array_equal(impl.dequantize(done.array, meshd_native.QuantFormat.Q8_0),
                          impl.dequantize(blocks, meshd_native.QuantFormat.Q8_0))
    bits = impl.convert(values, DType.F32, DType.BF16)
    (done,) = _feed(impl.reassembler(), _wire(impl, bits, 100, dtype=DType.BF16))
    assert done.spec.dtype == DType.BF16 and np.array_equal(done.array, bits)


def test_blocked_layout_stays_flat(impl: meshd_native.Implementation) -> None:
    payload = np.arange(48, dtype=np.int16)
    spec = TensorSpec(4, Kind.KV_BLOCK, DType.I16, (4, 12), Layout.BLOCKED, layout_block=4)
    (done,) = _feed(impl.reassembler(), [e.to_bytes() for e in impl.split_tensor(spec, payload, 30)])
    assert done.array.shape == (48,) and np.array_equal(done.array, payload)


def test_duplicate_and_late_chunks_are_rejected(impl: meshd_native.Implementation) -> None:
    chunks = _wire(impl, np.arange(100, dtype=np.float32), 64)
    reassembler = impl.reassembler()
    assert reassembler.add(chunks[0]) is None
    with pytest.raises(DuplicateChunk) as info:
        reassembler.add(chunks[0])
    assert info.value.reason == "duplicate_chunk"
    # the rejection left the partial tensor intact
    assert _feed(reassembler, chunks[1:])[0].array.size == 100
    with pytest.raises(DuplicateChunk) as info:
        reassembler.add(chunks[3])
    assert info.value.reason == "already_completed"


def test_inconsistent_chunks_are_rejected(impl: meshd_native.Implementation) -> None:
    a = _wire(impl, np.arange(64, dtype=np.float32), 64)
    reassembler = impl.reassembler()
    reassembler.add(a[0])
    other_shape = _wire(impl, np.arange(64, dtype=np.float32).reshape(8, 8), 64)
    with pytest.raises(InconsistentChunk) as info:
        reassembler.add(other_shape[1])
    assert info.value.reason == "spec_mismatch"
    other_count = _wire(impl, np.arange(64, dtype=np.float32), 32)
    with pytest.raises(InconsistentChunk) as info:
        reassembler.add(other_count[5])
    assert info.value.reason == "chunk_count_mismatch"
    assert _feed(reassembler, a[1:])[0].array.size == 64


def test_overlap_and_gaps_are_rejected(impl: meshd_native.Implementation) -> None:
    spec = TensorSpec(5, Kind.RAW, DType.U8, (40,))
    payload = bytes(range(40))

    def chunk(index: int, offset: int, length: int) -> bytes:
        return impl.encode_envelope(
            spec, payload[offset : offset + length], chunk_index=index, chunk_count=3,
            chunk_offset=offset, total_length=40,
        ).to_bytes()  # fmt: skip

    reassembler = impl.reassembler()
    reassembler.add(chunk(0, 10, 10))
    for index, offset, length in [(1, 5, 6), (1, 19, 5), (1, 12, 2), (1, 0, 40)]:
        with pytest.raises(InconsistentChunk) as info:
            reassembler.add(chunk(index, offset, length))
        assert info.value.reason == "overlapping_chunk"
    reassembler.add(chunk(1, 0, 10))
    with pytest.raises(InconsistentChunk) as info:
        reassembler.add(chunk(2, 20, 10))  # every chunk in, bytes 30..40 never sent
    assert info.value.reason == "incomplete_coverage"
    assert reassembler.pending_tensors == 0 and reassembler.pending_bytes == 0


def test_memory_bounds(impl: meshd_native.Implementation) -> None:
    config = ReassemblerConfig(max_pending_bytes=1000, max_pending_tensors=2, max_chunks_per_tensor=4)
    reassembler = impl.reassembler(config)
    big = _wire(impl, np.zeros(1001, np.uint8), 500, tensor_id=1)
    with pytest.raises(ReassemblyOverflow) as info:
        reassembler.add(big[0])
    assert info.value.reason == "pending_bytes_exceeded"
    many = _wire(impl, np.zeros(100, np.uint8), 20, tensor_id=2)
    with pytest.raises(ReassemblyOverflow) as info:
        reassembler.add(many[0])
    assert info.value.reason == "chunk_count_exceeded"
    first = _wire(impl, np.zeros(400, np.uint8), 200, tensor_id=3)
    second = _wire(impl, np.zeros(400, np.uint8), 200, tensor_id=4)
    third = _wire(impl, np.zeros(10, np.uint8), 5, tensor_id=5)
    reassembler.add(first[0])
    reassembler.add(second[0])
    assert reassembler.pending_bytes == 800
    with pytest.raises(ReassemblyOverflow) as info:
        reassembler.add(third[0])
    assert info.value.reason == "too_many_pending"
    assert reassembler.pending_tensors == 2
    assert reassembler.add(first[1]) is not None
    assert reassembler.add(third[0]) is None
    assert reassembler.pending_bytes == 410


def test_expire_and_discard(impl: meshd_native.Implementation) -> None:
    reassembler = impl.reassembler()
    a = _wire(impl, np.zeros(10, np.uint8), 5, tensor_id=1)
    b = _wire(impl, np.zeros(10, np.uint8), 5, tensor_id=2, sequence=4)
    reassembler.add(a[0], now=100.0)
    reassembler.add(b[0], now=105.0)
    assert reassembler.expire(now=110.0, max_age=7.0) == [(1, 0)]
    assert reassembler.pending_tensors == 1 and reassembler.pending_bytes == 10
    assert reassembler.discard(2, 4) and not reassembler.discard(2, 4)
    assert reassembler.pending_tensors == 0
    # an expired tensor can start over
    assert reassembler.add(a[1]) is None and reassembler.add(a[0]) is not None


def test_add_decoded_checks_payload_length(impl: meshd_native.Implementation) -> None:
    (data,) = _wire(impl, np.zeros(10, np.uint8), 100)
    decoded = impl.decode_envelope(data)
    with pytest.raises(InconsistentChunk) as info:
        impl.reassembler().add_decoded(decoded.header, bytes(decoded.payload)[:-1])
    assert info.value.reason == "payload_length_mismatch"
    assert impl.reassembler().add_decoded(decoded.header, decoded.payload) is not None


def test_corrupt_chunk_never_reaches_the_tensor(impl: meshd_native.Implementation) -> None:
    chunks = _wire(impl, np.arange(50, dtype=np.int32), 64)
    reassembler = impl.reassembler()
    bad = bytearray(chunks[1])
    bad[-1] ^= 1
    with pytest.raises(meshd_native.EnvelopeChecksumMismatch):
        reassembler.add(bytes(bad))
    (done,) = _feed(reassembler, chunks)
    assert np.array_equal(done.array, np.arange(50, dtype=np.int32))


def test_split_arguments_are_checked_before_iteration(impl: meshd_native.Implementation) -> None:
    spec = TensorSpec(1, Kind.RAW, DType.F32, (10,))
    with pytest.raises(KernelError):
        impl.split_tensor(spec, bytes(40), 0)
    with pytest.raises(meshd_native.EnvelopeMalformed) as info:
        impl.split_tensor(spec, bytes(39), 8)
    assert info.value.reason == "bad_total_length"
    with pytest.raises(meshd_native.EnvelopeOversized):
        impl.split_tensor(spec, bytes(40), 1, meshd_native.Limits(max_chunks=39))


def test_package_level_reassembler_uses_the_live_implementation() -> None:
    chunks = [e.to_bytes() for e in meshd_native.split_array(np.ones(7), 16, tensor_id=1, kind=Kind.RAW)]
    (done,) = _feed(meshd_native.Reassembler(), chunks)
    assert np.array_equal(done.array, np.ones(7))

"""meshd.kvcache without a model: state parsing, the descriptor, envelopes and their rejections."""

from __future__ import annotations

import dataclasses
import struct

import msgpack
import numpy as np
import pytest

from meshd.kvcache import (
    BundleAssembler,
    CacheChecksumMismatch,
    CacheDescriptor,
    CacheDescriptorInvalid,
    CacheDescriptorMismatch,
    CacheStateUnsupported,
    CacheTransferError,
    LayerKV,
    SeqState,
    build_seq_state,
    bundle_from_state,
    pack,
    parse_seq_state,
    prefix_sha256,
    state_from_bundle,
)
from meshd.kvcache.descriptor import BACKEND_LLAMA_CPP, FORMAT_VERSION, STATE_FORMAT

N_LAYER, HEADS, DIM = 3, 2, 64
PREAMBLE = bytes.fromhex("d83c14af00000000")


def make_state(n: int, v_trans: bool, seed: int = 0) -> SeqState:
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(N_LAYER):
        k = rng.standard_normal((n, HEADS * DIM)).astype(np.float16)
        v = rng.standard_normal((HEADS * DIM, n) if v_trans else (n, HEADS * DIM)).astype(np.float16)
        layers.append(LayerKV(1, 1, HEADS * DIM * 2, HEADS * DIM * 2, memoryview(k.tobytes()), memoryview(v.tobytes())))
    return SeqState(PREAMBLE, n, v_trans, tuple(layers))


def base_descriptor(n: int, wire: str = "raw") -> CacheDescriptor:
    tokens = tuple(range(10, 10 + n))
    return CacheDescriptor(
        format_version=FORMAT_VERSION, backend=BACKEND_LLAMA_CPP, state_format=STATE_FORMAT,
        state_preamble=PREAMBLE, model_id="m", model_sha256="ab" * 32, token_ids=tokens,
        prefix_sha256=prefix_sha256(tokens), n_layer=N_LAYER, n_head_kv=HEADS, head_dim_k=DIM,
        head_dim_v=DIM, k_dtype="f16", v_dtype="f16", v_trans=True, wire=wire, tensors=(),
    )


# --- llama.cpp's sequence state ----------------------------------------------------


@pytest.mark.parametrize("v_trans", [True, False])
def test_seq_state_round_trips_byte_for_byte(v_trans: bool) -> None:
    blob = bytes(build_seq_state(make_state(37, v_trans)))
    parsed = parse_seq_state(blob)
    assert (parsed.n_cells, parsed.v_trans, len(parsed.layers)) == (37, v_trans, N_LAYER)
    assert bytes(build_seq_state(parsed)) == blob
    # Header layout as llama.cpp writes it: preamble, n_stream=1, cell_count, cells (pos, 1, seq 0).
    assert blob[:8] == PREAMBLE and struct.unpack_from("<II", blob, 8) == (1, 37)
    assert struct.unpack_from("<iIi", blob, 16 + 12 * 5) == (5, 1, 0)


def test_empty_sequence_parses() -> None:
    assert parse_seq_state(PREAMBLE + struct.pack("<II", 1, 0)).n_cells == 0


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda b: b[:-1], "ends inside"),
        (lambda b: b + b"\0", "trailing"),
        (lambda b: b[:8] + struct.pack("<I", 2) + b[12:], "streams"),
        (lambda b: b[:16] + struct.pack("<i", 3) + b[20:], "positions 0..n-1"),  # cell 0 at pos 3
        (lambda b: b[:20] + struct.pack("<I", 2) + b[24:], "positions 0..n-1"),  # cell 0 in 2 sequences
    ],
)
def test_seq_state_refuses_what_it_cannot_address(mutate, reason: str) -> None:
    blob = bytes(build_seq_state(make_state(5, True)))
    with pytest.raises(CacheStateUnsupported, match=reason):
        parse_seq_state(mutate(blob))


def test_seq_state_refuses_quantized_cache_types() -> None:
    blob = bytearray(build_seq_state(make_state(5, True)))
    first_k_type = 16 + 5 * 12 + 8
    struct.pack_into("<i", blob, first_k_type, 8)  # ggml q8_0
    with pytest.raises(CacheStateUnsupported, match="ggml type 8"):
        parse_seq_state(bytes(blob))


# --- the descriptor -----------------------------------------------------------------


def test_descriptor_round_trips_and_is_canonical() -> None:
    bundle = bundle_from_state(make_state(9, True), base_descriptor(9))
    wire = bundle.descriptor.to_wire()
    again = CacheDescriptor.from_wire(wire)
    assert again == bundle.descriptor and again.to_wire() == wire
    assert [t.name for t in again.tensors] == [f"k.{i}" for i in range(3)] + [f"v.{i}" for i in range(3)]
    assert again.tensors[0].shape == (9, HEADS, DIM) and again.tensors[3].shape == (HEADS, DIM, 9)


def _tamper(encoded: bytes, changes: dict) -> bytes:
    body = msgpack.unpackb(encoded, raw=False)
    for key, value in changes.items():
        if value is KeyError:
            del body[key]
        else:
            body[key] = value
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"format_version": 2}, "format version"),
        ({"surprise": 1}, "unknown"),
        ({"wire": KeyError}, "missing"),
        ({"model_sha256": "AB" * 32}, "model_sha256"),
        ({"prefix_sha256": "0" * 64}, "prefix_sha256"),
        ({"token_ids": np.array([1, -5], "<i4").tobytes()}, "non-negative"),
        ({"n_layer": 4}, "tensor table"),
        ({"v_trans": 1}, "v_trans"),
        ({"k_dtype": "q4_0"}, "k_dtype"),
        ({"backend": "vllm"}, "backend"),
        ({"state_format": "llama.cpp/seq-state-v4"}, "state format"),
    ],
)
def test_descriptor_validation_is_strict(changes: dict, reason: str) -> None:
    wire = bundle_from_state(make_state(9, True), base_descriptor(9)).descriptor.to_wire()
    with pytest.raises(CacheDescriptorInvalid, match=reason):
        CacheDescriptor.from_wire(_tamper(wire, changes))


def test_descriptor_garbage_is_invalid() -> None:
    with pytest.raises(CacheDescriptorInvalid):
        CacheDescriptor.from_wire(b"\xc1\x00")
    with pytest.raises(CacheDescriptorInvalid):
        CacheDescriptor.from_wire(msgpack.packb([1, 2]))


def test_prefix_hash_is_sha256_of_int32_le() -> None:
    import hashlib

    assert prefix_sha256([1, 2]) == hashlib.sha256(b"\1\0\0\0\2\0\0\0").hexdigest()


# --- envelopes -----------------------------------------------------------------------


def _assemble(envelopes: list[bytes]):
    assembler = BundleAssembler()
    result = None
    for envelope in envelopes:
        result = assembler.add(envelope) or result
    return result


@pytest.mark.parametrize("v_trans", [True, False])
def test_raw_transfer_reproduces_the_state_exactly(v_trans: bool) -> None:
    state = make_state(40, v_trans)
    bundle = bundle_from_state(state, base_descriptor(40))
    envelopes = [e.to_bytes() for e in pack(bundle, transfer_id=99, chunk_size=4096)]
    assert len(envelopes) > 2 * N_LAYER + 1  # chunked
    received = _assemble(envelopes[::-1][-1:] + envelopes[1:][::-1])  # descriptor first, the rest reversed
    assert received is not None and received.descriptor == bundle.descriptor
    assert bytes(build_seq_state(state_from_bundle(received))) == bytes(build_seq_state(state))


@pytest.mark.parametrize("v_trans", [True, False])
def test_q8_0_wire_halves_the_bytes_and_stays_close(v_trans: bool) -> None:
    state = make_state(64, v_trans)
    raw = bundle_from_state(state, base_descriptor(64))
    q8 = bundle_from_state(state, base_descriptor(64), wire="q8_0")
    assert q8.descriptor.wire_bytes == raw.descriptor.wire_bytes * 34 // 64
    received = _assemble([e.to_bytes() for e in pack(q8, transfer_id=1)])
    back = state_from_bundle(received)
    for before, after in zip(state.layers, back.layers):
        for a, b in ((before.k, after.k), (before.v, after.v)):
            x = np.frombuffer(a, np.float16).astype(np.float32)
            y = np.frombuffer(b, np.float16).astype(np.float32)
            assert np.max(np.abs(x - y)) < 0.03  # q8_0 of N(0,1): step max|x|/127
    assert bytes(build_seq_state(back))[: 16 + 64 * 12] == bytes(build_seq_state(state))[: 16 + 64 * 12]


def test_corrupted_payload_is_a_checksum_error() -> None:
    envelopes = [bytearray(e.to_bytes()) for e in pack(bundle_from_state(make_state(8, True), base_descriptor(8)), 5)]
    envelopes[3][-1] ^= 0x01
    assembler = BundleAssembler()
    with pytest.raises(CacheChecksumMismatch):
        for envelope in envelopes:
            assembler.add(bytes(envelope))


def test_corrupted_descriptor_is_a_checksum_error() -> None:
    envelopes = [bytearray(e.to_bytes()) for e in pack(bundle_from_state(make_state(8, True), base_descriptor(8)), 5)]
    envelopes[0][-3] ^= 0x40
    with pytest.raises(CacheChecksumMismatch):
        BundleAssembler().add(bytes(envelopes[0]))


def test_tensor_that_disagrees_with_the_descriptor_crc_is_refused() -> None:
    # Self-consistent envelopes (valid chunk CRCs) carrying other K/V than the descriptor names.
    good = bundle_from_state(make_state(8, True, seed=1), base_descriptor(8))
    other = bundle_from_state(make_state(8, True, seed=2), base_descriptor(8))
    envelopes = [e.to_bytes() for e in pack(good, 5)][:1] + [e.to_bytes() for e in pack(other, 5)][1:]
    with pytest.raises(CacheChecksumMismatch, match="whole-tensor"):
        _assemble(envelopes)


def test_tensor_with_another_shape_is_a_descriptor_mismatch() -> None:
    small = bundle_from_state(make_state(8, True), base_descriptor(8))
    big = bundle_from_state(make_state(9, True), base_descriptor(9))
    envelopes = [e.to_bytes() for e in pack(small, 5)][:1] + [e.to_bytes() for e in pack(big, 5)][1:]
    with pytest.raises(CacheDescriptorMismatch):
        _assemble(envelopes)


def test_stream_order_and_mixing_are_refused() -> None:
    bundle = bundle_from_state(make_state(8, True), base_descriptor(8))
    envelopes = [e.to_bytes() for e in pack(bundle, 5)]
    with pytest.raises(CacheTransferError, match="before the descriptor"):
        BundleAssembler().add(envelopes[1])
    assembler = BundleAssembler()
    assembler.add(envelopes[0])
    with pytest.raises(CacheTransferError, match="transfer"):
        assembler.add(next(iter(pack(bundle, 6))).to_bytes())
    with pytest.raises(CacheTransferError):
        BundleAssembler().add(envelopes[0][:-1])  # truncated


def test_declared_size_over_the_bound_is_refused() -> None:
    bundle = bundle_from_state(make_state(8, True), base_descriptor(8))
    first = next(iter(pack(bundle, 5))).to_bytes()
    with pytest.raises(CacheTransferError, match="exceeds"):
        BundleAssembler(max_bytes=1000).add(first)


def test_bundle_needs_matching_token_count() -> None:
    with pytest.raises(CacheDescriptorMismatch):
        bundle_from_state(make_state(8, True), base_descriptor(9))
    with pytest.raises(CacheStateUnsupported, match="multiples of 32"):
        d = dataclasses.replace(base_descriptor(8), head_dim_k=48)
        d2 = dataclasses.replace(d, wire="q8_0")
        bundle_from_state(
            SeqState(PREAMBLE, 8, True, tuple(
                LayerKV(1, 1, HEADS * 48 * 2, HEADS * DIM * 2, memoryview(bytes(8 * HEADS * 48 * 2)),
                        memoryview(bytes(8 * HEADS * DIM * 2))) for _ in range(N_LAYER))),
            d2, wire="q8_0")

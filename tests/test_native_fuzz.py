"""Fuzzing the envelope decoder with random and mutated input, native against twin.

Every input must either decode or raise an ``EnvelopeError``; anything else
(a crash, an IndexError, a numpy error) fails the test. When the compiled
kernels are present, both implementations must reach the same outcome: the
same header and payload, or the same error class and reason.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meshd_native
from meshd_native import EnvelopeError, Kind, Limits

LIMITS = [meshd_native.DEFAULT_LIMITS, Limits(max_ndim=3, max_dim=1000, max_tensor_bytes=4096, max_payload_length=512, max_chunks=16)]


def outcome(impl: meshd_native.Implementation, data: bytes, limits: Limits) -> tuple[Any, ...]:
    try:
        decoded = impl.decode_envelope(data, limits)
    except EnvelopeError as exc:
        return ("error", type(exc), exc.reason)
    assert decoded.header.envelope_size == len(data)
    return ("ok", decoded.header, bytes(decoded.payload))


def header_outcome(impl: meshd_native.Implementation, data: bytes, limits: Limits) -> tuple[Any, ...]:
    try:
        return ("ok", impl.decode_header(data, limits))
    except EnvelopeError as exc:
        return ("error", type(exc), exc.reason)


def check_all(data: bytes) -> tuple[Any, ...]:
    results = []
    for limits in LIMITS:
        per_impl = [outcome(impl, data, limits) for impl in meshd_native.implementations().values()]
        assert all(r == per_impl[0] for r in per_impl), per_impl
        headers = [header_outcome(impl, data, limits) for impl in meshd_native.implementations().values()]
        assert all(r == headers[0] for r in headers), headers
        results.append(per_impl[0])
    return results[0]


def seed_envelopes() -> list[bytes]:
    rng = np.random.default_rng(99)
    twin = meshd_native.twin
    seeds: list[bytes] = []
    for dtype, shape, chunk in [
        (np.float32, (4, 8), 1000), (np.float16, (3, 2, 5), 7), (np.uint8, (0,), 4),
        (np.int64, (), 8), (np.float64, (2, 1, 1, 3), 16),
    ]:  # fmt: skip
        array = rng.integers(0, 50, shape).astype(dtype)
        seeds += [e.to_bytes() for e in twin.split_array(array, chunk, tensor_id=5, kind=Kind.KV_BLOCK)]
    blocks = twin.quantize(rng.standard_normal((2, 64)).astype(np.float32), meshd_native.QuantFormat.Q4_0)
    spec = meshd_native.TensorSpec(8, Kind.ACTIVATION, meshd_native.DType.F16, (2, 64), quant=meshd_native.Q4_0)
    seeds += [e.to_bytes() for e in twin.split_tensor(spec, blocks, 40)]
    return seeds


SEEDS = seed_envelopes()


def refresh_checksums(data: bytearray, fix_payload: bool) -> None:
    """Recompute header (and payload) CRCs so mutations reach the field checks."""
    if len(data) < 72:
        return
    size = 72 + 8 * data[8] + 4
    if len(data) < size:
        return
    if fix_payload:
        payload = bytes(data[size:])
        struct.pack_into("<QI", data, 56, len(payload), meshd_native.twin.crc32c(payload))
    struct.pack_into("<I", data, size - 4, meshd_native.twin.crc32c(bytes(data[: size - 4])))


def mutate(rnd: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        choice = rnd.randrange(6)
        if choice == 0 and out:
            out[rnd.randrange(len(out))] ^= 1 << rnd.randrange(8)
        elif choice == 1:
            del out[rnd.randrange(len(out) + 1) :]
        elif choice == 2:
            position = rnd.randrange(len(out) + 1)
            out[position:position] = rnd.randbytes(rnd.randint(1, 9))
        elif choice == 3 and len(out) >= 8:
            position = rnd.randrange(len(out) - 7)
            struct.pack_into("<Q", out, position, rnd.choice([0, 1, 2**32, 2**63, 2**64 - 1, rnd.getrandbits(64)]))
        elif choice == 4 and len(out) > 9:
            out[rnd.randrange(4, 10)] = rnd.randrange(256)
        elif choice == 5 and out:
            out[rnd.randrange(len(out))] = rnd.randrange(256)
    if rnd.random() < 0.8:
        refresh_checksums(out, fix_payload=rnd.random() < 0.5)
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    assert check_all(data)[0] == "error"


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SEEDS), st.randoms(use_true_random=False))
def test_mutated_envelopes(seed: bytes, rnd: random.Random) -> None:
    check_all(mutate(rnd, seed))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=72, max_size=72), st.lists(st.integers(0, 2**64 - 1), max_size=9), st.binary(max_size=64))
def test_random_headers_with_valid_checksum(fixed: bytes, shape: list[int], payload: bytes) -> None:
    """Random field values behind a correct magic, version and header CRC."""
    data = bytearray(b"MTNS\x01" + fixed[5:])
    data[8] = len(shape)
    data += struct.pack(f"<{len(shape)}Q", *shape) + b"\0\0\0\0"
    refresh_checksums(data, fix_payload=False)
    check_all(bytes(data) + payload)


def test_mutation_corpus_reaches_every_check() -> None:
    """A fixed-seed corpus large enough to hit deep checks; both outcomes recorded."""
    rnd = random.Random(1234)
    reasons: set[str] = set()
    decoded = 0
    for _ in range(4000):
        result = check_all(mutate(rnd, rnd.choice(SEEDS)))
        if result[0] == "ok":
            decoded += 1
        else:
            reasons.add(result[2])
    assert decoded > 0
    expected = {
        "short_header", "short_payload", "trailing_bytes", "bad_magic", "bad_version",
        "too_many_dims", "header_checksum", "payload_checksum", "bad_kind", "bad_dtype",
        "bad_total_length", "bad_chunk_range",
    }  # fmt: skip
    assert expected <= reasons, expected - reasons


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_every_truncation_of_a_valid_envelope(seed: bytes) -> None:
    for cut in range(len(seed)):
        result = check_all(seed[:cut])
        assert result[0] == "error" and result[1] is meshd_native.EnvelopeTruncated
    assert check_all(seed)[0] == "ok"

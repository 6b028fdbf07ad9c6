"""CRC32C in both meshd_native implementations: test vectors, continuation, every CPU path."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meshd_native
from meshd_native import KernelError
from conftest import native_or_skip


# RFC 3720 appendix B.4 plus the classic check value.
VECTORS = [
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"", 0x00000000),
    (b"a", 0xC1D04330),
]

ISCSI_READ_PDU = bytes.fromhex(
    "01c00000000000000000000000000000"
    "14000000000004000000001400000018"
    "28000000000000000200000000000000"
)


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_known_vectors(impl: meshd_native.Implementation, data: bytes, expected: int) -> None:
    assert impl.crc32c(data) == expected


def test_iscsi_pdu_vector(impl: meshd_native.Implementation) -> None:
    assert impl.crc32c(ISCSI_READ_PDU) == 0xD9963A56


def test_is_not_plain_crc32(impl: meshd_native.Implementation) -> None:
    data = b"meshd tensor payload"
    assert impl.crc32c(data) != zlib.crc32(data)


def test_accepts_any_contiguous_buffer(impl: meshd_native.Implementation) -> None:
    arr = np.arange(1000, dtype=np.float16)
    expected = impl.crc32c(arr.tobytes())
    assert impl.crc32c(arr) == expected
    assert impl.crc32c(memoryview(arr)) == expected
    assert impl.crc32c(bytearray(arr.tobytes())) == expected


def test_rejects_non_contiguous_and_bad_value(impl: meshd_native.Implementation) -> None:
    arr = np.arange(100, dtype=np.uint8)[::2]
    with pytest.raises(KernelError):
        impl.crc32c(arr)
    with pytest.raises(KernelError):
        impl.crc32c(b"x", 1 << 32)
    with pytest.raises(KernelError):
        impl.crc32c("not bytes")


def test_large_buffer_matches_between_implementations() -> None:
    native = native_or_skip()
    data = np.random.default_rng(7).integers(0, 256, (1 << 20) + 13, dtype=np.uint8)
    assert native.crc32c(data) == meshd_native.twin.crc32c(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000), st.integers(0, 5000), st.integers(0, 0xFFFFFFFF))
def test_continuation_equals_whole(data: bytes, cut: int, seed: int) -> None:
    cut = min(cut, len(data))
    for impl in meshd_native.implementations().values():
        whole = impl.crc32c(data, seed)
        assert impl.crc32c(data[cut:], impl.crc32c(data[:cut], seed)) == whole


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 20000), st.integers(0, 15), st.integers(0, 0xFFFFFFFF), st.randoms())
def test_every_native_path_matches_twin(size: int, offset: int, value: int, rnd) -> None:  # type: ignore[no-untyped-def]
    native_or_skip()
    from meshd_native import _crc

    buf = np.frombuffer(rnd.randbytes(size + offset), dtype=np.uint8)[offset:]
    expected = meshd_native.twin.crc32c(buf, value)
    for path in _crc.crc32c_paths():
        assert _crc.crc32c_with_path(buf, value, path) == expected, path


def test_native_paths_on_a_long_buffer() -> None:
    native_or_skip()
    from meshd_native import _crc

    data = np.random.default_rng(3).integers(0, 256, 3 * 8192 * 5 + 777, dtype=np.uint8)
    results = {path: _crc.crc32c_with_path(data, 0, path) for path in _crc.crc32c_paths()}
    assert set(results.values()) == {meshd_native.twin.crc32c(data)}
    assert {"auto", "portable"} <= set(results)


def test_unknown_path_is_a_kernel_error() -> None:
    native_or_skip()
    from meshd_native import _crc

    with pytest.raises(KernelError):
        _crc.crc32c_with_path(b"x", 0, "quantum")


def test_crc32c_copy_copies_and_checksums() -> None:
    for impl_kernels in (meshd_native._twin_framing, _native_framing()):
        if impl_kernels is None:
            continue
        src = np.random.default_rng(1).integers(0, 256, 300_001, dtype=np.uint8)
        dst = np.zeros(300_010, dtype=np.uint8)
        crc = impl_kernels.crc32c_copy(dst, src, 0)
        assert crc == meshd_native.twin.crc32c(src)
        assert np.array_equal(dst[: src.size], src)
        assert not dst[src.size :].any()
        with pytest.raises(KernelError):
            impl_kernels.crc32c_copy(dst[:10], src)
        with pytest.raises(KernelError):
            impl_kernels.crc32c_copy(bytes(400_000), src)


def _native_framing():  # type: ignore[no-untyped-def]
    if meshd_native.load_native() is None:
        return None
    from meshd_native import _framing

    return _framing

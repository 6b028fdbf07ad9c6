"""KV-cache kernels in both implementations: conversions, ggml quantization, layouts.

Oracles: numpy's own float16 casts (finite values), ``gguf.quants`` for bf16,
q8_0 and q4_0, and numpy transposes for the layout transforms.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import meshd_native
from meshd_native import DType, KernelError, QuantFormat

gguf_quants = pytest.importorskip("gguf.quants")
from gguf.constants import GGMLQuantizationType  # noqa: E402
from conftest import native_or_skip


GGML = {QuantFormat.Q8_0: GGMLQuantizationType.Q8_0, QuantFormat.Q4_0: GGMLQuantizationType.Q4_0}
RNG = np.random.default_rng(20240601)
SPECIAL_F32 = np.array(
    [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F800001, 0x7FC00000, 0xFFFFFFFF, 0x7FA00000,
     0x477FF000, 0x477FEFFF, 0x47800000, 0x33000000, 0x33000001, 0x387FE000, 0x387FF000,
     0x38800000, 1, 0x7F7FFFFF, 0x3F808000, 0x3F818000, 0x3F80C000],
    dtype=np.uint32,
)  # fmt: skip


def random_f32_bits(n: int) -> np.ndarray:
    bits = RNG.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([SPECIAL_F32, bits])


def _gguf(func: str, data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return getattr(gguf_quants, func)(data, qtype)


def _nan_mask32(bits: np.ndarray) -> np.ndarray:
    return (bits & 0x7FFFFFFF) > 0x7F800000


def test_f16_to_f32_exhaustive(impl: meshd_native.Implementation) -> None:
    half = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    out = impl.convert(half, DType.F16, DType.F32).view(np.uint32)
    nan = np.isnan(half)
    assert np.array_equal(out[~nan], half[~nan].astype(np.float32).view(np.uint32))
    hbits = half.view(np.uint16)[nan].astype(np.uint32)
    expected = ((hbits & 0x8000) << 16) | 0x7FC00000 | ((hbits & 0x3FF) << 13)
    assert np.array_equal(out[nan], expected)


def test_f32_to_f16_round_to_nearest_even(impl: meshd_native.Implementation) -> None:
    bits = random_f32_bits(1 << 16)
    out = impl.convert(bits.view(np.float32), DType.F32, DType.F16).view(np.uint16)
    nan = _nan_mask32(bits)
    with np.errstate(over="ignore"):
        reference = bits[~nan].view(np.float32).astype(np.float16).view(np.uint16)
    assert np.array_equal(out[~nan], reference)
    quiet = ((bits[nan] >> 16) & 0x8000) | 0x7E00 | ((bits[nan] >> 13) & 0x3FF)
    assert np.array_equal(out[nan], quiet.astype(np.uint16))
    # ties: 1 + 2^-11 rounds down to even, 1 + 3*2^-11 rounds up
    ties = np.array([1 + 2**-11, 1 + 3 * 2**-11, 65520.0, 65519.996], dtype=np.float32)
    assert impl.convert(ties, DType.F32, DType.F16).view(np.uint16).tolist() == [0x3C00, 0x3C02, 0x7C00, 0x7BFF]


def test_bf16_matches_gguf(impl: meshd_native.Implementation) -> None:
    bits = random_f32_bits(1 << 16)
    bits = bits[: bits.size // 32 * 32]
    expected = _gguf("quantize", bits.view(np.float32).reshape(-1, 32), GGMLQuantizationType.BF16)
    out = impl.convert(bits.view(np.float32), DType.F32, DType.BF16)
    assert out.dtype == np.uint16
    assert np.array_equal(out, expected.view(np.uint16).reshape(-1))
    back = impl.convert(out, DType.BF16, DType.F32)
    gguf_back = _gguf("dequantize", expected, GGMLQuantizationType.BF16).reshape(-1)
    assert np.array_equal(back.view(np.uint32), gguf_back.view(np.uint32))


def test_f16_bf16_go_through_f32(impl: meshd_native.Implementation) -> None:
    half = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    via = impl.convert(impl.convert(half, DType.F16, DType.F32), DType.F32, DType.BF16)
    assert np.array_equal(impl.convert(half, DType.F16, DType.BF16), via)
    brain = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    via = impl.convert(impl.convert(brain, DType.BF16, DType.F32), DType.F32, DType.F16)
    assert np.array_equal(impl.convert(brain, DType.BF16, DType.F16).view(np.uint16), via.view(np.uint16))


def test_strided_inputs_and_outputs(impl: meshd_native.Implementation) -> None:
    base = RNG.standard_normal((6, 10, 12)).astype(np.float32)
    views = [base[::2], base[:, ::-1], base.transpose(2, 0, 1), base[1:4, 3:9:2, ::3], base[0, 0, 5, ...]]
    for view in views:
        contiguous = view.copy(order="C")
        for dst in (DType.F16, DType.BF16):
            expected = impl.convert(contiguous, DType.F32, dst)
            assert np.array_equal(impl.convert(view, DType.F32, dst), expected)
            out_base = np.zeros((2, *view.shape[::-1]), dtype=expected.dtype)
            out = out_base[1, ...].T  # non-contiguous destination
            assert impl.convert(view, DType.F32, dst, out=out) is out
            assert np.array_equal(out, expected)
            assert not out_base[0].any()
    assert impl.convert(np.zeros((0, 3), np.float32), DType.F32, DType.F16).shape == (0, 3)
    same = impl.convert(base[::2], DType.F32, DType.F32)
    assert np.array_equal(same, base[::2]) and same.flags.c_contiguous


def test_conversion_argument_errors(impl: meshd_native.Implementation) -> None:
    x = np.zeros((4, 4), np.float32)
    bad_calls = [
        lambda: impl.convert(x, DType.F16, DType.F32),  # wrong storage dtype
        lambda: impl.convert(x, DType.F32, DType.I8),
        lambda: impl.convert(x, 77, DType.F16),  # type: ignore[arg-type]
        lambda: impl.convert(x, DType.F32, DType.F16, out=np.zeros((4, 5), np.float16)),
        lambda: impl.convert(x, DType.F32, DType.F16, out=np.zeros((4, 4), np.uint16)),
        lambda: impl.convert(x, DType.F32, DType.F32, out=x),
        lambda: impl.convert(x.astype(">f4"), DType.F32, DType.F16),
    ]
    readonly = np.zeros((4, 4), np.float16)
    readonly.flags.writeable = False
    bad_calls.append(lambda: impl.convert(x, DType.F32, DType.F16, out=readonly))
    for call in bad_calls:
        with pytest.raises(KernelError):
            call()


def _quant_inputs() -> list[np.ndarray]:
    scales = np.array([1e-40, 1e-38, 3e-37, 1e-30, 1e-3, 1.0, 1e3, 3e38], dtype=np.float32)
    with np.errstate(over="ignore"):  # the largest scale overflows some values to inf
        values = RNG.standard_normal((64, 96)).astype(np.float32) * np.repeat(scales, 8)[:, None]
    values[0, :32] = 0.0
    values[1, :32] = -0.0
    values[2, 5] = np.inf
    values[3, 40] = -np.inf
    values[4, 0:32] = RNG.integers(-3, 4, 32) * 0.5  # exact .5 ties after scaling
    values[5, 64:96] = np.float32(3.4e38)
    return [values, values[:, :32], RNG.standard_normal((2, 3, 64)).astype(np.float32)]


@pytest.mark.parametrize("fmt", [QuantFormat.Q8_0, QuantFormat.Q4_0])
def test_quantization_matches_gguf(impl: meshd_native.Implementation, fmt: QuantFormat) -> None:
    for values in _quant_inputs():
        expected = _gguf("quantize", values, GGML[fmt])
        blocks = impl.quantize(values, fmt)
        assert blocks.shape == expected.shape and blocks.dtype == np.uint8
        assert np.array_equal(blocks, expected)
        restored = impl.dequantize(blocks, fmt)
        reference = _gguf("dequantize", expected, GGML[fmt])
        assert np.array_equal(restored.view(np.uint32), reference.view(np.uint32))


@pytest.mark.parametrize("fmt", [QuantFormat.Q8_0, QuantFormat.Q4_0])
def test_dequantizing_arbitrary_bytes_matches_gguf(impl: meshd_native.Implementation, fmt: QuantFormat) -> None:
    block_bytes = 34 if fmt == QuantFormat.Q8_0 else 18
    blocks = RNG.integers(0, 256, (500, 2 * block_bytes), dtype=np.uint8)
    blocks[:, 1] &= 0x7B  # finite scales: numpy's NaN payload handling differs by platform
    expected = _gguf("dequantize", blocks, GGML[fmt])
    assert np.array_equal(impl.dequantize(blocks, fmt).view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("fmt", [QuantFormat.Q8_0, QuantFormat.Q4_0])
def test_nan_blocks_are_canonical(impl: meshd_native.Implementation, fmt: QuantFormat) -> None:
    values = RNG.standard_normal((2, 64)).astype(np.float32)
    values[0, 7] = np.nan
    blocks = impl.quantize(values, fmt)
    block_bytes = blocks.shape[1] // 2
    assert blocks[0, :2].tolist() == [0x00, 0x7E] and not blocks[0, 2:block_bytes].any()
    assert np.array_equal(blocks[:, block_bytes:], impl.quantize(values[:, 32:], fmt))
    assert np.isnan(impl.dequantize(blocks, fmt)[0, :32]).all()


def test_quantize_input_dtypes(impl: meshd_native.Implementation) -> None:
    values = RNG.standard_normal((3, 32)).astype(np.float32)
    expected = impl.quantize(values, QuantFormat.Q8_0)
    half = values.astype(np.float16)
    assert np.array_equal(impl.quantize(half, QuantFormat.Q8_0), impl.quantize(half.astype(np.float32), QuantFormat.Q8_0))
    assert np.array_equal(impl.quantize(values.astype(np.float64), QuantFormat.Q8_0), expected)
    bf = impl.convert(values, DType.F32, DType.BF16)
    assert np.array_equal(
        impl.quantize(bf, QuantFormat.Q8_0, src_dtype=DType.BF16),
        impl.quantize(impl.convert(bf, DType.BF16, DType.F32), QuantFormat.Q8_0),
    )
    assert np.array_equal(impl.quantize(np.asfortranarray(values), QuantFormat.Q8_0), expected)
    for bad in (
        lambda: impl.quantize(values[:, :31], QuantFormat.Q8_0),
        lambda: impl.quantize(np.float32(1.0), QuantFormat.Q8_0),
        lambda: impl.quantize(values.astype(np.int32), QuantFormat.Q8_0),
        lambda: impl.quantize(values, QuantFormat.NONE),
        lambda: impl.dequantize(expected[:, :33], QuantFormat.Q8_0),
        lambda: impl.dequantize(expected.astype(np.int8), QuantFormat.Q8_0),
    ):
        with pytest.raises(KernelError):
            bad()


def test_portable_q8_0_equals_simd() -> None:
    native_or_skip()
    from meshd_native import _kv

    bits = random_f32_bits(32 * 4096)
    values = bits[: bits.size // 32 * 32].view(np.float32)
    simd = np.empty(values.size // 32 * 34, np.uint8)
    portable = np.empty_like(simd)
    _kv.quantize_q8_0(values, simd)
    _kv.quantize_q8_0(values, portable, portable=True)
    assert np.array_equal(simd, portable)


FLOATS32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)


@settings(max_examples=200, deadline=None)
@given(
    values=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=12), elements=FLOATS32),
    step=st.integers(1, 3),
    flip=st.booleans(),
)
def test_native_conversions_equal_twin(values: np.ndarray, step: int, flip: bool) -> None:
    native = native_or_skip()
    twin = meshd_native.twin
    view = values[::step]
    if flip:
        view = view[..., ::-1]
    for src, dst in [(DType.F32, DType.F16), (DType.F32, DType.BF16)]:
        a = native.convert(view, src, dst)
        assert np.array_equal(a.view(np.uint16), twin.convert(view, src, dst).view(np.uint16))
        for back in (DType.F32, DType.F16, DType.BF16):
            if back != dst:
                x, y = native.convert(a, dst, back), twin.convert(a, dst, back)
                assert x.tobytes() == y.tobytes()


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(0, 6),
    blocks=st.integers(1, 4),
    data=st.data(),
    fmt=st.sampled_from([QuantFormat.Q8_0, QuantFormat.Q4_0]),
)
def test_native_quantization_equals_twin(rows: int, blocks: int, data: st.DataObject, fmt: QuantFormat) -> None:
    native = native_or_skip()
    twin = meshd_native.twin
    values = data.draw(hnp.arrays(np.float32, (rows, blocks * 32), elements=FLOATS32))
    a = native.quantize(values, fmt)
    assert np.array_equal(a, twin.quantize(values, fmt))
    raw = data.draw(hnp.arrays(np.uint8, a.shape))
    for blocks_in in (a, raw):
        x, y = native.dequantize(blocks_in, fmt), twin.dequantize(blocks_in, fmt)
        assert x.tobytes() == y.tobytes()


def test_swap_token_head(impl: meshd_native.Implementation) -> None:
    cache = RNG.standard_normal((3, 5, 4, 8)).astype(np.float16)  # [layer, token, head, dim]
    swapped = impl.swap_token_head(cache)
    assert swapped.shape == (3, 4, 5, 8) and swapped.flags.c_contiguous
    assert np.array_equal(swapped, cache.transpose(0, 2, 1, 3))
    assert np.array_equal(impl.swap_token_head(swapped), cache)
    with pytest.raises(KernelError):
        impl.swap_token_head(cache[0])


def test_permute_any_dtype(impl: meshd_native.Implementation) -> None:
    for dtype in (np.uint8, np.int16, np.float32, np.float64, np.complex128, "V3"):
        x = np.frombuffer(RNG.bytes(2 * 3 * 4 * 5 * np.dtype(dtype).itemsize), dtype=dtype).reshape(2, 3, 4, 5)
        for axes in [(3, 2, 1, 0), (0, 2, 1, 3), (1, 0, 3, 2)]:
            assert impl.permute(x, axes).tobytes() == np.ascontiguousarray(x.transpose(axes)).tobytes()
    with pytest.raises(KernelError):
        impl.permute(np.zeros((2, 3)), (0, 0))
    out = np.empty((3, 2), np.float32)
    assert impl.permute(np.ones((2, 3), np.float32), (1, 0), out=out) is out and out.all()


def test_split_and_merge_kv(impl: meshd_native.Implementation) -> None:
    kv = RNG.standard_normal((4, 2, 6, 3, 8)).astype(np.float32)  # [layer, k/v, token, head, dim]
    key, value = impl.split_kv(kv)
    assert np.array_equal(key, kv[:, 0]) and np.array_equal(value, kv[:, 1])
    assert key.flags.c_contiguous and value.flags.c_contiguous
    assert np.array_equal(impl.merge_kv(key, value), kv)
    merged_last = impl.merge_kv(key, value, axis=4)
    assert np.array_equal(merged_last, np.stack([key, value], axis=4))
    assert all(np.array_equal(a, b) for a, b in zip(impl.split_kv(merged_last, axis=4), (key, value)))
    for bad in (
        lambda: impl.split_kv(kv, axis=2),
        lambda: impl.split_kv(kv, axis=9),
        lambda: impl.merge_kv(key, value[:, :3]),
        lambda: impl.merge_kv(key, value.astype(np.float16)),
        lambda: impl.merge_kv(key, value, axis=6),
    ):
        with pytest.raises(KernelError):
            bad()


@settings(max_examples=100, deadline=None)
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=5, min_side=0, max_side=5),
    dtype=st.sampled_from([np.uint8, np.float16, np.float32, np.int64, "V5"]),
    data=st.data(),
)
def test_native_layouts_equal_twin(shape: tuple[int, ...], dtype: object, data: st.DataObject) -> None:
    native = native_or_skip()
    twin = meshd_native.twin
    itemsize = np.dtype(dtype).itemsize  # type: ignore[call-overload]
    size = int(np.prod(shape)) * itemsize
    x = np.frombuffer(data.draw(st.binary(min_size=size, max_size=size)), dtype=dtype).reshape(shape)
    axes = tuple(data.draw(st.permutations(range(len(shape)))))
    a = native.permute(x, axes)
    assert a.tobytes() == twin.permute(x, axes).tobytes() == np.ascontiguousarray(x.transpose(axes)).tobytes()
    axis = data.draw(st.integers(0, len(shape)))
    merged = native.merge_kv(x, x[::-1] if x.ndim else x, axis)
    assert merged.tobytes() == twin.merge_kv(x, x[::-1], axis).tobytes()
    parts = native.split_kv(merged, axis)
    assert parts[0].tobytes() == x.tobytes()

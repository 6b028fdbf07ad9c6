"""Pure numpy KV kernels: the bit-exact twin of ``_kv.pyx``.

Same entry points and contracts as the compiled module; ``kv.py`` validates
arguments before either is called. Where numpy's own behaviour is
platform-defined (NaN payloads through float16 casts, float->int casts of
NaN/inf) the twin pins it down explicitly, to the rule the C code follows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import KernelError

__all__ = [
    "convert",
    "copy",
    "dequantize_q4_0",
    "dequantize_q8_0",
    "features",
    "quantize_q4_0",
    "quantize_q8_0",
]

_F32, _F16, _BF16 = 1, 2, 3
_STORAGE = {_F32: np.dtype(np.float32), _F16: np.dtype(np.float16), _BF16: np.dtype(np.uint16)}


def features() -> dict[str, bool]:
    return {}


def _contig(a: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray would turn 0-d arrays into 1-d ones
    return a if a.flags.c_contiguous else a.copy(order="C")


def _f16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """fp16 bit patterns -> float32, NaNs quieted (as F16C does)."""
    out = bits.view(np.float16).astype(np.float32)
    raw = out.view(np.uint32)
    nan = (raw & 0x7FFFFFFF) > 0x7F800000
    raw[nan] |= np.uint32(0x00400000)
    return out


def _f32_to_f16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> fp16 bit patterns, round to nearest even, NaNs quieted."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = values.astype(np.float16).view(np.uint16)
    raw = _contig(values).view(np.uint32)
    nan = (raw & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        bits = raw[nan]
        out[nan] = (((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x3FF)).astype(np.uint16)
    return out


def _to_f32(src: np.ndarray, code: int) -> np.ndarray:
    if code == _F32:
        return np.array(src, dtype=np.float32)
    if code == _F16:
        return _f16_bits_to_f32(_contig(src).view(np.uint16))
    return (src.astype(np.uint32) << 16).view(np.float32)


def _from_f32(values: np.ndarray, code: int) -> np.ndarray:
    if code == _F32:
        return values
    if code == _F16:
        return _f32_to_f16_bits(values).view(np.float16)
    # ggml_compute_fp32_to_bf16: NaN -> quiet NaN, else round to nearest even
    raw = _contig(values).view(np.uint32)
    nan = (raw & 0x7FFFFFFF) > 0x7F800000
    with np.errstate(over="ignore"):
        rounded = (raw + (0x7FFF + ((raw >> 16) & 1))) >> 16
    return np.where(nan, (raw >> 16) | 64, rounded).astype(np.uint16)


def convert(src: Any, dst: Any, src_code: int, dst_code: int) -> None:
    """Convert ``src`` into ``dst`` (same shape, any strides) between F32/F16/BF16."""
    if src_code == dst_code or src_code not in _STORAGE or dst_code not in _STORAGE:
        raise KernelError(f"unsupported conversion {src_code} -> {dst_code}")
    if src.shape != dst.shape:
        raise KernelError("source and destination differ in shape")
    if src.dtype.itemsize != _STORAGE[src_code].itemsize or (
        dst.dtype.itemsize != _STORAGE[dst_code].itemsize
    ):
        raise KernelError("buffer itemsize does not match the dtype")
    if src.size == 0:
        return
    result = _from_f32(_to_f32(src, src_code), dst_code)
    np.copyto(dst, result.view(dst.dtype), casting="no")


def copy(src: Any, dst: Any) -> None:
    """Copy ``src`` into ``dst``: same shape and itemsize, any strides."""
    if src.shape != dst.shape:
        raise KernelError("source and destination differ in shape")
    if src.dtype.itemsize != dst.dtype.itemsize:
        raise KernelError("source and destination differ in itemsize")
    np.copyto(dst, src.view(dst.dtype) if src.dtype != dst.dtype else src, casting="no")


def _block_views(
    src: Any, dst: Any, in_block: int, out_block: int
) -> tuple[np.ndarray, np.ndarray]:
    s = np.frombuffer(src, dtype=np.uint8)
    d = np.frombuffer(dst, dtype=np.uint8)
    if s.size % in_block or d.size != s.size // in_block * out_block:
        raise KernelError("buffer sizes are not matching whole blocks")
    if not d.flags.writeable:
        raise KernelError("destination buffer is read-only")
    return s.reshape(-1, in_block), d.reshape(-1, out_block)


def _store_scale(out: np.ndarray, scale: np.ndarray, nan_blocks: np.ndarray) -> None:
    bits = _f32_to_f16_bits(scale)
    bits[nan_blocks] = 0x7E00
    out[:, :2] = bits.astype("<u2").view(np.uint8).reshape(-1, 2)


def _load_scale(blocks: np.ndarray) -> np.ndarray:
    return _f16_bits_to_f32(np.ascontiguousarray(blocks[:, :2]).view("<u2").reshape(-1))


def quantize_q8_0(src: Any, dst: Any) -> None:
    """Quantize contiguous float32 ``src`` into q8_0 blocks in ``dst`` (gguf.quants.Q8_0)."""
    s, d = _block_views(src, dst, 128, 34)
    x = s.view(np.float32)
    with np.errstate(all="ignore"):
        nan_blocks = np.isnan(x).any(axis=1)
        scale = np.abs(x).max(axis=1, initial=np.float32(0)) / np.float32(127)
        inv = np.where(scale == 0, np.float32(0), np.float32(1) / scale)
        v = x * inv[:, None]
        a = np.abs(v)
        ok = a < np.float32(2147483648.0)
        a = np.where(ok, a, np.float32(0))
        floor = np.floor(a)
        # gguf's np_roundf: halves round away from zero
        r = (floor + np.floor(np.float32(2) * (a - floor))).astype(np.int64)
    q = np.where(v < 0, -r, r)
    q[nan_blocks] = 0
    d[:, 2:] = (q & 0xFF).astype(np.uint8)
    _store_scale(d, scale, nan_blocks)


def dequantize_q8_0(src: Any, dst: Any) -> None:
    """Dequantize contiguous q8_0 blocks in ``src`` into float32 ``dst``."""
    s, d = _block_views(src, dst, 34, 128)
    x = s[:, 2:].view(np.int8).astype(np.float32)
    with np.errstate(all="ignore"):
        d.view(np.float32)[:] = x * _load_scale(s)[:, None]


def _q4_nibbles(x: np.ndarray, inv: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        v = x * inv[:, None] + np.float32(8.5)
        ok = (v > np.float32(-2147483648.0)) & (v < np.float32(2147483648.0))
        t = np.trunc(np.where(ok, v, np.float32(0))).astype(np.int64) & 0xFF
    return np.minimum(t, 15).astype(np.uint8)


def quantize_q4_0(src: Any, dst: Any) -> None:
    """Quantize contiguous float32 ``src`` into q4_0 blocks in ``dst`` (gguf.quants.Q4_0)."""
    s, d = _block_views(src, dst, 128, 18)
    x = s.view(np.float32)
    with np.errstate(all="ignore"):
        nan_blocks = np.isnan(x).any(axis=1)
        first_max = np.abs(x).argmax(axis=1) if x.size else np.zeros(0, np.intp)
        mx = x[np.arange(x.shape[0]), first_max]
        scale = mx / np.float32(-8)
        inv = np.where(scale == 0, np.float32(0), np.float32(1) / scale)
    q = _q4_nibbles(x, inv)
    q[nan_blocks] = 0
    d[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    _store_scale(d, scale, nan_blocks)


def dequantize_q4_0(src: Any, dst: Any) -> None:
    """Dequantize contiguous q4_0 blocks in ``src`` into float32 ``dst``."""
    s, d = _block_views(src, dst, 18, 128)
    qs = s[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)
    with np.errstate(all="ignore"):
        d.view(np.float32)[:] = _load_scale(s)[:, None] * q.astype(np.float32)

"""KV-cache conversion, quantization and layout transforms over either kernel set.

This layer owns argument checking and output allocation, so the compiled and
twin kernels only ever see arrays they can process and the two behave
identically on bad input (``KernelError``). Outputs are new C-contiguous
arrays unless ``out`` is given.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .errors import KernelError
from .spec import QUANT_BLOCKS, DType, QuantFormat

__all__ = [
    "KVKernels",
    "convert",
    "dequantize",
    "merge_kv",
    "permute",
    "quantize",
    "split_kv",
    "swap_token_head",
]

# numpy storage of the convertible dtypes; bf16 values are uint16 bit patterns.
FLOAT_STORAGE: dict[DType, np.dtype[Any]] = {
    DType.F32: np.dtype(np.float32),
    DType.F16: np.dtype(np.float16),
    DType.BF16: np.dtype(np.uint16),
}


class KVKernels(Protocol):
    """What ``_kv`` (compiled) and ``_twin_kv`` both provide."""

    def convert(self, src: Any, dst: Any, src_code: int, dst_code: int) -> None: ...
    def copy(self, src: Any, dst: Any) -> None: ...
    def quantize_q8_0(self, src: Any, dst: Any) -> None: ...
    def dequantize_q8_0(self, src: Any, dst: Any) -> None: ...
    def quantize_q4_0(self, src: Any, dst: Any) -> None: ...
    def dequantize_q4_0(self, src: Any, dst: Any) -> None: ...
    def features(self) -> dict[str, bool]: ...


def _float_dtype(value: Any) -> DType:
    try:
        dtype = DType(value)
    except ValueError as exc:
        raise KernelError(f"unknown dtype {value!r}") from exc
    if dtype not in FLOAT_STORAGE:
        raise KernelError(f"{dtype.name} is not one of F32, F16, BF16")
    return dtype


def _array(src: Any, storage: np.dtype[Any], what: str) -> np.ndarray:
    arr = np.asarray(src)
    if arr.dtype != storage:
        raise KernelError(f"{what} must be a {storage} array, got {arr.dtype}")
    return arr


def _out(out: Any, shape: tuple[int, ...], storage: np.dtype[Any], src: np.ndarray) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=storage)
    if not isinstance(out, np.ndarray):
        raise KernelError("out must be a numpy array")
    if out.dtype != storage or out.shape != shape:
        raise KernelError(f"out must be {storage} with shape {shape}")
    if not out.flags.writeable:
        raise KernelError("out is read-only")
    if np.may_share_memory(out, src):
        raise KernelError("out must not overlap the source")
    return out


def convert(
    k: KVKernels, src: Any, src_dtype: DType, dst_dtype: DType, *, out: Any = None
) -> np.ndarray:
    """Convert between F32, F16 and BF16 (round to nearest even), any strides in and out.

    F16 arrays are numpy float16; BF16 arrays are uint16 bit patterns. NaNs
    stay NaN (quieted, top payload bits kept, as F16C and ggml do).
    """
    s_type, d_type = _float_dtype(src_dtype), _float_dtype(dst_dtype)
    arr = _array(src, FLOAT_STORAGE[s_type], "src")
    result = _out(out, arr.shape, FLOAT_STORAGE[d_type], arr)
    if arr.size:
        if s_type == d_type:
            k.copy(arr, result)
        else:
            k.convert(arr, result, int(s_type), int(d_type))
    return result


def _quant_format(fmt: Any) -> tuple[QuantFormat, int, int]:
    try:
        qformat = QuantFormat(fmt)
    except ValueError as exc:
        raise KernelError(f"unknown quantization format {fmt!r}") from exc
    if qformat not in QUANT_BLOCKS:
        raise KernelError(f"{qformat.name} is not a block quantization")
    block, block_bytes = QUANT_BLOCKS[qformat]
    return qformat, block, block_bytes


def quantize(
    k: KVKernels, src: Any, fmt: QuantFormat, *, src_dtype: DType | None = None
) -> np.ndarray:
    """ggml block-quantize along the last axis; bit-exact with ``gguf.quants``.

    ``src`` is float32/float16/float64 (or BF16 bits with ``src_dtype=DType.BF16``)
    whose last dimension is a multiple of 32. Returns uint8 blocks shaped
    ``(*shape[:-1], shape[-1] // 32 * block_bytes)``, as gguf does.
    """
    qformat, block, block_bytes = _quant_format(fmt)
    if src_dtype is not None and _float_dtype(src_dtype) != DType.F32:
        values = convert(k, src, src_dtype, DType.F32)
    else:
        arr = np.asarray(src)
        if arr.dtype == np.float16:
            values = convert(k, arr, DType.F16, DType.F32)
        elif arr.dtype in (np.float32, np.float64):
            values = arr.astype(np.float32, order="C", copy=False)
        else:
            raise KernelError(f"cannot quantize {arr.dtype} values")
    if values.ndim == 0 or values.shape[-1] % block:
        raise KernelError(f"last dimension must be a multiple of {block}, shape {values.shape}")
    values = np.ascontiguousarray(values)
    out = np.empty((*values.shape[:-1], values.shape[-1] // block * block_bytes), np.uint8)
    kernel = k.quantize_q8_0 if qformat == QuantFormat.Q8_0 else k.quantize_q4_0
    kernel(values.reshape(-1), out.reshape(-1))
    return out


def dequantize(k: KVKernels, blocks: Any, fmt: QuantFormat) -> np.ndarray:
    """Expand ggml blocks (uint8, last axis a whole number of blocks) to float32."""
    qformat, block, block_bytes = _quant_format(fmt)
    arr = _array(blocks, np.dtype(np.uint8), "blocks")
    if arr.ndim == 0 or arr.shape[-1] % block_bytes:
        raise KernelError(f"last dimension must be a multiple of {block_bytes} bytes")
    arr = np.ascontiguousarray(arr)
    out = np.empty((*arr.shape[:-1], arr.shape[-1] // block_bytes * block), np.float32)
    kernel = k.dequantize_q8_0 if qformat == QuantFormat.Q8_0 else k.dequantize_q4_0
    kernel(arr.reshape(-1), out.reshape(-1))
    return out


def permute(k: KVKernels, src: Any, axes: tuple[int, ...], *, out: Any = None) -> np.ndarray:
    """Materialize ``src.transpose(axes)`` as a C-contiguous array (any dtype)."""
    arr = np.asarray(src)
    if arr.dtype.hasobject:
        raise KernelError("object arrays cannot be permuted by the kernels")
    try:
        view = arr.transpose(axes)
    except ValueError as exc:
        raise KernelError(f"bad axes {axes} for {arr.ndim} dimensions") from exc
    result = _out(out, view.shape, arr.dtype, arr)
    if view.size:
        k.copy(view, result)
    return result


def swap_token_head(k: KVKernels, kv: Any) -> np.ndarray:
    """[layer, token, head, dim] <-> [layer, head, token, dim] (its own inverse)."""
    arr = np.asarray(kv)
    if arr.ndim != 4:
        raise KernelError(f"expected a 4-d KV tensor, got {arr.ndim} dimensions")
    return permute(k, arr, (0, 2, 1, 3))


def _kv_index(ndim: int, axis: int, which: int) -> tuple[Any, ...]:
    return (slice(None),) * axis + (which,) + (slice(None),) * (ndim - axis - 1)


def split_kv(k: KVKernels, kv: Any, axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Split a merged cache (size 2 along ``axis``: K then V) into contiguous K and V."""
    arr = np.asarray(kv)
    if arr.dtype.hasobject or not 0 <= axis < arr.ndim or arr.shape[axis] != 2:
        raise KernelError(f"axis {axis} of shape {arr.shape} is not a K/V pair")
    parts = []
    for which in (0, 1):
        view = arr[_kv_index(arr.ndim, axis, which)]
        part = np.empty(view.shape, dtype=arr.dtype)
        if view.size:
            k.copy(view, part)
        parts.append(part)
    return parts[0], parts[1]


def merge_kv(k: KVKernels, key: Any, value: Any, axis: int = 1) -> np.ndarray:
    """Stack K and V into one contiguous cache with a new size-2 ``axis``."""
    karr, varr = np.asarray(key), np.asarray(value)
    if karr.shape != varr.shape or karr.dtype != varr.dtype or karr.dtype.hasobject:
        raise KernelError("K and V must have the same shape and dtype")
    if not 0 <= axis <= karr.ndim:
        raise KernelError(f"axis {axis} out of range for {karr.ndim} dimensions")
    out = np.empty((*karr.shape[:axis], 2, *karr.shape[axis:]), dtype=karr.dtype)
    for which, part in ((0, karr), (1, varr)):
        if part.size:
            k.copy(part, out[_kv_index(out.ndim, axis, which)])
    return out

"""Pure-Python/numpy framing kernels: the bit-exact twin of ``_framing.pyx``.

CRC32C is inherently serial, so the twin splits long inputs into many
equal-length lanes, runs the table-driven CRC over all lanes at once with
numpy, and folds the lane registers together with the GF(2) "append zeros"
operator. Header encode/decode mirror the compiled checks one for one, in the
same order, so both implementations reject a given input with the same reason.
"""

from __future__ import annotations

import functools
import operator
import struct
from typing import Any

import numpy as np

from .errors import KernelError, envelope_error
from .spec import (
    FIXED_HEADER_SIZE,
    MAGIC,
    QUANT_BLOCKS,
    QUANTIZABLE,
    VERSION,
    DType,
    EnvelopeHeader,
    Kind,
    Layout,
    Limits,
    QuantDescriptor,
    QuantFormat,
    TensorSpec,
    header_size,
    itemsize,
)

__all__ = ["crc32c", "crc32c_copy", "decode_header", "encode_header", "features"]

_POLY = 0x82F63B78
_MASK = 0xFFFFFFFF
_LANE = 1024  # bytes per lane; fixed so the fold operators are computed once
_SMALL = 8 * _LANE  # below this a plain Python loop is faster than numpy


def _make_tables() -> np.ndarray:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        table.append(crc)
    tables = [table]
    for _ in range(3):
        prev = tables[-1]
        tables.append([(prev[n] >> 8) ^ table[prev[n] & 0xFF] for n in range(256)])
    return np.array(tables, dtype=np.uint32)


_TABLES = _make_tables()
_T0 = [int(v) for v in _TABLES[0]]


def features() -> dict[str, bool]:
    return {}


def byte_view(data: Any) -> memoryview:
    """A flat unsigned-byte view of a C-contiguous buffer (what the compiled kernels accept)."""
    try:
        view = memoryview(data)
    except TypeError as exc:
        raise KernelError(f"expected a buffer, got {type(data).__name__}") from exc
    if not view.c_contiguous:
        raise KernelError("buffer must be C-contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _crc_small(reg: int, data: memoryview | bytes) -> int:
    table = _T0
    for byte in bytes(data):
        reg = table[(reg ^ byte) & 0xFF] ^ (reg >> 8)
    return reg


# --- GF(2) operators: 32 column images of a linear map on the CRC register ---


def _apply(op: tuple[int, ...], vec: int) -> int:
    out = 0
    bit = 0
    while vec:
        if vec & 1:
            out ^= op[bit]
        vec >>= 1
        bit += 1
    return out


def _compose(outer: tuple[int, ...], inner: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_apply(outer, col) for col in inner)


@functools.lru_cache(maxsize=64)
def _zeros_op(nbytes: int) -> tuple[int, ...]:
    """Operator advancing a register over ``nbytes`` zero bytes."""
    if nbytes == 1:
        return tuple(_T0[(1 << i) & 0xFF] ^ ((1 << i) >> 8) for i in range(32))
    half = _zeros_op(nbytes // 2)
    op = _compose(half, half)
    return _compose(_zeros_op(1), op) if nbytes % 2 else op


@functools.lru_cache(maxsize=64)
def _zeros_tables(nbytes: int) -> np.ndarray:
    """The operator as 4 byte-indexed tables, to apply it to many registers at once."""
    op = _zeros_op(nbytes)
    return np.array(
        [[_apply(op, v << (8 * k)) for v in range(256)] for k in range(4)], dtype=np.uint32
    )


def _shift(tables: np.ndarray, regs: np.ndarray) -> np.ndarray:
    return (
        tables[0][regs & 0xFF]
        ^ tables[1][(regs >> 8) & 0xFF]
        ^ tables[2][(regs >> 16) & 0xFF]
        ^ tables[3][regs >> 24]
    )


def _crc_lanes(reg: int, data: np.ndarray) -> int:
    lanes = data.size // _LANE
    body = data[: lanes * _LANE].view("<u4").reshape(lanes, _LANE // 4)
    columns = np.ascontiguousarray(body.T)  # one row per step, lanes side by side
    # Zero-data lanes in front leave the fold unchanged; pad to a power of two.
    padded = 1 << (lanes - 1).bit_length()
    regs = np.zeros(padded, dtype=np.uint32)
    first = padded - lanes
    regs[first] = reg
    t0, t1, t2, t3 = _TABLES
    work = regs[first:]
    for step in range(_LANE // 4):
        x = work ^ columns[step]
        work = t3[x & 0xFF] ^ t2[(x >> 8) & 0xFF] ^ t1[(x >> 16) & 0xFF] ^ t0[x >> 24]
    regs[first:] = work
    span = _LANE
    while regs.size > 1:
        regs = _shift(_zeros_tables(span), regs[0::2]) ^ regs[1::2]
        span *= 2
    return _crc_small(int(regs[0]), data[lanes * _LANE :].tobytes())


def _raw_crc(reg: int, view: memoryview) -> int:
    if len(view) < _SMALL:
        return _crc_small(reg, view)
    return _crc_lanes(reg, np.frombuffer(view, dtype=np.uint8))


def _check_value(value: Any) -> int:
    value = operator.index(value)
    if not 0 <= value <= _MASK:
        raise KernelError("crc32c value must fit in 32 bits")
    return value


def crc32c(data: Any, value: int = 0) -> int:
    """CRC32C (Castagnoli) of ``data``, continuing from the CRC ``value``."""
    view = byte_view(data)
    return _raw_crc(_check_value(value) ^ _MASK, view) ^ _MASK


def crc32c_copy(dst: Any, src: Any, value: int = 0) -> int:
    """Copy ``src`` into the start of ``dst`` and return the CRC32C of ``src``."""
    s = byte_view(src)
    d = byte_view(dst)
    value = _check_value(value)
    if d.readonly:
        raise KernelError("destination buffer is read-only")
    if len(d) < len(s):
        raise KernelError("destination buffer is smaller than the source")
    d[: len(s)] = s
    return _raw_crc(value ^ _MASK, s) ^ _MASK


# --- header encode/decode ---

_FIXED = struct.Struct("<4sBBBBBBHIQQIIQQQII")
_KINDS = {int(m): m for m in Kind}
_DTYPES = {int(m): m for m in DType}
_LAYOUTS = {int(m): m for m in Layout}
_QFORMATS = {int(m): m for m in QuantFormat}


def _check(
    kind: int,
    dtype: int,
    layout: int,
    qformat: int,
    qblock: int,
    layout_block: int,
    shape: tuple[int, ...],
    chunk_index: int,
    chunk_count: int,
    chunk_offset: int,
    total_length: int,
    payload_length: int,
    reserved: int,
    limits: Limits,
) -> None:
    """Field validation; same checks in the same order as ``_framing.pyx``."""
    if reserved != 0:
        raise envelope_error("reserved_nonzero")
    if kind not in _KINDS:
        raise envelope_error("bad_kind", str(kind))
    if dtype not in _DTYPES:
        raise envelope_error("bad_dtype", str(dtype))
    if layout not in _LAYOUTS:
        raise envelope_error("bad_layout", str(layout))
    if qformat not in _QFORMATS:
        raise envelope_error("bad_quant_format", str(qformat))
    if (layout == Layout.BLOCKED) != (layout_block != 0):
        raise envelope_error("bad_layout_block")
    if qformat == QuantFormat.NONE:
        if qblock != 0:
            raise envelope_error("bad_quant_block")
    else:
        if qblock != QUANT_BLOCKS[QuantFormat(qformat)][0]:
            raise envelope_error("bad_quant_block")
        if dtype not in QUANTIZABLE:
            raise envelope_error("bad_quant_dtype")
        if layout != Layout.ROW_MAJOR:
            raise envelope_error("bad_quant_layout")
        if not shape or shape[-1] % qblock:
            raise envelope_error("bad_quant_shape")
    for dim in shape:
        if dim > limits.max_dim:
            raise envelope_error("dim_too_large", str(dim))
    elements = 1
    for dim in shape:
        elements *= dim
    if qformat == QuantFormat.NONE:
        nbytes = elements * itemsize(DType(dtype))
    else:
        nbytes = elements // qblock * QUANT_BLOCKS[QuantFormat(qformat)][1]
    if nbytes > limits.max_tensor_bytes:
        raise envelope_error("tensor_too_large", str(nbytes))
    if total_length != nbytes:
        raise envelope_error("bad_total_length", f"{total_length} != {nbytes}")
    if chunk_count == 0:
        raise envelope_error("bad_chunk_count")
    if chunk_count > limits.max_chunks:
        raise envelope_error("too_many_chunks", str(chunk_count))
    if chunk_index >= chunk_count:
        raise envelope_error("bad_chunk_index")
    if payload_length > limits.max_payload_length:
        raise envelope_error("payload_too_large", str(payload_length))
    if payload_length > total_length or chunk_offset > total_length - payload_length:
        raise envelope_error("bad_chunk_range")


def _uint(value: Any, bits: int, name: str) -> int:
    value = operator.index(value)
    if not 0 <= value < 1 << bits:
        raise envelope_error("field_out_of_range", name)
    return value


def encode_header(header: EnvelopeHeader, limits: Limits) -> bytes:
    """Validate ``header`` exactly as the decoder will, then serialize it."""
    spec = header.spec
    tensor_id = _uint(spec.tensor_id, 64, "tensor_id")
    kind = _uint(spec.kind, 8, "kind")
    dtype = _uint(spec.dtype, 8, "dtype")
    layout = _uint(spec.layout, 8, "layout")
    qformat = _uint(spec.quant.format, 8, "quant.format")
    qblock = _uint(spec.quant.block_size, 16, "quant.block_size")
    layout_block = _uint(spec.layout_block, 32, "layout_block")
    sequence = _uint(spec.sequence, 64, "sequence")
    chunk_index = _uint(header.chunk_index, 32, "chunk_index")
    chunk_count = _uint(header.chunk_count, 32, "chunk_count")
    chunk_offset = _uint(header.chunk_offset, 64, "chunk_offset")
    total_length = _uint(header.total_length, 64, "total_length")
    payload_length = _uint(header.payload_length, 64, "payload_length")
    payload_crc = _uint(header.payload_crc32c, 32, "payload_crc32c")
    shape = tuple(_uint(dim, 64, "shape") for dim in spec.shape)
    ndim = len(shape)
    if ndim > limits.max_ndim:
        raise envelope_error("too_many_dims", str(ndim))
    _check(
        kind, dtype, layout, qformat, qblock, layout_block, shape, chunk_index,
        chunk_count, chunk_offset, total_length, payload_length, 0, limits,
    )  # fmt: skip
    out = bytearray(header_size(ndim))
    _FIXED.pack_into(
        out, 0, MAGIC, VERSION, kind, dtype, layout, ndim, qformat, qblock, layout_block,
        tensor_id, sequence, chunk_index, chunk_count, chunk_offset, total_length,
        payload_length, payload_crc, 0,
    )  # fmt: skip
    struct.pack_into(f"<{ndim}Q", out, FIXED_HEADER_SIZE, *shape)
    struct.pack_into("<I", out, len(out) - 4, crc32c(memoryview(out)[:-4]))
    return bytes(out)


def decode_header(data: Any, limits: Limits) -> EnvelopeHeader:
    """Parse and validate the header at the start of ``data`` (payload not checked)."""
    view = byte_view(data)
    if len(view) < FIXED_HEADER_SIZE:
        raise envelope_error("short_header", f"{len(view)} bytes")
    (
        magic, version, kind, dtype, layout, ndim, qformat, qblock, layout_block, tensor_id,
        sequence, chunk_index, chunk_count, chunk_offset, total_length, payload_length,
        payload_crc, reserved,
    ) = _FIXED.unpack_from(view, 0)  # fmt: skip
    if magic != MAGIC:
        raise envelope_error("bad_magic")
    if version != VERSION:
        raise envelope_error("bad_version", str(version))
    if ndim > limits.max_ndim:
        raise envelope_error("too_many_dims", str(ndim))
    size = header_size(ndim)
    if len(view) < size:
        raise envelope_error("short_header", f"{len(view)} < {size} bytes")
    shape = struct.unpack_from(f"<{ndim}Q", view, FIXED_HEADER_SIZE)
    (stored,) = struct.unpack_from("<I", view, size - 4)
    if crc32c(view[: size - 4]) != stored:
        raise envelope_error("header_checksum")
    _check(
        kind, dtype, layout, qformat, qblock, layout_block, shape, chunk_index,
        chunk_count, chunk_offset, total_length, payload_length, reserved, limits,
    )  # fmt: skip
    spec = TensorSpec(
        tensor_id,
        _KINDS[kind],
        _DTYPES[dtype],
        shape,
        _LAYOUTS[layout],
        layout_block,
        QuantDescriptor(_QFORMATS[qformat], qblock),
        sequence,
    )
    return EnvelopeHeader(
        spec, chunk_index, chunk_count, chunk_offset, total_length, payload_length, payload_crc
    )

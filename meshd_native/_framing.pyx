# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled envelope header encode/decode (plus the CRC32C kernels of ``_crc``).

The header checks mirror ``_twin_framing.py`` one for one, in the same order,
so both implementations reject a given input with the same reason.
"""

import operator

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memset
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.pycapsule cimport PyCapsule_GetPointer

from . import _crc
from ._crc import crc32c, crc32c_copy, crc32c_paths, crc32c_with_path
from .errors import KernelError, envelope_error
from .spec import (
    QUANT_BLOCKS, QUANTIZABLE, DType, EnvelopeHeader, Kind, Layout, QuantDescriptor,
    QuantFormat, TensorSpec, itemsize,
)

ctypedef uint32_t (*crc_fn_t)(uint32_t crc, const void *buf, size_t len) noexcept nogil
cdef crc_fn_t mt_crc32c = <crc_fn_t>PyCapsule_GetPointer(
    _crc.CRC32C_CAPSULE, b"meshd_native._crc.crc32c")


def features():
    """Which hardware paths this build selected at import."""
    return _crc.features()


cdef int _acquire(object obj, Py_buffer *view, int flags) except -1:
    try:
        PyObject_GetBuffer(obj, view, flags)
    except (BufferError, TypeError, ValueError) as exc:
        raise KernelError(f"expected a C-contiguous buffer: {exc}") from exc
    return 0

cdef enum:
    FIXED = 72
    NDIM_CAP = 16
    VERSION = 1

cdef bytes MAGIC = b"MTNS"
cdef dict _KINDS = {int(m): m for m in Kind}
cdef dict _DTYPES = {int(m): m for m in DType}
cdef dict _LAYOUTS = {int(m): m for m in Layout}
cdef dict _QFORMATS = {int(m): m for m in QuantFormat}
# dtype value -> itemsize; quant format -> (block elements, block bytes)
cdef dict _ITEMSIZE = {int(m): itemsize(m) for m in DType}
cdef dict _QBLOCKS = {int(f): blocks for f, blocks in QUANT_BLOCKS.items()}
cdef frozenset _QUANTIZABLE = frozenset(int(d) for d in QUANTIZABLE)
cdef int ROW_MAJOR = Layout.ROW_MAJOR
cdef int BLOCKED = Layout.BLOCKED


cdef struct Fields:
    uint64_t tensor_id, sequence, chunk_offset, total_length, payload_length
    uint32_t layout_block, chunk_index, chunk_count, payload_crc, reserved
    uint16_t qblock
    uint8_t kind, dtype, layout, ndim, qformat
    uint64_t shape[NDIM_CAP]


cdef inline uint64_t _ld(const uint8_t *p, int n) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n - 1, -1, -1):
        v = (v << 8) | p[i]
    return v


cdef inline void _st(uint8_t *p, uint64_t v, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        p[i] = <uint8_t>(v & 0xFF)
        v >>= 8


cdef object _check(Fields *f, object limits):
    """Field validation; returns a reason name or None. Same order as the twin."""
    cdef uint64_t max_dim = limits.max_dim
    cdef uint64_t max_tensor = limits.max_tensor_bytes
    cdef uint64_t max_payload = limits.max_payload_length
    cdef uint64_t max_chunks = limits.max_chunks
    cdef uint64_t elements, bound, nbytes, block_bytes = 0, item = 0
    cdef int i, has_zero = 0
    if f.reserved != 0:
        return "reserved_nonzero"
    if f.kind not in _KINDS:
        return "bad_kind"
    if f.dtype not in _DTYPES:
        return "bad_dtype"
    if f.layout not in _LAYOUTS:
        return "bad_layout"
    if f.qformat not in _QFORMATS:
        return "bad_quant_format"
    if (f.layout == BLOCKED) != (f.layout_block != 0):
        return "bad_layout_block"
    if f.qformat == 0:
        if f.qblock != 0:
            return "bad_quant_block"
        item = _ITEMSIZE[f.dtype]
    else:
        block, block_bytes = _QBLOCKS[f.qformat]
        if f.qblock != block:
            return "bad_quant_block"
        if f.dtype not in _QUANTIZABLE:
            return "bad_quant_dtype"
        if f.layout != ROW_MAJOR:
            return "bad_quant_layout"
        if f.ndim == 0 or f.shape[f.ndim - 1] % f.qblock:
            return "bad_quant_shape"
    for i in range(f.ndim):
        if f.shape[i] > max_dim:
            return "dim_too_large"
        if f.shape[i] == 0:
            has_zero = 1
    # Exact "bytes > max_tensor" without overflow: every layout needs more
    # than half a byte per element, so more than 2*max+1 elements is too large.
    elements = 1
    if has_zero:
        elements = 0
    else:
        bound = 2 * max_tensor + 1
        for i in range(f.ndim):
            if elements > bound // f.shape[i]:
                return "tensor_too_large"
            elements *= f.shape[i]
    if f.qformat == 0:
        if elements > max_tensor // item:
            return "tensor_too_large"
        nbytes = elements * item
    else:
        if elements // f.qblock > max_tensor // block_bytes:
            return "tensor_too_large"
        nbytes = elements // f.qblock * block_bytes
    if f.total_length != nbytes:
        return "bad_total_length"
    if f.chunk_count == 0:
        return "bad_chunk_count"
    if f.chunk_count > max_chunks:
        return "too_many_chunks"
    if f.chunk_index >= f.chunk_count:
        return "bad_chunk_index"
    if f.payload_length > max_payload:
        return "payload_too_large"
    if f.payload_length > f.total_length or f.chunk_offset > f.total_length - f.payload_length:
        return "bad_chunk_range"
    return None


cdef uint64_t _uint(object value, int bits, str name) except? 0xFFFFFFFFFFFFFFFF:
    cdef object v = operator.index(value)
    if v < 0 or (v >> bits) != 0:  # Python ints: no C shift overflow at 64 bits
        raise envelope_error("field_out_of_range", name)
    return <uint64_t>v


def encode_header(header, limits):
    """Validate ``header`` exactly as the decoder will, then serialize it."""
    cdef Fields f
    cdef Py_ssize_t ndim, i, size
    cdef bytes out
    cdef uint8_t *p
    spec = header.spec
    memset(&f, 0, sizeof(Fields))
    f.tensor_id = _uint(spec.tensor_id, 64, "tensor_id")
    f.kind = <uint8_t>_uint(spec.kind, 8, "kind")
    f.dtype = <uint8_t>_uint(spec.dtype, 8, "dtype")
    f.layout = <uint8_t>_uint(spec.layout, 8, "layout")
    f.qformat = <uint8_t>_uint(spec.quant.format, 8, "quant.format")
    f.qblock = <uint16_t>_uint(spec.quant.block_size, 16, "quant.block_size")
    f.layout_block = <uint32_t>_uint(spec.layout_block, 32, "layout_block")
    f.sequence = _uint(spec.sequence, 64, "sequence")
    f.chunk_index = <uint32_t>_uint(header.chunk_index, 32, "chunk_index")
    f.chunk_count = <uint32_t>_uint(header.chunk_count, 32, "chunk_count")
    f.chunk_offset = _uint(header.chunk_offset, 64, "chunk_offset")
    f.total_length = _uint(header.total_length, 64, "total_length")
    f.payload_length = _uint(header.payload_length, 64, "payload_length")
    f.payload_crc = <uint32_t>_uint(header.payload_crc32c, 32, "payload_crc32c")
    shape = [_uint(dim, 64, "shape") for dim in spec.shape]
    ndim = len(shape)
    if ndim > limits.max_ndim:
        raise envelope_error("too_many_dims", str(ndim))
    f.ndim = <uint8_t>ndim
    for i in range(ndim):
        f.shape[i] = shape[i]
    reason = _check(&f, limits)
    if reason is not None:
        raise envelope_error(reason)
    size = FIXED + 8 * ndim + 4
    out = PyBytes_FromStringAndSize(NULL, size)
    p = <uint8_t *>PyBytes_AS_STRING(out)
    p[0] = 0x4D; p[1] = 0x54; p[2] = 0x4E; p[3] = 0x53
    p[4] = VERSION
    p[5] = f.kind; p[6] = f.dtype; p[7] = f.layout; p[8] = f.ndim; p[9] = f.qformat
    _st(p + 10, f.qblock, 2)
    _st(p + 12, f.layout_block, 4)
    _st(p + 16, f.tensor_id, 8)
    _st(p + 24, f.sequence, 8)
    _st(p + 32, f.chunk_index, 4)
    _st(p + 36, f.chunk_count, 4)
    _st(p + 40, f.chunk_offset, 8)
    _st(p + 48, f.total_length, 8)
    _st(p + 56, f.payload_length, 8)
    _st(p + 64, f.payload_crc, 4)
    _st(p + 68, 0, 4)
    for i in range(ndim):
        _st(p + FIXED + 8 * i, f.shape[i], 8)
    _st(p + size - 4, mt_crc32c(0, p, <size_t>(size - 4)), 4)
    return out


def decode_header(data, limits):
    """Parse and validate the header at the start of ``data`` (payload not checked)."""
    cdef Py_buffer view
    cdef Fields f
    cdef const uint8_t *p
    cdef Py_ssize_t n, size, i
    _acquire(data, &view, PyBUF_SIMPLE)
    try:
        p = <const uint8_t *>view.buf
        n = view.len
        if n < FIXED:
            raise envelope_error("short_header", f"{n} bytes")
        if memcmp(p, <const char *>MAGIC, 4) != 0:
            raise envelope_error("bad_magic")
        if p[4] != VERSION:
            raise envelope_error("bad_version", str(p[4]))
        f.ndim = p[8]
        if f.ndim > limits.max_ndim:
            raise envelope_error("too_many_dims", str(f.ndim))
        size = FIXED + 8 * f.ndim + 4
        if n < size:
            raise envelope_error("short_header", f"{n} < {size} bytes")
        if mt_crc32c(0, p, <size_t>(size - 4)) != <uint32_t>_ld(p + size - 4, 4):
            raise envelope_error("header_checksum")
        f.kind = p[5]; f.dtype = p[6]; f.layout = p[7]; f.qformat = p[9]
        f.qblock = <uint16_t>_ld(p + 10, 2)
        f.layout_block = <uint32_t>_ld(p + 12, 4)
        f.tensor_id = _ld(p + 16, 8)
        f.sequence = _ld(p + 24, 8)
        f.chunk_index = <uint32_t>_ld(p + 32, 4)
        f.chunk_count = <uint32_t>_ld(p + 36, 4)
        f.chunk_offset = _ld(p + 40, 8)
        f.total_length = _ld(p + 48, 8)
        f.payload_length = _ld(p + 56, 8)
        f.payload_crc = <uint32_t>_ld(p + 64, 4)
        f.reserved = <uint32_t>_ld(p + 68, 4)
        for i in range(f.ndim):
            f.shape[i] = _ld(p + FIXED + 8 * i, 8)
    finally:
        PyBuffer_Release(&view)
    reason = _check(&f, limits)
    if reason is not None:
        raise envelope_error(reason)
    spec = TensorSpec(
        f.tensor_id,
        _KINDS[f.kind],
        _DTYPES[f.dtype],
        tuple([f.shape[i] for i in range(f.ndim)]),
        _LAYOUTS[f.layout],
        f.layout_block,
        QuantDescriptor(_QFORMATS[f.qformat], f.qblock),
        f.sequence,
    )
    return EnvelopeHeader(
        spec, f.chunk_index, f.chunk_count, f.chunk_offset, f.total_length,
        f.payload_length, f.payload_crc,
    )

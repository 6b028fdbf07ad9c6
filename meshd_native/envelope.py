"""Envelope encode/decode and chunking on top of either implementation's kernels.

Zero-copy by construction: payloads go in and come out as memoryviews over the
caller's buffers, and an encoded envelope is a separate header ``bytes`` plus
the payload view, ready for ``writelines``. The only copies are the ones the
caller asks for (``EncodedEnvelope.to_bytes``, ``encode_envelope_into``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ._twin_framing import byte_view
from .errors import KernelError, envelope_error
from .spec import (
    DEFAULT_LIMITS,
    MAGIC,
    QUANT_BLOCKS,
    VERSION,
    DType,
    EnvelopeHeader,
    Kind,
    Layout,
    Limits,
    QuantFormat,
    TensorSpec,
    header_size,
)

__all__ = [
    "DecodedEnvelope",
    "EncodedEnvelope",
    "FramingKernels",
    "as_byte_view",
    "decode_envelope",
    "encode_envelope",
    "encode_envelope_into",
    "peek_header_size",
    "spec_for_array",
    "split_tensor",
    "tensor_array",
]

# numpy storage for each dtype; BF16 has no numpy dtype and travels as uint16.
STORAGE: dict[DType, np.dtype[Any]] = {
    DType.F32: np.dtype("<f4"),
    DType.F16: np.dtype("<f2"),
    DType.BF16: np.dtype("<u2"),
    DType.F64: np.dtype("<f8"),
    DType.I8: np.dtype("i1"),
    DType.U8: np.dtype("u1"),
    DType.I16: np.dtype("<i2"),
    DType.U16: np.dtype("<u2"),
    DType.I32: np.dtype("<i4"),
    DType.U32: np.dtype("<u4"),
    DType.I64: np.dtype("<i8"),
    DType.U64: np.dtype("<u8"),
}
# uint16 maps to U16: bf16 arrays must be labelled explicitly.
_FROM_NUMPY = {dt.str: code for code, dt in STORAGE.items()}


class FramingKernels(Protocol):
    """What ``_framing`` (compiled) and ``_twin_framing`` both provide."""

    def crc32c(self, data: Any, value: int = 0) -> int: ...
    def crc32c_copy(self, dst: Any, src: Any, value: int = 0) -> int: ...
    def encode_header(self, header: EnvelopeHeader, limits: Limits) -> bytes: ...
    def decode_header(self, data: Any, limits: Limits) -> EnvelopeHeader: ...
    def features(self) -> dict[str, bool]: ...


@dataclass(frozen=True, slots=True, eq=False)
class EncodedEnvelope:
    """An envelope ready to send: header bytes plus a view of the payload."""

    header: EnvelopeHeader
    header_bytes: bytes
    payload: memoryview

    @property
    def nbytes(self) -> int:
        return len(self.header_bytes) + len(self.payload)

    def buffers(self) -> tuple[bytes, memoryview]:
        """The two pieces, for ``writelines`` or vectored sends, without copying."""
        return self.header_bytes, self.payload

    def to_bytes(self) -> bytes:
        """The whole envelope as one ``bytes`` (copies the payload)."""
        return b"".join((self.header_bytes, self.payload))


@dataclass(frozen=True, slots=True, eq=False)
class DecodedEnvelope:
    """A verified envelope: its header and a view of its payload in the input."""

    header: EnvelopeHeader
    payload: memoryview

    def array(self) -> np.ndarray:
        """Zero-copy array view of a single-chunk tensor (valid while the input is)."""
        if self.header.chunk_count != 1:
            raise KernelError("only a single-chunk envelope holds a whole tensor")
        return tensor_array(self.header.spec, self.payload)


def as_byte_view(data: Any) -> memoryview:
    """A flat unsigned-byte view of a contiguous buffer or array, without copying."""
    if isinstance(data, np.ndarray):
        if data.dtype.hasobject:
            raise KernelError("object arrays have no byte payload")
        if not data.flags.c_contiguous:
            if not data.flags.f_contiguous:
                raise KernelError("array payload must be C- or Fortran-contiguous")
            data = data.T  # same memory, now C-contiguous
        return memoryview(data.reshape(-1).view(np.uint8))
    return byte_view(data)


def spec_for_array(
    array: np.ndarray,
    *,
    tensor_id: int,
    kind: Kind,
    sequence: int = 0,
    dtype: DType | None = None,
) -> TensorSpec:
    """Describe a contiguous numpy array (pass ``dtype=DType.BF16`` for bf16 bits)."""
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        raise KernelError("payload elements must be little-endian")
    if dtype is None:
        key = array.dtype.newbyteorder("<").str if array.dtype.itemsize > 1 else array.dtype.str
        if key not in _FROM_NUMPY:
            raise KernelError(f"no envelope dtype for numpy {array.dtype}")
        dtype = _FROM_NUMPY[key]
    elif STORAGE[DType(dtype)].itemsize != array.dtype.itemsize:
        raise KernelError(f"{DType(dtype).name} does not match numpy {array.dtype}")
    if array.flags.c_contiguous:
        layout = Layout.ROW_MAJOR
    elif array.flags.f_contiguous:
        layout = Layout.COLUMN_MAJOR
    else:
        raise KernelError("array must be C- or Fortran-contiguous")
    return TensorSpec(tensor_id, kind, DType(dtype), tuple(array.shape), layout, sequence=sequence)


def tensor_array(spec: TensorSpec, payload: Any) -> np.ndarray:
    """Zero-copy numpy view of a whole tensor's payload bytes.

    Row- and column-major payloads take the spec's shape (in that order);
    blocked payloads stay flat; quantized payloads are ggml blocks shaped
    ``(*shape[:-1], row_bytes)``, ready for ``dequantize``.
    """
    raw = np.frombuffer(as_byte_view(payload), dtype=np.uint8)
    if len(raw) != spec.nbytes:
        raise KernelError(f"payload has {len(raw)} bytes, the spec needs {spec.nbytes}")
    fmt = QuantFormat(spec.quant.format)
    if fmt != QuantFormat.NONE:
        block, block_bytes = QUANT_BLOCKS[fmt]
        return raw.reshape((*spec.shape[:-1], spec.shape[-1] // block * block_bytes))
    values = raw.view(STORAGE[spec.dtype])
    if spec.layout == Layout.ROW_MAJOR:
        return values.reshape(spec.shape)
    if spec.layout == Layout.COLUMN_MAJOR:
        return values.reshape(spec.shape, order="F")
    return values


def peek_header_size(prefix: Any) -> int:
    """Header size announced by the first 9 bytes of an envelope (for stream readers).

    Checks magic and version only; ``decode_header`` does the full validation.
    """
    view = as_byte_view(prefix)
    if len(view) < 9:
        raise envelope_error("short_header", f"{len(view)} bytes")
    if bytes(view[:4]) != MAGIC:
        raise envelope_error("bad_magic")
    if view[4] != VERSION:
        raise envelope_error("bad_version", str(view[4]))
    return header_size(view[8])


def _header_for(
    spec: TensorSpec,
    payload: memoryview,
    crc: int,
    chunk_index: int,
    chunk_count: int,
    chunk_offset: int,
    total_length: int | None,
) -> EnvelopeHeader:
    return EnvelopeHeader(
        spec,
        chunk_index,
        chunk_count,
        chunk_offset,
        len(payload) if total_length is None else total_length,
        len(payload),
        crc,
    )


def encode_envelope(
    k: FramingKernels,
    spec: TensorSpec,
    payload: Any,
    *,
    chunk_index: int = 0,
    chunk_count: int = 1,
    chunk_offset: int = 0,
    total_length: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> EncodedEnvelope:
    """Checksum ``payload`` and build its header; the payload is not copied."""
    view = as_byte_view(payload)
    header = _header_for(
        spec, view, k.crc32c(view), chunk_index, chunk_count, chunk_offset, total_length
    )
    return EncodedEnvelope(header, k.encode_header(header, limits), view)


def encode_envelope_into(
    k: FramingKernels,
    out: Any,
    spec: TensorSpec,
    payload: Any,
    *,
    chunk_index: int = 0,
    chunk_count: int = 1,
    chunk_offset: int = 0,
    total_length: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> int:
    """Write header and payload into ``out`` (copy and checksum in one pass); returns bytes written."""
    view = as_byte_view(payload)
    dst = as_byte_view(out)
    if dst.readonly:
        raise KernelError("output buffer is read-only")
    size = header_size(len(spec.shape))
    if len(dst) < size + len(view):
        raise KernelError(f"output buffer needs {size + len(view)} bytes, has {len(dst)}")
    crc = k.crc32c_copy(dst[size:], view)
    header = _header_for(spec, view, crc, chunk_index, chunk_count, chunk_offset, total_length)
    dst[:size] = k.encode_header(header, limits)
    return size + len(view)


def decode_envelope(
    k: FramingKernels, data: Any, limits: Limits = DEFAULT_LIMITS
) -> DecodedEnvelope:
    """Verify one complete envelope; the payload is a view into ``data``."""
    view = as_byte_view(data)
    header = k.decode_header(view, limits)
    start = header.header_size
    end = start + header.payload_length
    if len(view) < end:
        raise envelope_error("short_payload", f"{len(view)} < {end} bytes")
    if len(view) > end:
        raise envelope_error("trailing_bytes", f"{len(view) - end} bytes")
    payload = view[start:end]
    if k.crc32c(payload) != header.payload_crc32c:
        raise envelope_error("payload_checksum")
    return DecodedEnvelope(header, payload)


def split_tensor(
    k: FramingKernels,
    spec: TensorSpec,
    payload: Any,
    chunk_size: int,
    limits: Limits = DEFAULT_LIMITS,
) -> Iterator[EncodedEnvelope]:
    """Chunk a tensor's payload into envelopes of at most ``chunk_size`` bytes.

    Arguments are checked now; each chunk is checksummed as it is drawn.
    """
    view = as_byte_view(payload)
    if chunk_size <= 0:
        raise KernelError("chunk_size must be positive")
    total = len(view)
    count = max(1, -(-total // chunk_size))
    if count > limits.max_chunks:
        raise envelope_error("too_many_chunks", f"{count} chunks of {chunk_size} bytes")
    # Validate the spec and sizes before the caller starts sending anything.
    first = view[:chunk_size]
    probe = _header_for(spec, first, 0, 0, count, 0, total)
    k.encode_header(probe, limits)
    return _chunks(k, spec, view, chunk_size, count, limits)


def _chunks(
    k: FramingKernels,
    spec: TensorSpec,
    view: memoryview,
    chunk_size: int,
    count: int,
    limits: Limits,
) -> Iterator[EncodedEnvelope]:
    total = len(view)
    for index in range(count):
        offset = index * chunk_size
        yield encode_envelope(
            k,
            spec,
            view[offset : offset + chunk_size],
            chunk_index=index,
            chunk_count=count,
            chunk_offset=offset,
            total_length=total,
            limits=limits,
        )

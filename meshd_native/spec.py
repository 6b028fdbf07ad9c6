"""Tensor envelope vocabulary shared by both implementations.

Wire layout of an envelope header (all integers little-endian)::

    offset size field
         0    4 magic b"MTNS"
         4    1 format version (1)
         5    1 kind            (Kind)
         6    1 dtype           (DType; the logical dtype when quantized)
         7    1 layout          (Layout)
         8    1 ndim            (<= Limits.max_ndim)
         9    1 quant format    (QuantFormat; ggml type ids)
        10    2 quant block size (elements per block; 0 when not quantized)
        12    4 layout block    (tile edge for BLOCKED layout, else 0)
        16    8 tensor id
        24    8 sequence
        32    4 chunk index
        36    4 chunk count
        40    8 chunk offset    (byte offset of this chunk in the tensor payload)
        48    8 total length    (bytes of the whole tensor payload)
        56    8 payload length  (bytes of this chunk)
        64    4 payload CRC32C
        68    4 reserved (0)
        72 8*ndim shape (u64 per dimension)
   72+8*ndim  4 header CRC32C over every preceding header byte

The payload follows the header directly. Element bytes are little-endian.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "DEFAULT_LIMITS",
    "FIXED_HEADER_SIZE",
    "MAGIC",
    "MAX_NDIM_CAP",
    "NO_QUANT",
    "Q4_0",
    "Q8_0",
    "QUANT_BLOCKS",
    "VERSION",
    "DType",
    "EnvelopeHeader",
    "Kind",
    "Layout",
    "Limits",
    "QuantDescriptor",
    "QuantFormat",
    "TensorSpec",
    "header_size",
    "itemsize",
    "tensor_nbytes",
]

MAGIC = b"MTNS"
VERSION = 1
FIXED_HEADER_SIZE = 72
# Hard ceiling for Limits.max_ndim; keeps decoders' shape scratch space fixed.
MAX_NDIM_CAP = 16


def header_size(ndim: int) -> int:
    """Bytes of an encoded header for a tensor of ``ndim`` dimensions."""
    return FIXED_HEADER_SIZE + 8 * ndim + 4


class Kind(IntEnum):
    """What the tensor is, so a receiver can route it without decoding it."""

    ACTIVATION = 1
    KV_BLOCK = 2
    EMBEDDING = 3
    RAW = 4


class DType(IntEnum):
    """Element type. BF16 travels as raw 16-bit patterns (numpy uint16 storage)."""

    F32 = 1
    F16 = 2
    BF16 = 3
    F64 = 4
    I8 = 5
    U8 = 6
    I16 = 7
    U16 = 8
    I32 = 9
    U32 = 10
    I64 = 11
    U64 = 12


_ITEMSIZE = {
    DType.F32: 4,
    DType.F16: 2,
    DType.BF16: 2,
    DType.F64: 8,
    DType.I8: 1,
    DType.U8: 1,
    DType.I16: 2,
    DType.U16: 2,
    DType.I32: 4,
    DType.U32: 4,
    DType.I64: 8,
    DType.U64: 8,
}


def itemsize(dtype: DType) -> int:
    """Bytes per element of an unquantized tensor of ``dtype``."""
    return _ITEMSIZE[DType(dtype)]


class Layout(IntEnum):
    """Memory order of the payload."""

    ROW_MAJOR = 1
    COLUMN_MAJOR = 2
    BLOCKED = 3


class QuantFormat(IntEnum):
    """Block quantization of the payload; values are ggml type ids."""

    NONE = 0
    Q4_0 = 2
    Q8_0 = 8


# format -> (elements per block, bytes per block), as in ggml.
QUANT_BLOCKS: dict[QuantFormat, tuple[int, int]] = {
    QuantFormat.Q4_0: (32, 18),
    QuantFormat.Q8_0: (32, 34),
}

# Dtypes a quantized tensor may declare as its dequantized (logical) type.
QUANTIZABLE = frozenset({DType.F32, DType.F16, DType.BF16})


@dataclass(frozen=True, slots=True)
class QuantDescriptor:
    """Quantization format and block size (elements per block)."""

    format: QuantFormat = QuantFormat.NONE
    block_size: int = 0


NO_QUANT = QuantDescriptor()
Q8_0 = QuantDescriptor(QuantFormat.Q8_0, 32)
Q4_0 = QuantDescriptor(QuantFormat.Q4_0, 32)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Everything that describes a whole tensor, identical in all its chunks."""

    tensor_id: int
    kind: Kind
    dtype: DType
    shape: tuple[int, ...]
    layout: Layout = Layout.ROW_MAJOR
    layout_block: int = 0
    quant: QuantDescriptor = NO_QUANT
    sequence: int = 0

    @property
    def nbytes(self) -> int:
        """Payload bytes of the whole tensor."""
        return tensor_nbytes(self)


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """One envelope's header: the tensor spec plus where this chunk fits."""

    spec: TensorSpec
    chunk_index: int
    chunk_count: int
    chunk_offset: int
    total_length: int
    payload_length: int
    payload_crc32c: int

    @property
    def header_size(self) -> int:
        return header_size(len(self.spec.shape))

    @property
    def envelope_size(self) -> int:
        return self.header_size + self.payload_length


@dataclass(frozen=True, slots=True)
class Limits:
    """Decoder bounds. Everything a peer declares is checked against these."""

    max_ndim: int = 8
    max_dim: int = 1 << 40
    max_tensor_bytes: int = 1 << 36
    max_payload_length: int = 1 << 30
    max_chunks: int = 1 << 20

    def __post_init__(self) -> None:
        # The compiled decoder does its size arithmetic in uint64; these
        # ceilings guarantee it can never overflow.
        if not 0 <= self.max_ndim <= MAX_NDIM_CAP:
            raise ValueError(f"max_ndim must be within 0..{MAX_NDIM_CAP}")
        for name in ("max_dim", "max_tensor_bytes", "max_payload_length"):
            if not 0 <= getattr(self, name) <= 1 << 62:
                raise ValueError(f"{name} must be within 0..2**62")
        if not 0 <= self.max_chunks <= 0xFFFFFFFF:
            raise ValueError("max_chunks must fit in 32 bits")


DEFAULT_LIMITS = Limits()


def tensor_nbytes(spec: TensorSpec) -> int:
    """Payload bytes implied by a spec's dtype, shape and quantization.

    Raises ``ValueError`` for a quantized spec whose last dimension is not a
    whole number of blocks (the header checks report that as malformed).
    """
    elements = math.prod(spec.shape)
    fmt = QuantFormat(spec.quant.format)
    if fmt == QuantFormat.NONE:
        return elements * itemsize(spec.dtype)
    block, block_bytes = QUANT_BLOCKS[fmt]
    if not spec.shape or spec.shape[-1] % block:
        raise ValueError(f"shape {spec.shape} is not a whole number of {fmt.name} blocks")
    return elements // block * block_bytes

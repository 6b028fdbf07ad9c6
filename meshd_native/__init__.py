"""meshd_native: tensor envelopes with CRC32C, and KV-cache conversion kernels.

There are two implementations behind one API, bit for bit identical: the
compiled Cython kernels (``"native"``) and a pure-Python/numpy ``twin``. The
live one is picked at import: native, unless the extension is not built or
``MESHD_NO_EXTENSIONS=1`` is set. ``IMPLEMENTATION`` names it. Both can be used
side by side regardless of the environment: ``twin`` is always there and
``load_native()`` (also ``meshd_native.native``) returns the compiled one or
``None``; ``native_unavailable_reason()`` says why not.
"""

from __future__ import annotations

import importlib
import logging
import os

from . import _twin_framing, _twin_kv
from ._impl import Implementation
from .envelope import (
    DecodedEnvelope,
    EncodedEnvelope,
    as_byte_view,
    peek_header_size,
    spec_for_array,
    tensor_array,
)
from .errors import (
    REASONS,
    DuplicateChunk,
    EnvelopeChecksumMismatch,
    EnvelopeError,
    EnvelopeMalformed,
    EnvelopeOversized,
    EnvelopeTruncated,
    EnvelopeVersionMismatch,
    InconsistentChunk,
    KernelError,
    ReassemblyError,
    ReassemblyOverflow,
)
from .reassembly import Reassembler, ReassemblerConfig, TensorReassembled
from .spec import (
    DEFAULT_LIMITS,
    FIXED_HEADER_SIZE,
    MAGIC,
    NO_QUANT,
    Q4_0,
    Q8_0,
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
)

__all__ = [
    "DEFAULT_LIMITS",
    "FIXED_HEADER_SIZE",
    "IMPLEMENTATION",
    "MAGIC",
    "NO_QUANT",
    "Q4_0",
    "Q8_0",
    "REASONS",
    "VERSION",
    "DType",
    "DecodedEnvelope",
    "DuplicateChunk",
    "EncodedEnvelope",
    "EnvelopeChecksumMismatch",
    "EnvelopeError",
    "EnvelopeHeader",
    "EnvelopeMalformed",
    "EnvelopeOversized",
    "EnvelopeTruncated",
    "EnvelopeVersionMismatch",
    "Implementation",
    "InconsistentChunk",
    "KernelError",
    "Kind",
    "Layout",
    "Limits",
    "QuantDescriptor",
    "QuantFormat",
    "Reassembler",
    "ReassemblerConfig",
    "ReassemblyError",
    "ReassemblyOverflow",
    "TensorReassembled",
    "TensorSpec",
    "as_byte_view",
    "convert",
    "crc32c",
    "decode_envelope",
    "decode_header",
    "dequantize",
    "encode_envelope",
    "encode_envelope_into",
    "encode_header",
    "header_size",
    "implementations",
    "live_implementation",
    "load_native",
    "merge_kv",
    "native_unavailable_reason",
    "peek_header_size",
    "permute",
    "quantize",
    "spec_for_array",
    "split_array",
    "split_kv",
    "split_tensor",
    "swap_token_head",
    "tensor_array",
    "twin",
]

logger = logging.getLogger(__name__)

twin = Implementation("twin", _twin_framing, _twin_kv)

_native: Implementation | None = None
_native_error: str | None = None
_native_tried = False


def load_native() -> Implementation | None:
    """The compiled implementation, or ``None`` when the extension is not built."""
    global _native, _native_error, _native_tried
    if not _native_tried:
        _native_tried = True
        try:
            framing = importlib.import_module(f"{__name__}._framing")
            kv_kernels = importlib.import_module(f"{__name__}._kv")
        except ImportError as exc:
            _native_error = f"compiled kernels not importable ({exc})"
        else:
            _native = Implementation("native", framing, kv_kernels)
    return _native


def native_unavailable_reason() -> str | None:
    """Why ``load_native()`` returns ``None`` (``None`` if it does not)."""
    load_native()
    return _native_error


def implementations() -> dict[str, Implementation]:
    """Every implementation importable in this process, by name."""
    found = {"twin": twin}
    native = load_native()
    if native is not None:
        found["native"] = native
    return found


def _select() -> Implementation:
    # The one environment switch of this package: the contract for
    # forcing the twin in builds and CI, read once at import.
    if os.environ.get("MESHD_NO_EXTENSIONS") == "1":
        logger.debug("meshd_native: using the twin (MESHD_NO_EXTENSIONS=1)")
        return twin
    native = load_native()
    if native is None:
        logger.info("meshd_native: using the pure-Python twin: %s", _native_error)
        return twin
    logger.debug("meshd_native: using compiled kernels %s", native.features())
    return native


_live = _select()
IMPLEMENTATION: str = _live.name


def live_implementation() -> Implementation:
    """The implementation behind the package-level functions."""
    return _live


def __getattr__(name: str) -> object:
    if name == "native":
        return load_native()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


crc32c = _live.crc32c
encode_header = _live.encode_header
decode_header = _live.decode_header
encode_envelope = _live.encode_envelope
encode_envelope_into = _live.encode_envelope_into
decode_envelope = _live.decode_envelope
split_tensor = _live.split_tensor
split_array = _live.split_array
convert = _live.convert
quantize = _live.quantize
dequantize = _live.dequantize
permute = _live.permute
swap_token_head = _live.swap_token_head
split_kv = _live.split_kv
merge_kv = _live.merge_kv

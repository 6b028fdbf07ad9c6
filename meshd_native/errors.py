"""The typed error families of meshd_native.

Every failure to decode, validate or reassemble a tensor envelope raises an
``EnvelopeError``. Each class carries a stable ``code`` (what went wrong, for
the wire and for metrics) and each instance a stable ``reason`` (which check
failed). Both implementations raise through ``envelope_error()`` with the same
reason names, so the tests can require native and twin to fail identically.

Bad arguments to the conversion, quantization and layout kernels are caller
bugs rather than hostile input; they raise ``KernelError`` (a ``ValueError``).
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "DuplicateChunk",
    "EnvelopeChecksumMismatch",
    "EnvelopeError",
    "EnvelopeMalformed",
    "EnvelopeOversized",
    "EnvelopeTruncated",
    "EnvelopeVersionMismatch",
    "InconsistentChunk",
    "KernelError",
    "REASONS",
    "ReassemblyError",
    "ReassemblyOverflow",
    "envelope_error",
]


class EnvelopeError(Exception):
    """Base of every envelope decode, validation and reassembly failure."""

    code: ClassVar[str] = "envelope_error"

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class EnvelopeTruncated(EnvelopeError):
    """The buffer ends before the header or the payload does."""

    code = "envelope_truncated"


class EnvelopeOversized(EnvelopeError):
    """A dimension, the tensor, the payload or the chunk count exceeds a limit."""

    code = "envelope_oversized"


class EnvelopeChecksumMismatch(EnvelopeError):
    """The header or payload CRC32C does not match the bytes received."""

    code = "envelope_checksum_mismatch"


class EnvelopeVersionMismatch(EnvelopeError):
    """The envelope was written by an incompatible format version."""

    code = "envelope_version_mismatch"


class EnvelopeMalformed(EnvelopeError):
    """A field is out of range or inconsistent with the others."""

    code = "envelope_malformed"


class ReassemblyError(EnvelopeError):
    """A well-formed chunk that cannot join the tensor being reassembled."""

    code = "reassembly_error"


class DuplicateChunk(ReassemblyError):
    """The chunk index was already received (or the tensor already completed)."""

    code = "duplicate_chunk"


class InconsistentChunk(ReassemblyError):
    """The chunk disagrees with earlier chunks of the same tensor."""

    code = "inconsistent_chunk"


class ReassemblyOverflow(ReassemblyError):
    """Accepting the chunk would exceed the reassembler's memory bounds."""

    code = "reassembly_overflow"


class KernelError(ValueError):
    """A kernel was called with arguments it cannot process (a caller bug)."""

    code: ClassVar[str] = "kernel_error"


# Reason name -> error class. The single table both implementations raise
# through, so a reason can never map to different classes in native and twin.
REASONS: dict[str, type[EnvelopeError]] = {
    "short_header": EnvelopeTruncated,
    "short_payload": EnvelopeTruncated,
    "bad_magic": EnvelopeMalformed,
    "bad_version": EnvelopeVersionMismatch,
    "too_many_dims": EnvelopeOversized,
    "header_checksum": EnvelopeChecksumMismatch,
    "payload_checksum": EnvelopeChecksumMismatch,
    "field_out_of_range": EnvelopeMalformed,
    "reserved_nonzero": EnvelopeMalformed,
    "bad_kind": EnvelopeMalformed,
    "bad_dtype": EnvelopeMalformed,
    "bad_layout": EnvelopeMalformed,
    "bad_quant_format": EnvelopeMalformed,
    "bad_layout_block": EnvelopeMalformed,
    "bad_quant_block": EnvelopeMalformed,
    "bad_quant_dtype": EnvelopeMalformed,
    "bad_quant_layout": EnvelopeMalformed,
    "bad_quant_shape": EnvelopeMalformed,
    "dim_too_large": EnvelopeOversized,
    "tensor_too_large": EnvelopeOversized,
    "bad_total_length": EnvelopeMalformed,
    "bad_chunk_count": EnvelopeMalformed,
    "too_many_chunks": EnvelopeOversized,
    "bad_chunk_index": EnvelopeMalformed,
    "payload_too_large": EnvelopeOversized,
    "bad_chunk_range": EnvelopeMalformed,
    "trailing_bytes": EnvelopeMalformed,
    "duplicate_chunk": DuplicateChunk,
    "already_completed": DuplicateChunk,
    "spec_mismatch": InconsistentChunk,
    "chunk_count_mismatch": InconsistentChunk,
    "overlapping_chunk": InconsistentChunk,
    "payload_length_mismatch": InconsistentChunk,
    "incomplete_coverage": InconsistentChunk,
    "too_many_pending": ReassemblyOverflow,
    "pending_bytes_exceeded": ReassemblyOverflow,
    "chunk_count_exceeded": ReassemblyOverflow,
}


def envelope_error(reason: str, detail: str = "") -> EnvelopeError:
    """Build (not raise) the error for a reason name from ``REASONS``."""
    return REASONS[reason](reason, detail)

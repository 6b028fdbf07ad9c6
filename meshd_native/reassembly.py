"""Sans-IO reassembly of chunked tensors arriving in any order.

The caller feeds envelopes (``add``) or already-decoded chunks
(``add_decoded``) and gets a ``TensorReassembled`` event when the last chunk
of a tensor lands. Memory is bounded: the bytes of all partial tensors, their
number and their chunk counts are capped, and stale partial tensors can be
expired with the caller's clock. Every rejection is a typed ``ReassemblyError``
(or the ``EnvelopeError`` of the decoder) and leaves earlier state untouched.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import envelope_error
from .spec import DEFAULT_LIMITS, EnvelopeHeader, Limits, TensorSpec

if TYPE_CHECKING:
    from ._impl import Implementation

__all__ = ["Reassembler", "ReassemblerConfig", "TensorReassembled"]


@dataclass(frozen=True, slots=True)
class ReassemblerConfig:
    """Bounds on what a reassembler holds while tensors are incomplete."""

    max_pending_bytes: int = 1 << 30
    max_pending_tensors: int = 64
    max_chunks_per_tensor: int = 1 << 16
    # Completed (tensor_id, sequence) keys remembered to reject late duplicates.
    remember_completed: int = 1024


@dataclass(frozen=True, slots=True, eq=False)
class TensorReassembled:
    """Emitted when every chunk of a tensor has arrived."""

    spec: TensorSpec
    chunk_count: int
    array: np.ndarray


@dataclass(slots=True)
class _Partial:
    spec: TensorSpec
    chunk_count: int
    total_length: int
    buffer: np.ndarray
    first_seen: float
    received: set[int] = field(default_factory=set)
    starts: list[int] = field(default_factory=list)  # sorted starts of non-empty ranges
    ends: list[int] = field(default_factory=list)  # ends, parallel to starts
    received_bytes: int = 0


class Reassembler:
    """Collects chunks per (tensor_id, sequence) and assembles whole tensors."""

    def __init__(
        self,
        config: ReassemblerConfig | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
        implementation: Implementation | None = None,
    ) -> None:
        if implementation is None:
            from . import live_implementation

            implementation = live_implementation()
        self._config = config or ReassemblerConfig()
        self._limits = limits
        self._impl = implementation
        self._partials: dict[tuple[int, int], _Partial] = {}
        self._completed: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._pending_bytes = 0

    @property
    def pending_tensors(self) -> int:
        return len(self._partials)

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def add(self, data: Any, now: float = 0.0) -> TensorReassembled | None:
        """Decode and verify one envelope, then file its chunk."""
        envelope = self._impl.decode_envelope(data, self._limits)
        return self.add_decoded(envelope.header, envelope.payload, now)

    def add_decoded(
        self, header: EnvelopeHeader, payload: Any, now: float = 0.0
    ) -> TensorReassembled | None:
        """File a chunk that was already decoded and verified."""
        view = memoryview(payload).cast("B")
        if len(view) != header.payload_length:
            raise envelope_error("payload_length_mismatch")
        key = (header.spec.tensor_id, header.spec.sequence)
        if key in self._completed:
            raise envelope_error("already_completed", str(key))
        partial = self._partials.get(key)
        if partial is None:
            partial = self._start(key, header, now)
        else:
            self._check_fits(partial, header)
        start = header.chunk_offset
        end = start + header.payload_length
        if end > start:
            slot = bisect.bisect_right(partial.starts, start)
            if (slot > 0 and partial.ends[slot - 1] > start) or (
                slot < len(partial.starts) and partial.starts[slot] < end
            ):
                raise envelope_error("overlapping_chunk", f"bytes {start}..{end}")
            partial.starts.insert(slot, start)
            partial.ends.insert(slot, end)
            partial.buffer[start:end] = np.frombuffer(view, dtype=np.uint8)
        partial.received.add(header.chunk_index)
        partial.received_bytes += end - start
        if len(partial.received) < partial.chunk_count:
            return None
        self._forget(key)
        if partial.received_bytes != partial.total_length:
            raise envelope_error(
                "incomplete_coverage",
                f"{partial.received_bytes} of {partial.total_length} bytes in all chunks",
            )
        self._completed[key] = None
        while len(self._completed) > self._config.remember_completed:
            self._completed.popitem(last=False)
        from .envelope import tensor_array

        return TensorReassembled(
            partial.spec, partial.chunk_count, tensor_array(partial.spec, partial.buffer)
        )

    def expire(self, now: float, max_age: float) -> list[tuple[int, int]]:
        """Drop partial tensors first seen more than ``max_age`` before ``now``."""
        stale = [k for k, p in self._partials.items() if now - p.first_seen > max_age]
        for key in stale:
            self._forget(key)
        return stale

    def discard(self, tensor_id: int, sequence: int = 0) -> bool:
        """Drop one partial tensor; returns whether it existed."""
        key = (tensor_id, sequence)
        if key not in self._partials:
            return False
        self._forget(key)
        return True

    def _start(self, key: tuple[int, int], header: EnvelopeHeader, now: float) -> _Partial:
        config = self._config
        if len(self._partials) >= config.max_pending_tensors:
            raise envelope_error("too_many_pending", f"{len(self._partials)} partial tensors")
        if self._pending_bytes + header.total_length > config.max_pending_bytes:
            raise envelope_error(
                "pending_bytes_exceeded",
                f"{self._pending_bytes} + {header.total_length} > {config.max_pending_bytes}",
            )
        if header.chunk_count > config.max_chunks_per_tensor:
            raise envelope_error("chunk_count_exceeded", str(header.chunk_count))
        partial = _Partial(
            header.spec,
            header.chunk_count,
            header.total_length,
            np.empty(header.total_length, dtype=np.uint8),
            now,
        )
        self._partials[key] = partial
        self._pending_bytes += header.total_length
        return partial

    @staticmethod
    def _check_fits(partial: _Partial, header: EnvelopeHeader) -> None:
        if header.spec != partial.spec or header.total_length != partial.total_length:
            raise envelope_error("spec_mismatch")
        if header.chunk_count != partial.chunk_count:
            raise envelope_error("chunk_count_mismatch")
        if header.chunk_index in partial.received:
            raise envelope_error("duplicate_chunk", str(header.chunk_index))

    def _forget(self, key: tuple[int, int]) -> None:
        partial = self._partials.pop(key)
        self._pending_bytes -= partial.total_length

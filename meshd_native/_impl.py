"""One complete meshd_native API bound to a pair of kernel modules.

``meshd_native.twin`` binds the pure kernels, ``load_native()`` the compiled
ones; the package-level functions are those of whichever is live. Keeping the
binding in one class means the two can never drift apart in signature.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from . import envelope, kv
from .envelope import DecodedEnvelope, EncodedEnvelope, FramingKernels
from .kv import KVKernels
from .reassembly import Reassembler, ReassemblerConfig
from .spec import DEFAULT_LIMITS, DType, EnvelopeHeader, Kind, Limits, QuantFormat, TensorSpec

__all__ = ["Implementation"]


class Implementation:
    """The full public API over one framing kernel set and one KV kernel set."""

    def __init__(self, name: str, framing: FramingKernels, kv_kernels: KVKernels) -> None:
        self.name = name
        self._framing = framing
        self._kv = kv_kernels

    def __repr__(self) -> str:
        return f"<meshd_native implementation {self.name!r}>"

    def features(self) -> dict[str, bool]:
        """Hardware paths in use (empty for the twin)."""
        return {**self._framing.features(), **self._kv.features()}

    # --- checksums and framing ---

    def crc32c(self, data: Any, value: int = 0) -> int:
        """CRC32C (Castagnoli) of a contiguous buffer, continuing from ``value``."""
        return self._framing.crc32c(data, value)

    def encode_header(self, header: EnvelopeHeader, limits: Limits = DEFAULT_LIMITS) -> bytes:
        """Serialize a header after validating it exactly as ``decode_header`` would."""
        return self._framing.encode_header(header, limits)

    def decode_header(self, data: Any, limits: Limits = DEFAULT_LIMITS) -> EnvelopeHeader:
        """Parse and validate the header at the start of ``data`` (payload unchecked)."""
        return self._framing.decode_header(data, limits)

    def encode_envelope(
        self,
        spec: TensorSpec,
        payload: Any,
        *,
        chunk_index: int = 0,
        chunk_count: int = 1,
        chunk_offset: int = 0,
        total_length: int | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> EncodedEnvelope:
        return envelope.encode_envelope(
            self._framing,
            spec,
            payload,
            chunk_index=chunk_index,
            chunk_count=chunk_count,
            chunk_offset=chunk_offset,
            total_length=total_length,
            limits=limits,
        )

    def encode_envelope_into(
        self,
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
        return envelope.encode_envelope_into(
            self._framing,
            out,
            spec,
            payload,
            chunk_index=chunk_index,
            chunk_count=chunk_count,
            chunk_offset=chunk_offset,
            total_length=total_length,
            limits=limits,
        )

    def decode_envelope(self, data: Any, limits: Limits = DEFAULT_LIMITS) -> DecodedEnvelope:
        return envelope.decode_envelope(self._framing, data, limits)

    def split_tensor(
        self, spec: TensorSpec, payload: Any, chunk_size: int, limits: Limits = DEFAULT_LIMITS
    ) -> Iterator[EncodedEnvelope]:
        return envelope.split_tensor(self._framing, spec, payload, chunk_size, limits)

    def split_array(
        self,
        array: np.ndarray,
        chunk_size: int,
        *,
        tensor_id: int,
        kind: Kind,
        sequence: int = 0,
        dtype: DType | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> Iterator[EncodedEnvelope]:
        """``split_tensor`` with the spec read off a contiguous array."""
        spec = envelope.spec_for_array(
            array, tensor_id=tensor_id, kind=kind, sequence=sequence, dtype=dtype
        )
        return self.split_tensor(spec, array, chunk_size, limits)

    def reassembler(
        self, config: ReassemblerConfig | None = None, *, limits: Limits = DEFAULT_LIMITS
    ) -> Reassembler:
        """A ``Reassembler`` that decodes with this implementation."""
        return Reassembler(config, limits=limits, implementation=self)

    # --- KV kernels ---

    def convert(
        self, src: Any, src_dtype: DType, dst_dtype: DType, *, out: Any = None
    ) -> np.ndarray:
        return kv.convert(self._kv, src, src_dtype, dst_dtype, out=out)

    def quantize(
        self, src: Any, fmt: QuantFormat, *, src_dtype: DType | None = None
    ) -> np.ndarray:
        return kv.quantize(self._kv, src, fmt, src_dtype=src_dtype)

    def dequantize(self, blocks: Any, fmt: QuantFormat) -> np.ndarray:
        return kv.dequantize(self._kv, blocks, fmt)

    def permute(self, src: Any, axes: tuple[int, ...], *, out: Any = None) -> np.ndarray:
        return kv.permute(self._kv, src, axes, out=out)

    def swap_token_head(self, kv_cache: Any) -> np.ndarray:
        return kv.swap_token_head(self._kv, kv_cache)

    def split_kv(self, kv_cache: Any, axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
        return kv.split_kv(self._kv, kv_cache, axis)

    def merge_kv(self, key: Any, value: Any, axis: int = 1) -> np.ndarray:
        return kv.merge_kv(self._kv, key, value, axis)


# The methods are thin bindings; give them the documentation of what they bind.
for _name, _source in {
    "encode_envelope": envelope.encode_envelope,
    "encode_envelope_into": envelope.encode_envelope_into,
    "decode_envelope": envelope.decode_envelope,
    "split_tensor": envelope.split_tensor,
    "convert": kv.convert,
    "quantize": kv.quantize,
    "dequantize": kv.dequantize,
    "permute": kv.permute,
    "swap_token_head": kv.swap_token_head,
    "split_kv": kv.split_kv,
    "merge_kv": kv.merge_kv,
}.items():
    getattr(Implementation, _name).__doc__ = _source.__doc__

"""A cache as tensors and as tensor envelopes (sans-IO, sans-llama).

A ``KVBundle`` is a validated descriptor plus one wire array per tensor named
in it. This module converts between three forms of the same cache:

- ``SeqState`` (llama.cpp's layout, ``seqstate.py``) <-> ``KVBundle``:
  ``bundle_from_state`` / ``state_from_bundle``, optionally through ggml
  Q8_0 on the wire (half the bytes of f16; lossy, see docs/kvcache.md);
- ``KVBundle`` <-> a stream of ``meshd_native`` envelopes: ``pack`` yields
  them (descriptor first, as a raw tensor, so it is CRC-checked too), and the
  ``BundleAssembler`` takes them back in any order, verifying every chunk's
  CRC32C, each whole tensor's CRC32C against the descriptor, and each
  tensor's spec against the layout the descriptor declares.

Every failure is a ``KVCacheError``; nothing here touches llama.cpp, so a
rejected cache cannot have been loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

import meshd_native as native
from meshd_native import (
    DType,
    EncodedEnvelope,
    EnvelopeChecksumMismatch,
    EnvelopeError,
    Kind,
    Limits,
    QuantFormat,
    Reassembler,
    ReassemblerConfig,
    TensorSpec,
)
from meshd_native.spec import NO_QUANT, Q8_0

from .descriptor import (
    Q8_0_BLOCK,
    WIRE_FORMATS,
    CacheDescriptor,
    TensorEntry,
    expected_tensors,
    prefix_sha256,
)
from .errors import (
    CacheChecksumMismatch,
    CacheDescriptorInvalid,
    CacheDescriptorMismatch,
    CacheStateUnsupported,
    CacheTransferError,
)
from .seqstate import GGML_TYPES, LayerKV, SeqState

__all__ = ["BundleAssembler", "KVBundle", "bundle_from_state", "pack", "state_from_bundle", "truncate"]

DESCRIPTOR_TENSOR_ID = 0
DEFAULT_CHUNK = 1 << 20
_DTYPES = {"f32": (DType.F32, np.float32), "f16": (DType.F16, np.float16), "bf16": (DType.BF16, np.uint16)}
_GGML_ID = {name: type_id for type_id, (name, _size) in GGML_TYPES.items()}


@dataclass(frozen=True, slots=True, eq=False)
class KVBundle:
    descriptor: CacheDescriptor
    tensors: Mapping[str, np.ndarray]  # wire form, keyed by TensorEntry.name


def _to_wire(values: np.ndarray, dtype: str, wire: str) -> np.ndarray:
    if wire == "raw":
        return values
    return native.quantize(values, QuantFormat.Q8_0, src_dtype=_DTYPES[dtype][0])


def _from_wire(blocks: np.ndarray, dtype: str, wire: str) -> np.ndarray:
    if wire == "raw":
        return blocks
    values = native.dequantize(blocks, QuantFormat.Q8_0)
    return native.convert(values, DType.F32, _DTYPES[dtype][0])


def bundle_from_state(state: SeqState, base: CacheDescriptor, wire: str = "raw") -> KVBundle:
    """Address each layer of ``state`` as typed arrays; ``base`` supplies the identity fields.

    ``base.tensors`` is ignored and recomputed (shapes, sizes, CRC32C).
    """
    d = dataclasses.replace(base, wire=wire, v_trans=state.v_trans, tensors=())
    n, heads = state.n_cells, d.n_head_kv
    if wire not in WIRE_FORMATS:
        raise CacheStateUnsupported(f"wire format {wire!r} is not one of {WIRE_FORMATS}")
    if wire == "q8_0" and (d.head_dim_k % Q8_0_BLOCK or d.head_dim_v % Q8_0_BLOCK):
        raise CacheStateUnsupported("q8_0 on the wire needs head dims that are multiples of 32")
    if n != d.n_tokens:
        raise CacheDescriptorMismatch(f"state has {n} cells for {d.n_tokens} tokens")
    k_np, v_np = _DTYPES[d.k_dtype][1], _DTYPES[d.v_dtype][1]
    arrays: dict[str, np.ndarray] = {}
    for il, layer in enumerate(state.layers):
        k = np.frombuffer(layer.k, dtype=k_np).reshape(n, heads, d.head_dim_k)
        arrays[f"k.{il}"] = _to_wire(k, d.k_dtype, wire)
    for il, layer in enumerate(state.layers):
        if state.v_trans:
            v = np.frombuffer(layer.v, dtype=v_np).reshape(heads, d.head_dim_v, n)
            v = v if wire == "raw" else v.transpose(2, 0, 1)  # token-major for blocks along dim
        else:
            v = np.frombuffer(layer.v, dtype=v_np).reshape(n, heads, d.head_dim_v)
        arrays[f"v.{il}"] = _to_wire(v, d.v_dtype, wire)
    entries = []
    for name, shape, _nbytes in expected_tensors(d):
        array = arrays[name]
        entries.append(TensorEntry(name, shape, array.nbytes, native.crc32c(native.as_byte_view(array))))
    descriptor = dataclasses.replace(d, tensors=tuple(entries))
    descriptor.validate()
    return KVBundle(descriptor, arrays)


def state_from_bundle(bundle: KVBundle) -> SeqState:
    """llama.cpp's layout again (dequantizing a q8_0 wire back to the cache dtype)."""
    d = bundle.descriptor
    k_type, v_type = _GGML_ID[d.k_dtype], _GGML_ID[d.v_dtype]
    k_row = d.n_head_kv * d.head_dim_k * GGML_TYPES[k_type][1]
    v_row = d.n_head_kv * d.head_dim_v * GGML_TYPES[v_type][1]
    layers = []
    for il in range(d.n_layer):
        k = _from_wire(bundle.tensors[f"k.{il}"], d.k_dtype, d.wire)
        v = _from_wire(bundle.tensors[f"v.{il}"], d.v_dtype, d.wire)
        if d.v_trans and d.wire != "raw":
            v = native.permute(v, (1, 2, 0))  # back to [head][dim][token]
        layers.append(LayerKV(k_type, v_type, k_row, v_row, native.as_byte_view(k), native.as_byte_view(v)))
    return SeqState(d.state_preamble, d.n_tokens, d.v_trans, tuple(layers))


def _spec(entry: TensorEntry, dtype: str, wire: str, tensor_id: int, sequence: int) -> TensorSpec:
    return TensorSpec(
        tensor_id, Kind.KV_BLOCK, _DTYPES[dtype][0], entry.shape,
        quant=Q8_0 if wire == "q8_0" else NO_QUANT, sequence=sequence,
    )


def _dtype_of(name: str, d: CacheDescriptor) -> str:
    return d.k_dtype if name.startswith("k.") else d.v_dtype


def pack(bundle: KVBundle, transfer_id: int, chunk_size: int = DEFAULT_CHUNK) -> Iterator[EncodedEnvelope]:
    """Envelopes for the whole cache: the descriptor (tensor 0), then each tensor in table order.

    ``transfer_id`` goes in every envelope's sequence field, so chunks of two
    transfers can never be mixed up by a reassembler.
    """
    d = bundle.descriptor
    body = np.frombuffer(d.to_wire(), dtype=np.uint8)
    head = TensorSpec(DESCRIPTOR_TENSOR_ID, Kind.RAW, DType.U8, (len(body),), sequence=transfer_id)
    yield from native.split_tensor(head, body, chunk_size)
    for index, entry in enumerate(d.tensors, start=1):
        spec = _spec(entry, _dtype_of(entry.name, d), d.wire, index, transfer_id)
        yield from native.split_tensor(spec, native.as_byte_view(bundle.tensors[entry.name]), chunk_size)


class BundleAssembler:
    """Sans-IO receiver: ``add`` envelope bytes until it returns the ``KVBundle``.

    Bounded by ``max_bytes`` (what the descriptor may declare, and what may be
    pending); the descriptor must come before any tensor chunk, so nothing is
    buffered for a cache that will be refused.
    """

    def __init__(self, *, max_bytes: int = 1 << 31, limits: Limits | None = None) -> None:
        self.max_bytes = max_bytes
        self._limits = limits or native.DEFAULT_LIMITS
        self._reassembler = Reassembler(
            ReassemblerConfig(max_pending_bytes=max_bytes, max_pending_tensors=8),
            limits=self._limits,
        )
        self.descriptor: CacheDescriptor | None = None
        self._sequence: int | None = None
        self._tensors: dict[str, np.ndarray] = {}
        self.received_bytes = 0

    def add(self, data: Any, now: float = 0.0) -> KVBundle | None:
        try:
            envelope = native.decode_envelope(data, self._limits)
        except EnvelopeChecksumMismatch as exc:
            raise CacheChecksumMismatch(f"envelope rejected: {exc}") from exc
        except EnvelopeError as exc:
            raise CacheTransferError(f"envelope rejected: {exc.code}: {exc}") from exc
        spec = envelope.header.spec
        if self._sequence is None:
            self._sequence = spec.sequence
        elif spec.sequence != self._sequence:
            raise CacheTransferError(f"envelope of transfer {spec.sequence} inside transfer {self._sequence}")
        if self.descriptor is None and spec.tensor_id != DESCRIPTOR_TENSOR_ID:
            raise CacheTransferError("a tensor chunk arrived before the descriptor")
        try:
            done = self._reassembler.add_decoded(envelope.header, envelope.payload, now)
        except EnvelopeError as exc:
            raise CacheTransferError(f"chunk rejected: {exc.code}: {exc}") from exc
        self.received_bytes += envelope.header.payload_length
        if done is None:
            return None
        if done.spec.tensor_id == DESCRIPTOR_TENSOR_ID:
            self._accept_descriptor(done.spec, done.array)
        else:
            self._accept_tensor(done.spec, done.array)
        return self.result()

    def _accept_descriptor(self, spec: TensorSpec, array: np.ndarray) -> None:
        if self.descriptor is not None:
            raise CacheTransferError("a second descriptor")
        if spec.kind != Kind.RAW or spec.dtype != DType.U8 or len(spec.shape) != 1:
            raise CacheDescriptorInvalid("the descriptor envelope must be raw bytes")
        descriptor = CacheDescriptor.from_wire(array.tobytes())
        if descriptor.wire_bytes > self.max_bytes:
            raise CacheTransferError(f"cache of {descriptor.wire_bytes} bytes exceeds {self.max_bytes}")
        self.descriptor = descriptor

    def _accept_tensor(self, spec: TensorSpec, array: np.ndarray) -> None:
        d = self.descriptor
        if d is None:  # pragma: no cover - refused in add() before any tensor chunk
            raise CacheTransferError("tensor before descriptor")
        index = spec.tensor_id - 1
        if not 0 <= index < len(d.tensors):
            raise CacheDescriptorMismatch(f"tensor id {spec.tensor_id} is not in the descriptor")
        entry = d.tensors[index]
        expected = _spec(entry, _dtype_of(entry.name, d), d.wire, spec.tensor_id, spec.sequence)
        if spec != expected:
            raise CacheDescriptorMismatch(f"tensor {entry.name}: envelope spec {spec} is not {expected}")
        if native.crc32c(native.as_byte_view(array)) != entry.crc32c:
            raise CacheChecksumMismatch(f"tensor {entry.name}: whole-tensor CRC32C differs from the descriptor")
        self._tensors[entry.name] = array

    def result(self) -> KVBundle | None:
        """The bundle once the descriptor and every tensor it names have arrived."""
        d = self.descriptor
        if d is None or len(self._tensors) != len(d.tensors):
            return None
        return KVBundle(d, dict(self._tensors))


def truncate(bundle: KVBundle, n_tokens: int) -> KVBundle:
    """The cache of the first ``n_tokens`` tokens only (a raw-wire bundle; copies V rows).

    Causal attention makes a prefix's K/V independent of what follows it, so
    a conversation's cache serves any prompt that shares its first tokens.
    """
    d = bundle.descriptor
    if d.wire != "raw":
        raise CacheStateUnsupported("only a raw-wire cache can be truncated")
    if not 0 < n_tokens <= d.n_tokens:
        raise CacheDescriptorMismatch(f"cannot keep {n_tokens} of {d.n_tokens} tokens")
    if n_tokens == d.n_tokens:
        return bundle
    arrays: dict[str, np.ndarray] = {}
    for entry in d.tensors:
        array = bundle.tensors[entry.name]
        if entry.name.startswith("v.") and d.v_trans:
            arrays[entry.name] = np.ascontiguousarray(array[..., :n_tokens])
        else:
            arrays[entry.name] = array[:n_tokens]  # token-major: a view
    tokens = d.token_ids[:n_tokens]
    shorter = dataclasses.replace(d, token_ids=tokens, prefix_sha256=prefix_sha256(tokens), tensors=())
    entries = [
        TensorEntry(name, shape, arrays[name].nbytes, native.crc32c(native.as_byte_view(arrays[name])))
        for name, shape, _nbytes in expected_tensors(shorter)
    ]
    result = dataclasses.replace(shorter, tensors=tuple(entries))
    result.validate()
    return KVBundle(result, arrays)

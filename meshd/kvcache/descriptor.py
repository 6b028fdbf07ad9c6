"""The canonical cache descriptor: what a KV cache is, checked strictly both ways.

A descriptor travels first in every cache transfer (as the payload of a raw
tensor envelope, so it is CRC-checked like the K/V data) and names everything
a receiver must agree with before it may load the cache: the exact weights
(file sha256), the token ids the cache covers, the layer count and head
layout, the K/V element types, the backend and its state format, and each
tensor that follows with its wire size and a whole-tensor CRC32C.

``from_wire`` is strict: the key set must be exactly this version's, every
value has its type and range, the prefix hash must match the token ids, and
the tensor table must be exactly what the layout implies. A peer with a newer
format version is refused (``CacheDescriptorInvalid``), never half-read.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from .errors import CacheDescriptorInvalid

__all__ = [
    "BACKEND_LLAMA_CPP",
    "FORMAT_VERSION",
    "STATE_FORMAT",
    "WIRE_FORMATS",
    "CacheDescriptor",
    "TensorEntry",
    "expected_tensors",
    "prefix_sha256",
]

FORMAT_VERSION = 1
BACKEND_LLAMA_CPP = "llama.cpp"
# The llama.cpp per-sequence state layout seqstate.py parses (LLAMA_STATE_SEQ_VERSION 3).
STATE_FORMAT = "llama.cpp/seq-state-v3"
WIRE_FORMATS = ("raw", "q8_0")
KV_DTYPES = {"f32": 4, "f16": 2, "bf16": 2}
Q8_0_BLOCK, Q8_0_BLOCK_BYTES = 32, 34
MAX_TOKENS = 1 << 22
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = (
    "format_version", "backend", "state_format", "state_preamble", "model_id", "model_sha256",
    "token_ids", "prefix_sha256", "n_layer", "n_head_kv", "head_dim_k", "head_dim_v",
    "k_dtype", "v_dtype", "v_trans", "wire", "tensors",
)
_TENSOR_FIELDS = ("name", "shape", "nbytes", "crc32c")


def prefix_sha256(token_ids: Sequence[int]) -> str:
    """sha256 (lower-case hex) of the token ids as little-endian int32.

    Model-independent on purpose: announcements pair it with the model, and a
    router checks "does this prompt extend that prefix" by hashing the prompt's
    first ``token_count`` ids.
    """
    return hashlib.sha256(np.asarray(token_ids, dtype="<i4").tobytes()).hexdigest()


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor that follows the descriptor, as it travels."""

    name: str  # "k.<layer>" or "v.<layer>"
    shape: tuple[int, ...]
    nbytes: int  # wire bytes
    crc32c: int  # of the whole tensor's wire bytes: binds the tensors to this descriptor


@dataclass(frozen=True, slots=True)
class CacheDescriptor:
    format_version: int
    backend: str
    state_format: str
    state_preamble: bytes
    model_id: str
    model_sha256: str
    token_ids: tuple[int, ...]
    prefix_sha256: str
    n_layer: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    k_dtype: str
    v_dtype: str
    v_trans: bool  # llama.cpp keeps V transposed ([dim][cell]) without flash attention
    wire: str  # "raw": the cache's own dtype; "q8_0": ggml Q8_0 blocks along head_dim
    tensors: tuple[TensorEntry, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def wire_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_wire(self) -> bytes:
        """Canonical msgpack: fixed key order, token ids as packed int32."""
        body: dict[str, Any] = {name: getattr(self, name) for name in _FIELDS}
        body["token_ids"] = np.asarray(self.token_ids, dtype="<i4").tobytes()
        body["tensors"] = [[t.name, list(t.shape), t.nbytes, t.crc32c] for t in self.tensors]
        return msgpack.packb(body, use_bin_type=True)

    @classmethod
    def from_wire(cls, data: Any) -> CacheDescriptor:
        try:
            body = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise CacheDescriptorInvalid(f"descriptor is not msgpack: {exc}") from exc
        return cls.from_mapping(body)

    @classmethod
    def from_mapping(cls, body: Any) -> CacheDescriptor:
        if not isinstance(body, Mapping):
            raise CacheDescriptorInvalid("descriptor must be a map")
        version = body.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheDescriptorInvalid(f"format version {version!r}; this node reads {FORMAT_VERSION}")
        if set(body) != set(_FIELDS):
            extra, missing = set(body) - set(_FIELDS), set(_FIELDS) - set(body)
            raise CacheDescriptorInvalid(f"descriptor keys differ: unknown {sorted(extra)}, missing {sorted(missing)}")
        tokens_raw = body["token_ids"]
        if not isinstance(tokens_raw, bytes) or len(tokens_raw) % 4:
            raise CacheDescriptorInvalid("token_ids must be packed int32 bytes")
        tensors_raw = body["tensors"]
        if not isinstance(tensors_raw, list):
            raise CacheDescriptorInvalid("tensors must be a list")
        tensors = []
        for item in tensors_raw:
            if not isinstance(item, list) or len(item) != len(_TENSOR_FIELDS):
                raise CacheDescriptorInvalid(f"bad tensor entry {item!r}")
            name, shape, nbytes, crc = item
            if not isinstance(shape, list):
                raise CacheDescriptorInvalid(f"bad shape in tensor entry {item!r}")
            tensors.append(TensorEntry(name, tuple(shape), nbytes, crc))
        values = {**body, "token_ids": tuple(np.frombuffer(tokens_raw, dtype="<i4").tolist()),
                  "tensors": tuple(tensors)}
        descriptor = cls(**values)
        descriptor.validate()
        return descriptor

    def validate(self) -> None:
        """Raise ``CacheDescriptorInvalid`` unless every field is well-formed and consistent."""

        def check(ok: bool, what: str) -> None:
            if not ok:
                raise CacheDescriptorInvalid(what)

        def is_int(value: Any, low: int, high: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

        check(self.format_version == FORMAT_VERSION, "format_version")
        check(self.backend == BACKEND_LLAMA_CPP, f"backend {self.backend!r} is not {BACKEND_LLAMA_CPP!r}")
        check(self.state_format == STATE_FORMAT, f"state format {self.state_format!r} is not {STATE_FORMAT!r}")
        check(isinstance(self.state_preamble, bytes) and len(self.state_preamble) == 8, "state_preamble: 8 bytes")
        check(isinstance(self.model_id, str) and 0 < len(self.model_id) <= 256, "model_id")
        check(isinstance(self.model_sha256, str) and bool(_SHA256.match(self.model_sha256)),
              "model_sha256 must be 64 lower-case hex digits")
        check(isinstance(self.token_ids, tuple) and 0 < len(self.token_ids) <= MAX_TOKENS, "token_ids count")
        check(all(is_int(t, 0, 2**31 - 1) for t in self.token_ids), "token ids must be non-negative int32")
        check(self.prefix_sha256 == prefix_sha256(self.token_ids), "prefix_sha256 does not match token_ids")
        check(is_int(self.n_layer, 1, 4096), "n_layer")
        check(is_int(self.n_head_kv, 1, 4096), "n_head_kv")
        check(is_int(self.head_dim_k, 1, 1 << 16) and is_int(self.head_dim_v, 1, 1 << 16), "head dims")
        check(self.k_dtype in KV_DTYPES and self.v_dtype in KV_DTYPES, "k_dtype/v_dtype must be f32, f16 or bf16")
        check(isinstance(self.v_trans, bool), "v_trans must be a boolean")
        check(self.wire in WIRE_FORMATS, f"wire must be one of {WIRE_FORMATS}")
        if self.wire == "q8_0":
            check(self.head_dim_k % Q8_0_BLOCK == 0 and self.head_dim_v % Q8_0_BLOCK == 0,
                  "q8_0 on the wire needs head dims that are multiples of 32")
        for entry in self.tensors:
            check(isinstance(entry.name, str) and isinstance(entry.shape, tuple)
                  and all(is_int(d, 1, 1 << 40) for d in entry.shape), f"tensor entry {entry!r}")
            check(is_int(entry.nbytes, 1, 1 << 40) and is_int(entry.crc32c, 0, 0xFFFFFFFF), f"tensor entry {entry!r}")
        expected = expected_tensors(self)
        got = [(t.name, t.shape, t.nbytes) for t in self.tensors]
        check(got == expected, "tensor table does not match the layout the descriptor declares")


def expected_tensors(d: CacheDescriptor) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, wire shape, wire bytes) of every tensor, in transfer order: all K, then all V.

    K is ``[token][head][dim]``. V keeps llama.cpp's transposed ``[head][dim][token]``
    on a raw wire (no copy); q8_0 needs blocks along ``dim``, so V is sent
    token-major and transposed back on import.
    """
    n = len(d.token_ids)
    out: list[tuple[str, tuple[int, ...], int]] = []
    for which, dim, dtype in (("k", d.head_dim_k, d.k_dtype), ("v", d.head_dim_v, d.v_dtype)):
        if which == "v" and d.v_trans and d.wire == "raw":
            shape: tuple[int, ...] = (d.n_head_kv, dim, n)
        else:
            shape = (n, d.n_head_kv, dim)
        count = n * d.n_head_kv * dim
        if d.wire == "q8_0":
            nbytes = count // Q8_0_BLOCK * Q8_0_BLOCK_BYTES
        else:
            nbytes = count * KV_DTYPES.get(dtype, 0)
        out.extend((f"{which}.{il}", shape, nbytes) for il in range(d.n_layer))
    return out

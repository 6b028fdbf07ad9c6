"""llama.cpp's per-sequence state bytes, made addressable (sans-llama, sans-IO).

``llama_state_seq_get_data`` returns one opaque blob. For the bundled
llama.cpp (llama-cpp-python 0.3.36, ``LLAMA_STATE_SEQ_VERSION`` 3) it is, all
little-endian::

    preamble        8 bytes (constant for this build; kept and compared verbatim)
    n_stream        u32  (1: meshd runs one sequence per context)
    cell_count      u32
    cells           cell_count x (pos i32, n_seq_id u32, seq_id i32 x n_seq_id)
    v_trans         u32  (1 unless flash attention stores V row-major)
    n_layer         u32
    per layer K:    type i32, row_bytes u64, cell_count x row_bytes
    per layer V:    v_trans=0: type i32, row_bytes u64, cell_count x row_bytes
                    v_trans=1: type i32, elem_bytes u32, n_embd_v u32,
                               n_embd_v rows of cell_count x elem_bytes

``parse_seq_state`` checks that layout end to end (every length must add up
to the blob exactly) and returns views of each layer's K and V, so they can
travel as typed tensors instead of one blob; ``build_seq_state`` is its exact
inverse. Only the *canonical* cell layout is accepted: positions 0..n-1, each
in exactly sequence 0, which is what llama-cpp-python's ``Llama`` produces.
Anything else (several streams, shared cells, holes) is refused at export with
``CacheStateUnsupported`` rather than guessed at: a different layout from a
newer llama.cpp must fail loudly, not be mis-sliced into plausible tensors.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CacheStateUnsupported

__all__ = ["GGML_TYPES", "LayerKV", "SeqState", "build_seq_state", "parse_seq_state"]

PREAMBLE_SIZE = 8
# ggml type id -> (name, bytes per element) for the cache types we can address
# element-wise. Quantized cache types (--cache-type-k q8_0 ...) are refused at
# export: their rows would need ggml block geometry checks we have not written.
GGML_TYPES: dict[int, tuple[str, int]] = {0: ("f32", 4), 1: ("f16", 2), 30: ("bf16", 2)}
_CELL = np.dtype([("pos", "<i4"), ("n_seq", "<u4"), ("seq", "<i4")])


@dataclass(frozen=True, slots=True, eq=False)
class LayerKV:
    """One layer's K and V bytes for ``n_cells`` cells (views, no copies)."""

    k_type: int
    v_type: int
    k_row_bytes: int  # bytes per cell of K (n_embd_k_gqa x element size)
    v_row_bytes: int  # bytes per cell of V
    k: memoryview  # [cell][n_embd_k_gqa]
    v: memoryview  # v_trans: [n_embd_v][cell], else [cell][n_embd_v]


@dataclass(frozen=True, slots=True, eq=False)
class SeqState:
    preamble: bytes
    n_cells: int
    v_trans: bool
    layers: tuple[LayerKV, ...]

    @property
    def kv_bytes(self) -> int:
        return sum(len(layer.k) + len(layer.v) for layer in self.layers)


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int, what: str) -> memoryview:
        end = self.offset + size
        if size < 0 or end > len(self.data):
            raise CacheStateUnsupported(f"llama.cpp state ends inside {what} (offset {self.offset})")
        view = self.data[self.offset : end]
        self.offset = end
        return view

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))


def _element_size(type_id: int, what: str) -> int:
    if type_id not in GGML_TYPES:
        raise CacheStateUnsupported(f"{what} has ggml type {type_id}; only f32/f16/bf16 caches are addressable")
    return GGML_TYPES[type_id][1]


def parse_seq_state(data: Any) -> SeqState:
    """Split a ``llama_state_seq_get_data`` blob into per-layer K/V views."""
    reader = _Reader(memoryview(data).cast("B"))
    preamble = bytes(reader.take(PREAMBLE_SIZE, "the preamble"))
    (n_stream,) = reader.unpack("<I", "n_stream")
    if n_stream != 1:
        raise CacheStateUnsupported(f"state has {n_stream} streams; one is supported")
    (n_cells,) = reader.unpack("<I", "cell_count")
    if n_cells == 0:
        # An empty sequence ends here: llama.cpp writes no layer data for it.
        if reader.offset != len(reader.data):
            raise CacheStateUnsupported("trailing bytes after an empty sequence")
        return SeqState(preamble, 0, False, ())
    cells = np.frombuffer(reader.take(n_cells * _CELL.itemsize, "the cell table"), dtype=_CELL)
    if not (
        np.array_equal(cells["pos"], np.arange(n_cells, dtype=np.int32))
        and bool(np.all(cells["n_seq"] == 1))
        and bool(np.all(cells["seq"] == 0))
    ):
        raise CacheStateUnsupported("cells are not positions 0..n-1 of sequence 0 alone")
    v_trans, n_layer = reader.unpack("<II", "the layer header")
    if v_trans not in (0, 1) or n_layer == 0:
        raise CacheStateUnsupported(f"implausible layer header v_trans={v_trans} n_layer={n_layer}")
    keys = []
    for il in range(n_layer):
        k_type, k_row = reader.unpack("<iQ", f"K header of layer {il}")
        size = _element_size(k_type, f"K of layer {il}")
        if k_row == 0 or k_row % size:
            raise CacheStateUnsupported(f"K row of layer {il} is {k_row} bytes")
        keys.append((k_type, k_row, reader.take(k_row * n_cells, f"K of layer {il}")))
    layers = []
    for il in range(n_layer):
        if v_trans:
            v_type, elem, n_embd_v = reader.unpack("<iII", f"V header of layer {il}")
            if elem != _element_size(v_type, f"V of layer {il}") or n_embd_v == 0:
                raise CacheStateUnsupported(f"V of layer {il}: element {elem} bytes, {n_embd_v} rows")
            v_row = elem * n_embd_v
        else:
            v_type, v_row = reader.unpack("<iQ", f"V header of layer {il}")
            size = _element_size(v_type, f"V of layer {il}")
            if v_row == 0 or v_row % size:
                raise CacheStateUnsupported(f"V row of layer {il} is {v_row} bytes")
        v = reader.take(v_row * n_cells, f"V of layer {il}")
        k_type, k_row, k = keys[il]
        layers.append(LayerKV(k_type, v_type, k_row, v_row, k, v))
    if reader.offset != len(reader.data):
        raise CacheStateUnsupported(f"{len(reader.data) - reader.offset} unexpected trailing bytes")
    return SeqState(preamble, n_cells, bool(v_trans), tuple(layers))


def seq_state_size(state: SeqState) -> int:
    if state.n_cells == 0:
        return PREAMBLE_SIZE + 8
    v_header = 12  # (i32, u32, u32) transposed or (i32, u64) row-major: both 12 bytes
    per_layer = 12 + v_header
    return PREAMBLE_SIZE + 8 + state.n_cells * _CELL.itemsize + 8 + len(state.layers) * per_layer + state.kv_bytes


def build_seq_state(state: SeqState) -> bytearray:
    """The exact inverse of ``parse_seq_state`` (one copy of the K/V bytes)."""
    if len(state.preamble) != PREAMBLE_SIZE:
        raise CacheStateUnsupported("preamble must be 8 bytes")
    out = bytearray(seq_state_size(state))
    offset = 0

    def put(fmt: str, *values: Any) -> None:
        nonlocal offset
        struct.pack_into(fmt, out, offset, *values)
        offset += struct.calcsize(fmt)

    def put_bytes(data: memoryview) -> None:
        nonlocal offset
        out[offset : offset + len(data)] = data
        offset += len(data)

    out[:PREAMBLE_SIZE] = state.preamble
    offset = PREAMBLE_SIZE
    put("<II", 1, state.n_cells)
    if state.n_cells == 0:
        return out
    cells = np.zeros(state.n_cells, dtype=_CELL)
    cells["pos"] = np.arange(state.n_cells, dtype=np.int32)
    cells["n_seq"] = 1
    put_bytes(memoryview(cells.tobytes()))
    put("<II", int(state.v_trans), len(state.layers))
    for layer in state.layers:
        if len(layer.k) != layer.k_row_bytes * state.n_cells:
            raise CacheStateUnsupported("K bytes do not match the cell count")
        put("<iQ", layer.k_type, layer.k_row_bytes)
        put_bytes(layer.k)
    for layer in state.layers:
        if len(layer.v) != layer.v_row_bytes * state.n_cells:
            raise CacheStateUnsupported("V bytes do not match the cell count")
        if state.v_trans:
            elem = _element_size(layer.v_type, "V")
            put("<iII", layer.v_type, elem, layer.v_row_bytes // elem)
        else:
            put("<iQ", layer.v_type, layer.v_row_bytes)
        put_bytes(layer.v)
    if offset != len(out):  # pragma: no cover - size arithmetic and writes disagree
        raise CacheStateUnsupported("internal size mismatch building the state")
    return out

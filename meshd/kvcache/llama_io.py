"""Export and import one sequence's KV cache on a live ``llama_cpp.Llama``.

Uses llama.cpp's per-sequence state API (``llama_state_seq_get_data`` /
``llama_state_seq_set_data`` on sequence 0, the one ``Llama`` decodes into)
rather than ``Llama.save_state``: the whole-context state of this llama.cpp
carries no logits either, and the per-sequence one leaves other sequences
alone. Blocking: call from the model's worker thread, like every other use
of the context (llama.cpp contexts are not thread-safe).

Logits are not part of any llama.cpp state, so an imported cache cannot be
sampled from directly. ``import_sequence`` leaves ``Llama`` in the state its
own ``load_state`` does (``_requires_eval``), and ``Llama.generate`` then
re-decodes just the last cached token to get fresh logits: a prefill of one
token instead of the whole prompt.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..modelid import FileFactsCache, ModelDescriptor
from .bundle import KVBundle, bundle_from_state, state_from_bundle
from .descriptor import BACKEND_LLAMA_CPP, FORMAT_VERSION, STATE_FORMAT, CacheDescriptor, prefix_sha256
from .errors import (
    CacheDescriptorMismatch,
    CacheImportFailed,
    CacheModelMismatch,
    CacheStateUnsupported,
)
from .seqstate import GGML_TYPES, build_seq_state, parse_seq_state

log = logging.getLogger(__name__)

__all__ = ["CacheIdentity", "ModelLayout", "export_sequence", "import_sequence", "model_layout"]

_SEQ = 0  # llama-cpp-python's Llama decodes everything into sequence 0


@dataclass(frozen=True, slots=True)
class CacheIdentity:
    """The model identity a cache is bound to: its id and the weights' file sha256."""

    model_id: str
    sha256: str

    @classmethod
    def from_descriptor(cls, descriptor: ModelDescriptor) -> CacheIdentity:
        if not descriptor.file_sha256:
            # Unknown weights can never be "the same": no cache may cross for them.
            raise CacheModelMismatch(f"model {descriptor.id!r} has no known file sha256")
        return cls(descriptor.id, descriptor.file_sha256)

    @classmethod
    def for_file(cls, model_id: str, path: Path, cache: FileFactsCache | None = None) -> CacheIdentity:
        """Blocking (hashes the file unless the facts cache knows it)."""
        return cls(model_id, (cache or FileFactsCache(None)).sha256(path))


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """What a receiving context's cache looks like, from the model and context params."""

    n_layer: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    k_dtype: str
    v_dtype: str
    v_trans: bool | None  # None: flash attention "auto", llama.cpp decides (and checks) itself
    n_vocab: int
    n_ctx: int


def _type_name(type_id: int, what: str) -> str:
    if type_id not in GGML_TYPES:
        raise CacheStateUnsupported(f"{what} cache type {type_id} is not f32/f16/bf16")
    return GGML_TYPES[type_id][0]


def model_layout(llama: Any) -> ModelLayout:
    import llama_cpp

    model = llama._model.model
    n_head = llama_cpp.llama_model_n_head(model)
    n_embd = llama_cpp.llama_model_n_embd(model)
    arch = llama.metadata.get("general.architecture", "")
    key_len = llama.metadata.get(f"{arch}.attention.key_length")
    value_len = llama.metadata.get(f"{arch}.attention.value_length")
    params = llama.context_params
    flash = int(params.flash_attn_type)
    return ModelLayout(
        n_layer=llama_cpp.llama_model_n_layer(model),
        n_head_kv=llama_cpp.llama_model_n_head_kv(model),
        head_dim_k=int(key_len) if key_len else n_embd // n_head,
        head_dim_v=int(value_len) if value_len else n_embd // n_head,
        k_dtype=_type_name(int(params.type_k), "K"),
        v_dtype=_type_name(int(params.type_v), "V"),
        v_trans=True if flash == 0 else False if flash == 1 else None,
        n_vocab=llama.n_vocab(),
        n_ctx=llama.n_ctx(),
    )


def _seq_state(llama: Any) -> memoryview:
    import llama_cpp

    ctx = llama._ctx.ctx
    size = llama_cpp.llama_state_seq_get_size(ctx, _SEQ)
    buffer = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, _SEQ)
    if written == 0:
        raise CacheStateUnsupported("llama.cpp wrote no sequence state")
    return memoryview(np.frombuffer(buffer, dtype=np.uint8)[:written])


def export_sequence(llama: Any, identity: CacheIdentity, *, wire: str = "raw") -> KVBundle:
    """The KV cache of everything ``llama`` has evaluated, as a ``KVBundle``.

    The token ids are ``Llama``'s own record of what is in the cache; the
    state must hold exactly that many cells, or nothing is exported.
    """
    tokens = tuple(int(t) for t in llama.input_ids[: llama.n_tokens])
    if not tokens:
        raise CacheStateUnsupported("nothing has been evaluated; there is no cache to export")
    layout = model_layout(llama)
    blob = _seq_state(llama)
    state = parse_seq_state(blob)
    if state.n_cells != len(tokens):
        raise CacheStateUnsupported(f"the cache holds {state.n_cells} cells for {len(tokens)} tokens")
    sizes = dict(GGML_TYPES.values())  # dtype name -> bytes per element
    k_size, v_size = sizes[layout.k_dtype], sizes[layout.v_dtype]
    for il, layer in enumerate(state.layers):
        # Uniform layers only: the descriptor has one head layout for all of them.
        if (layer.k_row_bytes != layout.n_head_kv * layout.head_dim_k * k_size
                or layer.v_row_bytes != layout.n_head_kv * layout.head_dim_v * v_size
                or GGML_TYPES[layer.k_type][0] != layout.k_dtype
                or GGML_TYPES[layer.v_type][0] != layout.v_dtype):
            raise CacheStateUnsupported(f"layer {il} does not have the model-wide head layout")
    if len(state.layers) != layout.n_layer:
        raise CacheStateUnsupported(f"state has {len(state.layers)} layers, the model {layout.n_layer}")
    base = CacheDescriptor(
        format_version=FORMAT_VERSION, backend=BACKEND_LLAMA_CPP, state_format=STATE_FORMAT,
        state_preamble=state.preamble, model_id=identity.model_id, model_sha256=identity.sha256,
        token_ids=tokens, prefix_sha256=prefix_sha256(tokens), n_layer=layout.n_layer,
        n_head_kv=layout.n_head_kv, head_dim_k=layout.head_dim_k, head_dim_v=layout.head_dim_v,
        k_dtype=layout.k_dtype, v_dtype=layout.v_dtype, v_trans=state.v_trans, wire=wire, tensors=(),
    )
    return bundle_from_state(state, base, wire)


def check_compatible(descriptor: CacheDescriptor, identity: CacheIdentity, layout: ModelLayout) -> None:
    """Every check a cache must pass before it may touch this context."""
    d = descriptor
    if d.model_sha256 != identity.sha256:
        raise CacheModelMismatch(
            f"cache of model {d.model_id!r} (sha256 {d.model_sha256[:12]}…) does not match "
            f"{identity.model_id!r} (sha256 {identity.sha256[:12]}…)"
        )
    mine = (layout.n_layer, layout.n_head_kv, layout.head_dim_k, layout.head_dim_v, layout.k_dtype, layout.v_dtype)
    theirs = (d.n_layer, d.n_head_kv, d.head_dim_k, d.head_dim_v, d.k_dtype, d.v_dtype)
    if mine != theirs:
        raise CacheDescriptorMismatch(f"cache layout {theirs} is not this context's {mine}")
    if layout.v_trans is not None and layout.v_trans != d.v_trans:
        raise CacheDescriptorMismatch(f"cache has v_trans={d.v_trans}, this context {layout.v_trans}")
    if d.n_tokens >= layout.n_ctx:
        raise CacheDescriptorMismatch(f"cache of {d.n_tokens} tokens leaves no room in a {layout.n_ctx} context")
    if max(d.token_ids) >= layout.n_vocab:
        raise CacheDescriptorMismatch("cache names token ids outside this model's vocabulary")


def import_sequence(llama: Any, bundle: KVBundle, identity: CacheIdentity) -> int:
    """Replace ``llama``'s sequence with the bundle's cache; returns the tokens loaded.

    Every check runs before llama.cpp is given a byte. If llama.cpp still
    refuses the state, the sequence is left empty and ``CacheImportFailed``
    raised: the caller re-prefills.
    """
    import llama_cpp

    d = bundle.descriptor
    check_compatible(d, identity, model_layout(llama))
    preamble = _preamble(llama)
    if preamble != d.state_preamble:
        raise CacheDescriptorMismatch(f"state preamble {d.state_preamble.hex()} is not this build's {preamble.hex()}")
    blob = build_seq_state(state_from_bundle(bundle))
    _clear(llama)
    buffer = (ctypes.c_uint8 * len(blob)).from_buffer(blob)
    loaded = llama_cpp.llama_state_seq_set_data(llama._ctx.ctx, buffer, len(blob), _SEQ)
    if loaded != len(blob):
        _clear(llama)
        raise CacheImportFailed(f"llama.cpp read {loaded} of {len(blob)} state bytes")
    n = d.n_tokens
    llama.input_ids[:n] = d.token_ids
    llama.n_tokens = n
    # As Llama.load_state does: the logits are not restored, so the next
    # generate() must decode (at least the last token) before sampling.
    llama._requires_eval = True
    log.debug("kv cache imported", extra={"fields": {"tokens": n, "bytes": len(blob), "wire": d.wire}})
    return n


_PREAMBLES: dict[int, bytes] = {}  # llama_model pointer -> the 8 leading bytes of its state


def _preamble(llama: Any) -> bytes:
    """This build's state preamble, read without disturbing the context (once per model)."""
    key = int(llama._model.model or 0)
    if key not in _PREAMBLES:
        # The whole sequence state is copied once; later imports reuse the bytes.
        _PREAMBLES[key] = bytes(_seq_state(llama)[:8])
    return _PREAMBLES[key]


def _clear(llama: Any) -> None:
    llama._ctx.kv_cache_seq_rm(-1, 0, -1)
    llama.n_tokens = 0
    llama._requires_eval = True

"""KV-cache mobility: describe, export, ship and import a sequence's KV cache.

Layers, bottom up (see docs/kvcache.md):

- ``descriptor``: the canonical ``CacheDescriptor`` (model identity, token ids,
  layout, dtypes, backend state format, tensor table), strictly validated;
- ``seqstate``: llama.cpp's per-sequence state bytes <-> per-layer K/V views;
- ``bundle``: ``KVBundle`` (descriptor + wire arrays, optional q8_0) and its
  checksummed ``meshd_native`` envelope stream (``pack``/``BundleAssembler``);
- ``llama_io``: export from / import into a live ``llama_cpp.Llama``;
- ``prefix``: the per-node byte-bounded LRU prefix cache, and ``engine_hook``,
  the llama engine's restore-before / store-after use of it;
- ``channel``: a cache on a mesh ``cache`` channel (offer, checks, byte stream);
- ``planner``: cache-aware placement (local hit, pull, or re-prefill);
- ``transfer``: ``CacheTransfers``, cache channels on live mesh links (push, pull);
- ``drain``: hand every cached conversation to peers before stopping.

``descriptor``, ``seqstate``, ``bundle``, ``prefix``, ``channel`` and ``planner``
are sans-IO; ``llama_io`` and ``engine_hook`` touch llama.cpp (worker thread
only); ``transfer`` and ``drain`` are the thin asyncio layer.
"""

from .bundle import BundleAssembler, KVBundle, bundle_from_state, pack, state_from_bundle, truncate
from .channel import CacheStreamReceiver, cache_stream, check_offer, offer_for
from .descriptor import (
    BACKEND_LLAMA_CPP,
    FORMAT_VERSION,
    STATE_FORMAT,
    WIRE_FORMATS,
    CacheDescriptor,
    TensorEntry,
    prefix_sha256,
)
from .drain import DrainReport, drain_caches, drain_targets
from .engine_hook import LlamaPrefixHook
from .errors import (
    CacheChecksumMismatch,
    CacheDescriptorInvalid,
    CacheDescriptorMismatch,
    CacheImportFailed,
    CacheModelMismatch,
    CacheStateUnsupported,
    CacheTransferError,
    KVCacheError,
)
from .events import CacheEvent, CacheReceived, CacheRejected, CacheSent, PrefixRestored, PrefixStored
from .llama_io import CacheIdentity, ModelLayout, export_sequence, import_sequence, model_layout
from .planner import CachePlan, Holding, find_holders, plan_cache
from .prefix import PrefixAnnouncement, PrefixCache, PrefixCacheStats, PrefixHit
from .seqstate import LayerKV, SeqState, build_seq_state, parse_seq_state
from .transfer import CacheTransfers

__all__ = [
    "BACKEND_LLAMA_CPP",
    "FORMAT_VERSION",
    "STATE_FORMAT",
    "WIRE_FORMATS",
    "BundleAssembler",
    "CacheChecksumMismatch",
    "CacheDescriptor",
    "CacheDescriptorInvalid",
    "CacheDescriptorMismatch",
    "CacheEvent",
    "CacheIdentity",
    "CacheImportFailed",
    "CacheModelMismatch",
    "CachePlan",
    "CacheReceived",
    "CacheRejected",
    "CacheSent",
    "CacheStateUnsupported",
    "CacheStreamReceiver",
    "CacheTransferError",
    "CacheTransfers",
    "DrainReport",
    "Holding",
    "KVBundle",
    "KVCacheError",
    "LayerKV",
    "LlamaPrefixHook",
    "ModelLayout",
    "PrefixAnnouncement",
    "PrefixCache",
    "PrefixCacheStats",
    "PrefixHit",
    "PrefixRestored",
    "PrefixStored",
    "SeqState",
    "TensorEntry",
    "build_seq_state",
    "bundle_from_state",
    "cache_stream",
    "check_offer",
    "drain_caches",
    "drain_targets",
    "export_sequence",
    "find_holders",
    "import_sequence",
    "model_layout",
    "offer_for",
    "pack",
    "parse_seq_state",
    "plan_cache",
    "prefix_sha256",
    "state_from_bundle",
    "truncate",
]

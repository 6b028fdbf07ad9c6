"""The llama backend's use of the prefix cache: restore before a request, store after.

Kept out of ``llama_engine.py`` so the engine only calls two methods. Both
run on the model's worker thread, with the context, like everything else
that touches it. Neither ever fails a request: any ``KVCacheError`` is
logged and the request falls back to a full prefill (restore) or is simply
not cached (store).

Reproducibility trade-off: a restored prefix means only the suffix is
decoded, and llama.cpp is not bit-for-bit batch-invariant in every
configuration (CPU flash attention is not; see docs/kvcache.md), so at
temperature 0 a cached request can, rarely, continue differently from a
fresh one. That is why the engine keeps no cache unless one is configured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from .errors import KVCacheError
from .events import CacheEvent, CacheRejected, PrefixRestored, PrefixStored
from .llama_io import CacheIdentity, export_sequence, import_sequence
from .prefix import PrefixAnnouncement, PrefixCache

log = logging.getLogger(__name__)

__all__ = ["LlamaPrefixHook"]


class LlamaPrefixHook:
    def __init__(self, cache: PrefixCache, identity: Callable[[], CacheIdentity],
                 on_event: Callable[[CacheEvent], None] | None = None) -> None:
        self.cache = cache
        # Called on the worker thread: forward with call_soon_threadsafe if it touches the loop.
        self._on_event = on_event or (lambda event: None)
        self._identity_fn = identity
        self._identity: CacheIdentity | None = None
        self.last_restored = 0  # tokens restored for the latest request (0: full prefill)

    def identity(self) -> CacheIdentity:
        # Lazily: hashing the model file is slow the first time (FileFactsCache remembers it).
        if self._identity is None:
            self._identity = self._identity_fn()
        return self._identity

    def restore(self, llama: Any, prompt: Sequence[int]) -> int:
        """Import the longest cached prefix of ``prompt`` (leaving at least one token to decode)."""
        self.last_restored = 0
        if len(prompt) < 2:
            return 0
        try:
            identity = self.identity()
            hit = self.cache.lookup(identity.sha256, prompt, max_tokens=len(prompt) - 1)
            if hit is None:
                return 0
            started = time.perf_counter()
            restored = import_sequence(llama, hit.bundle, identity)
        except KVCacheError as exc:
            log.warning("prefix cache not used; prefilling in full",
                        extra={"fields": {"code": exc.code, "error": str(exc)}})
            self._on_event(CacheRejected(None, exc.code, str(exc)))
            llama.reset()
            return 0
        self.last_restored = restored
        elapsed = time.perf_counter() - started
        log.debug("prefix cache hit", extra={"fields": {
            "tokens": restored, "prompt_tokens": len(prompt), "import_s": round(elapsed, 4)}})
        self._on_event(PrefixRestored(restored, len(prompt), elapsed))
        return restored

    def store(self, llama: Any) -> bool:
        """Keep what the context now holds (prompt and evaluated completion)."""
        if llama.n_tokens < self.cache.min_tokens:
            return False
        try:
            bundle = export_sequence(llama, self.identity())
            if not self.cache.put(bundle):
                return False
        except KVCacheError as exc:
            log.warning("conversation not cached", extra={"fields": {"code": exc.code, "error": str(exc)}})
            return False
        d = bundle.descriptor
        self._on_event(PrefixStored(d.prefix_sha256, d.n_tokens, d.wire_bytes))
        return True

    def announcements(self) -> list[PrefixAnnouncement]:
        return self.cache.announcements()

"""The per-node prefix cache: recent conversations' KV caches, LRU, bounded by bytes.

Keyed by (model file sha256, prefix hash of the token ids). A lookup finds the
entry sharing the *longest common prefix* with a prompt, not only exact
prefixes: a chat's next turn rarely extends the previous prompt token for
token (the template closes the assistant turn, re-tokenization differs), but
causal attention makes the shared part of a cache valid on its own, so the
entry is truncated to it (``bundle.truncate``).

Thread-safe: the backend's worker thread stores and looks up; the event loop
reads ``announcements()`` for capability announcements and, later, serves
entries to peers over the ``cache`` channel.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .bundle import KVBundle, truncate

log = logging.getLogger(__name__)

__all__ = ["PrefixAnnouncement", "PrefixCache", "PrefixCacheStats", "PrefixHit"]


@dataclass(frozen=True, slots=True)
class PrefixAnnouncement:
    """What a node says it holds: enough for a router to test "does my prompt extend it"."""

    model_id: str
    model_sha256: str
    prefix_sha256: str
    token_count: int
    nbytes: int

    def to_dict(self) -> dict[str, object]:
        return {"model": self.model_id, "model_sha256": self.model_sha256, "prefix_sha256": self.prefix_sha256,
                "token_count": self.token_count, "nbytes": self.nbytes}


@dataclass(frozen=True, slots=True, eq=False)
class PrefixHit:
    bundle: KVBundle  # already truncated to the shared prefix
    shared_tokens: int
    entry_tokens: int


@dataclass(slots=True)
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    stored: int = 0
    evicted: int = 0
    superseded: int = 0  # dropped because a longer entry of the same conversation arrived
    refused: int = 0  # larger than the whole budget


@dataclass(slots=True, eq=False)
class _Entry:
    bundle: KVBundle
    tokens: np.ndarray  # int32, for fast common-prefix comparison
    nbytes: int
    stored_at: float


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class PrefixCache:
    """Byte-bounded LRU of ``KVBundle``s (raw wire form, as exported)."""

    def __init__(self, max_bytes: int, *, min_tokens: int = 16, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens  # shorter shared prefixes are not worth an import
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()  # LRU first
        self._bytes = 0
        self.stats = PrefixCacheStats()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, bundle: KVBundle) -> bool:
        """Keep ``bundle`` as most recently used; evicts LRU entries to fit. False if it never fits."""
        d = bundle.descriptor
        size = d.wire_bytes
        if size > self.max_bytes or d.n_tokens < self.min_tokens:
            with self._lock:
                self.stats.refused += 1
            return False
        tokens = np.asarray(d.token_ids, dtype=np.int32)
        key = (d.model_sha256, d.prefix_sha256)
        with self._lock:
            # An entry that is a prefix of the new one is the same conversation,
            # earlier: the new entry serves every prompt the old one could.
            for other_key, other in list(self._entries.items()):
                if other_key[0] == key[0] and len(other.tokens) <= len(tokens) and \
                        common_prefix(other.tokens, tokens) == len(other.tokens):
                    self._drop(other_key)
                    self.stats.superseded += 1
            while self._bytes + size > self.max_bytes and self._entries:
                old_key = next(iter(self._entries))
                self._drop(old_key)
                self.stats.evicted += 1
            self._entries[key] = _Entry(bundle, tokens, size, self._clock())
            self._bytes += size
            self.stats.stored += 1
        return True

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes

    def lookup(self, model_sha256: str, prompt: Sequence[int], *, max_tokens: int | None = None) -> PrefixHit | None:
        """The entry sharing the longest prefix with ``prompt`` (at least ``min_tokens``), truncated to it.

        ``max_tokens`` caps the shared length (the engine passes ``len(prompt) - 1``
        so there is always a token left to decode for fresh logits; a cache
        covering the whole prompt would be replayed one token shorter anyway).
        """
        tokens = np.asarray(prompt, dtype=np.int32)
        limit = len(tokens) if max_tokens is None else min(max_tokens, len(tokens))
        with self._lock:
            best: tuple[int, tuple[str, str]] | None = None
            for key, entry in self._entries.items():
                if key[0] != model_sha256:
                    continue
                shared = min(common_prefix(entry.tokens, tokens), limit)
                if shared >= self.min_tokens and (best is None or shared > best[0]):
                    best = (shared, key)
            if best is None:
                self.stats.misses += 1
                return None
            shared, key = best
            self._entries.move_to_end(key)
            entry = self._entries[key]
            self.stats.hits += 1
        return PrefixHit(truncate(entry.bundle, shared), shared, len(entry.tokens))

    def get(self, model_sha256: str, prefix_sha256: str) -> KVBundle | None:
        """An entry by its announced key (for a peer's ``cache_request``)."""
        with self._lock:
            entry = self._entries.get((model_sha256, prefix_sha256))
            if entry is None:
                return None
            self._entries.move_to_end((model_sha256, prefix_sha256))
            return entry.bundle

    def pop_all(self) -> list[KVBundle]:
        """Every entry, most recently used first, leaving the cache empty (for drain)."""
        with self._lock:
            bundles = [e.bundle for e in reversed(self._entries.values())]
            self._entries.clear()
            self._bytes = 0
        return bundles

    def announcements(self) -> list[PrefixAnnouncement]:
        """Most recently used first."""
        with self._lock:
            return [
                PrefixAnnouncement(e.bundle.descriptor.model_id, key[0], key[1], len(e.tokens), e.nbytes)
                for key, e in reversed(self._entries.items())
            ]

"""What happened to KV caches, as typed events (frozen, past tense).

``CacheTransfers`` and ``LlamaPrefixHook`` report through an optional
``on_event`` callback, so the daemon can forward them to the telemetry bus
and the routing decision log without this package knowing either.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CacheEvent", "CacheReceived", "CacheRejected", "CacheSent", "PrefixRestored", "PrefixStored"]


@dataclass(frozen=True, slots=True)
class CacheEvent:
    pass


@dataclass(frozen=True, slots=True)
class CacheSent(CacheEvent):
    """A peer verified and kept a cache we pushed, or we served its pull."""

    peer: str
    prefix_sha256: str
    tokens: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class CacheReceived(CacheEvent):
    """A cache from a peer passed every check (pushed to us, or pulled by us)."""

    peer: str
    model_sha256: str
    prefix_sha256: str
    tokens: int
    nbytes: int
    wire: str


@dataclass(frozen=True, slots=True)
class CacheRejected(CacheEvent):
    """A cache was refused or failed its checks; the request falls back to re-prefill."""

    peer: str | None
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class PrefixRestored(CacheEvent):
    """The engine loaded a cached prefix: only ``prompt_tokens - tokens`` were prefilled."""

    tokens: int
    prompt_tokens: int
    import_s: float


@dataclass(frozen=True, slots=True)
class PrefixStored(CacheEvent):
    """A finished request's conversation was kept in the prefix cache."""

    prefix_sha256: str
    tokens: int
    nbytes: int

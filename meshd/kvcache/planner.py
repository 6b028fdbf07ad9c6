"""Cache-aware placement, as pure functions the router can call (sans-IO, no state).

Given the prefixes each node announces (``PrefixAnnouncement``), a prompt's
token ids and measured speeds, decide where a request's KV cache is and what
to do about it:

- ``find_holders``: which nodes hold a prefix of this prompt, longest first;
- ``plan_cache``: for the node the request is going to, use its own cache
  (``local``), pull the cache from a holder (``pull``) when the estimated
  transfer time beats re-prefilling the tokens it covers, or ``prefill``.

The estimate is deliberately simple and says what it assumed (``reason``):
transfer = bytes / measured link throughput + a fixed import overhead;
prefill = cached tokens / measured prefill tokens per second. Prefill cost
grows faster than linearly with context, so this under-estimates the gain
for long prompts; scripts/bench-kv measures the real ratios.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .descriptor import prefix_sha256
from .prefix import PrefixAnnouncement

__all__ = ["CachePlan", "Holding", "find_holders", "plan_cache"]


@dataclass(frozen=True, slots=True)
class Holding:
    node_id: str
    announcement: PrefixAnnouncement


@dataclass(frozen=True, slots=True)
class CachePlan:
    action: Literal["local", "pull", "prefill"]
    holder: str | None  # the node to pull from (``pull``), or the target itself (``local``)
    cached_tokens: int
    prefix_sha256: str | None
    transfer_s: float | None
    prefill_s: float | None
    reason: str

    def header(self) -> str:
        """A compact value for a route header / event field."""
        if self.action == "prefill":
            return "prefill"
        return f"{self.action};node={self.holder};tokens={self.cached_tokens}"


def find_holders(
    prompt: Sequence[int], model_sha256: str, announced: Mapping[str, Sequence[PrefixAnnouncement]]
) -> list[Holding]:
    """Nodes holding a prefix of ``prompt`` for these weights, longest prefix first.

    A prefix must leave at least one prompt token to decode (logits are never
    part of a cache), so an announcement covering the whole prompt or more
    does not count here; the engine's own lookup can still truncate it.
    """
    hashes: dict[int, str] = {}
    found: list[Holding] = []
    for node_id, items in announced.items():
        for item in items:
            count = item.token_count
            if item.model_sha256 != model_sha256 or not 0 < count < len(prompt):
                continue
            if count not in hashes:
                hashes[count] = prefix_sha256(prompt[:count])
            if hashes[count] == item.prefix_sha256:
                found.append(Holding(node_id, item))
    found.sort(key=lambda h: (-h.announcement.token_count, h.node_id))
    return found


def plan_cache(
    prompt: Sequence[int],
    model_sha256: str,
    target: str,
    announced: Mapping[str, Sequence[PrefixAnnouncement]],
    *,
    prefill_tokens_per_s: float | None,
    link_bytes_per_s: Mapping[str, float],
    import_overhead_s: float = 0.05,
) -> CachePlan:
    holders = find_holders(prompt, model_sha256, announced)
    if not holders:
        return CachePlan("prefill", None, 0, None, None, None, "no node holds a prefix of this prompt")
    local = next((h for h in holders if h.node_id == target), None)
    best = holders[0]
    if local is not None and local.announcement.token_count >= best.announcement.token_count:
        a = local.announcement
        return CachePlan("local", target, a.token_count, a.prefix_sha256, 0.0, None, "the target holds the longest prefix")
    a = best.announcement
    throughput = link_bytes_per_s.get(best.node_id)
    if not throughput or not prefill_tokens_per_s:
        return CachePlan("prefill", None, 0, None, None, None,
                         "no measured link throughput or prefill speed to justify a pull")
    transfer = a.nbytes / throughput + import_overhead_s
    saved_tokens = a.token_count - (local.announcement.token_count if local else 0)
    prefill = saved_tokens / prefill_tokens_per_s
    if transfer < prefill:
        return CachePlan("pull", best.node_id, a.token_count, a.prefix_sha256, transfer, prefill,
                         f"transfer {transfer:.3f}s < prefill {prefill:.3f}s of {saved_tokens} tokens")
    if local is not None:
        la = local.announcement
        return CachePlan("local", target, la.token_count, la.prefix_sha256, 0.0, prefill,
                         f"pulling the longer prefix would take {transfer:.3f}s >= {prefill:.3f}s")
    return CachePlan("prefill", None, 0, None, transfer, prefill,
                     f"transfer {transfer:.3f}s >= prefill {prefill:.3f}s of {saved_tokens} tokens")

"""Drain: hand every cached conversation to peers before this node stops.

``drain_targets`` picks the peers that may take a cache: trusted with the
``cache`` role *and* serving the identical weights (file sha256, as their
capability announcements state). ``drain_caches`` empties the prefix cache
and pushes each conversation, most recently used first, to one of them
(round robin; the next target if one fails), so warm conversations survive
an upgrade. What could not be placed is reported, never silently dropped.

The daemon's part (stop admitting requests, finish in-flight ones, then call
this, then exit; ``meshctl drain`` and SIGTERM when configured) lives with
the composition root.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .bundle import KVBundle
from .errors import KVCacheError
from .prefix import PrefixCache
from .transfer import CacheTransfers

log = logging.getLogger(__name__)

__all__ = ["DrainReport", "drain_caches", "drain_targets"]


@dataclass
class DrainReport:
    moved: list[tuple[str, str, int]] = field(default_factory=list)  # (peer, prefix sha256, tokens)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (prefix sha256, last error)


def drain_targets(peers: Iterable[tuple[str, Sequence[Mapping[str, Any]]]], model_sha256: str,
                  may_cache: Callable[[str], bool]) -> list[str]:
    """Node ids (sorted) trusted with ``cache`` that announce a model with these weights.

    ``peers`` is ``(node_id, announced models)``; a model entry carries its
    ``sha256`` (``meshctl peers`` shows the same field).
    """
    out = [node_id for node_id, models in peers
           if may_cache(node_id) and any(m.get("sha256") == model_sha256 for m in models)]
    return sorted(out)


async def drain_caches(cache: PrefixCache, links: Sequence[Any], transfers: CacheTransfers) -> DrainReport:
    """Push every cached conversation to one of ``links`` (already filtered by ``drain_targets``)."""
    report = DrainReport()
    bundles: list[KVBundle] = cache.pop_all()
    for index, bundle in enumerate(bundles):
        d = bundle.descriptor
        last_error = "no peer may take this cache"
        for attempt in range(len(links)):
            link = links[(index + attempt) % len(links)]
            try:
                await transfers.push(link, bundle)
            except KVCacheError as exc:
                last_error = f"{link.node_id}: {exc.code}: {exc}"
                continue
            report.moved.append((str(link.node_id), d.prefix_sha256, d.n_tokens))
            break
        else:
            report.failed.append((d.prefix_sha256, last_error))
            log.warning("cached conversation not handed over", extra={"fields": {
                "prefix_sha256": d.prefix_sha256, "tokens": d.n_tokens, "error": last_error}})
    log.info("drained kv caches", extra={"fields": {"moved": len(report.moved), "failed": len(report.failed)}})
    return report

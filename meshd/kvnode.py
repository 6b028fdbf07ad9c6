"""The daemon's KV-cache wiring: the prefix cache on the mesh, in announcements, and at drain.

``meshd/kvcache/`` holds the mechanisms (sans-IO pieces, ``CacheTransfers``,
``drain_caches``); this module only connects them to this node's llama.cpp
backend and mesh service, so ``daemon.py`` stays a composition root:

- ``handler(mux)``: cache channels first (``CacheTransfers.handle``), every
  other session event to the request multiplexer. A pushed cache is verified
  against the local weights and lands in the prefix cache, where the engine's
  hook restores it when that conversation's next turn arrives;
- ``announce(sha256)``: the newest cached prefixes of one model, capped, for the
  capability payload (peers and routers test "does my prompt extend it");
- ``drain(mesh)``: every cached conversation to a peer trusted with ``cache``
  that announces the same weights;
- ``plan(request, candidates)``: the dispatcher's cache-aware step: when a
  candidate announces a prefix of the prompt longer than the chosen node
  holds, and is not much busier, it goes first (its cache then saves the
  prefill). When the request stays here instead (the holder is busy, or not
  trusted to serve but trusted with ``cache``), the cache is pulled first if
  ``plan_cache`` estimates the transfer (bytes / link throughput measured on
  earlier pulls, ``kvcache.link_mb_s`` until then) beats re-prefilling at this
  node's measured prefill speed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .config import KvCacheConfig
from .errors import MeshdError
from .kvcache import (
    CacheTransfers,
    DrainReport,
    KVBundle,
    KVCacheError,
    PrefixAnnouncement,
    PrefixCache,
    bundle_from_state,
    drain_caches,
    drain_targets,
    find_holders,
    state_from_bundle,
)
from .logs import fields

log = logging.getLogger(__name__)

__all__ = ["ANNOUNCED_PREFIXES", "DRAIN_TIMEOUT_S", "HOLDER_SLACK", "KvNode", "peer_announcements"]


def peer_announcements(models: Any, sha256: str) -> list[PrefixAnnouncement]:
    """A peer's announced prefixes for these weights; malformed entries are ignored (peer data)."""
    out: list[PrefixAnnouncement] = []
    for model in models if isinstance(models, list) else []:
        if not isinstance(model, dict) or model.get("sha256") != sha256:
            continue
        for item in model.get("kv_prefixes") or []:
            try:
                out.append(PrefixAnnouncement(str(model.get("id")), sha256, str(item["prefix_sha256"]),
                                              int(item["token_count"]), int(item["nbytes"])))
            except (TypeError, KeyError, ValueError):
                continue
    return out

# Prefixes per model in a capability announcement: the announcement is signed
# and re-sent on every change, so it stays small; the newest are the likeliest hits.
ANNOUNCED_PREFIXES = 16
# A holder may be this much busier (in router score units: about one queued request)
# than the chosen node and still be preferred: its cache saves a whole prefill.
HOLDER_SLACK = 1.0
DRAIN_TIMEOUT_S = 120.0  # per model: a peer that stops reading cannot hold up the exit forever
PULL_TIMEOUT_FLOOR_S = 2.0  # a pull may take 4x its estimate, and at least this long


class KvNode:
    def __init__(self, config: KvCacheConfig, backend: Any) -> None:
        """``backend`` is the LlamaCppBackend whose ``prefix_cache`` is not None."""
        self.config = config
        self.backend = backend
        self.mesh: Any = None  # MeshService, set once it exists (plan reads peers' announcements)
        self.cache: PrefixCache = backend.prefix_cache
        self.link_rates: dict[str, float] = {}  # peer -> bytes/s measured on cache pulls (averaged)
        self.transfers = CacheTransfers(
            backend.cache_identity,
            store=self._store,
            lookup=self.cache.get,
            max_bytes=config.max_bytes,
        )

    def _store(self, peer: str, bundle: KVBundle) -> None:
        # PrefixCache.put is cheap and thread-safe: fine on the event loop.
        if not self.cache.put(bundle):
            log.info("pushed kv cache not kept (too small or over kvcache.max_bytes)",
                     extra=fields(peer=peer, tokens=bundle.descriptor.n_tokens))

    def handler(self, mux: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        def handle(link: Any, event: Any) -> None:
            if not self.transfers.handle(link, event):
                mux(link, event)

        return handle

    def announce(self, sha256: str | None) -> list[dict]:
        return self.backend.prefix_announcements(sha256, ANNOUNCED_PREFIXES)

    def _for_wire(self, bundle: KVBundle) -> KVBundle:
        if self.config.wire_format == "raw" or bundle.descriptor.wire == self.config.wire_format:
            return bundle
        try:
            return bundle_from_state(state_from_bundle(bundle), bundle.descriptor, wire=self.config.wire_format)
        except KVCacheError as exc:
            log.warning("kv cache sent raw: cannot convert it", extra=fields(code=exc.code, error=str(exc)))
            return bundle

    async def drain(self, mesh: Any) -> DrainReport:
        """Empty the prefix cache into trusted peers with the same weights; what cannot move is reported."""
        from identity import NodeId

        def may_cache(node_id: str) -> bool:
            return bool(mesh.trust.allows(NodeId.parse(node_id), "cache"))

        report = DrainReport()
        by_model: dict[str, list[KVBundle]] = {}
        for bundle in self.cache.pop_all():  # most recently used first
            by_model.setdefault(bundle.descriptor.model_sha256, []).append(bundle)
        connected = [(str(r.node_id), r.models) for r in mesh.table.peers() if r.node_id in mesh.active]
        for sha256, bundles in by_model.items():
            targets = drain_targets(connected, sha256, may_cache)
            links = [mesh.active[NodeId.parse(t)] for t in targets]
            if not links:
                why = "no connected peer trusted with cache serves these weights"
                for b in bundles:
                    report.failed.append((b.descriptor.prefix_sha256, why))
                    log.warning("cached conversation not handed over", extra=fields(
                        prefix_sha256=b.descriptor.prefix_sha256, tokens=b.descriptor.n_tokens, error=why))
                continue
            # drain_caches takes a cache: a private one per model, filled oldest first
            # so that it pushes the most recent conversation first, as ours would.
            staging = PrefixCache(sum(b.descriptor.wire_bytes for b in bundles) + 1, min_tokens=1)
            for bundle in reversed(bundles):
                staging.put(self._for_wire(bundle))
            try:
                part = await asyncio.wait_for(drain_caches(staging, links, self.transfers), DRAIN_TIMEOUT_S)
            except TimeoutError:
                report.failed.append((sha256, f"drain timed out after {DRAIN_TIMEOUT_S:.0f}s"))
                continue
            report.moved += part.moved
            report.failed += part.failed
        return report

    async def plan(self, request: Any, candidates: list[Any]) -> tuple[list[Any], str | None]:
        """Candidates reordered towards a holder of the prompt's longest cached prefix, and a header value.

        When the request stays here and a peer holds a longer prefix, the cache is
        pulled first if moving it is estimated to beat re-prefilling (``_pull``).
        """
        from .routing.router import LOCAL

        identity = self.backend.cache_identity(request.model)
        mesh = self.mesh
        if identity is None or mesh is None:
            log.debug("no kv-cache planning", extra=fields(request_id=request.request_id, model=request.model,
                                                            identity=identity is not None))
            return candidates, None  # the prompt cannot be tokenized here, or no peers
        announced = self._announced(identity.sha256, candidates)
        if not any(announced.values()):
            log.debug("no node announces a cached prefix", extra=fields(
                request_id=request.request_id, candidates=",".join(_short(c.target) for c in candidates)))
            return candidates, None
        try:
            prompt = await asyncio.to_thread(self.backend.prompt_tokens, request)
        except MeshdError:  # the local model is loading or failed: plan without it
            return candidates, None
        holders = find_holders(prompt, identity.sha256, announced)
        if not holders:
            log.debug("no node holds a prefix of this prompt", extra=fields(
                request_id=request.request_id, prompt_tokens=len(prompt),
                announced=",".join(f"{_short(t)}:{a.token_count}" for t, items in announced.items() for a in items)))
            return candidates, None
        best = holders[0]
        tokens = best.announcement.token_count
        chosen = candidates[0]
        if best.node_id == chosen.target:
            return candidates, f"hit;node={_short(best.node_id)};tokens={tokens}"
        holder = next((c for c in candidates if c.target == best.node_id), None)
        if holder is not None and holder.score <= chosen.score + HOLDER_SLACK:
            log.info("routing to the holder of the prompt's kv cache", extra=fields(
                request_id=request.request_id, holder=best.node_id, tokens=tokens, instead_of=chosen.target))
            return [holder, *(c for c in candidates if c is not holder)], \
                f"prefer;node={_short(best.node_id)};tokens={tokens}"
        why = "holder_busy" if holder is not None else "holder_not_serving"
        if chosen.target == LOCAL and best.node_id != LOCAL:
            pulled = await self._pull(request, identity.sha256, prompt, announced)
            if pulled is not None:
                return candidates, pulled
        return candidates, f"prefill;holder={_short(best.node_id)};tokens={tokens};{why}"

    def _announced(self, sha256: str, candidates: list[Any]) -> dict[str, list[PrefixAnnouncement]]:
        """Prefixes of these weights announced by the candidates and by peers we may pull caches from."""
        from identity import NodeId

        from .routing.router import LOCAL

        mesh = self.mesh
        announced: dict[str, list[PrefixAnnouncement]] = {}
        for candidate in candidates:
            if candidate.target == LOCAL:
                announced[LOCAL] = [a for a in self.cache.announcements() if a.model_sha256 == sha256]
        for node_id in list(mesh.active):
            peer = str(node_id)
            record = mesh.table.get(node_id)
            serving = any(c.target == peer and c.identity == sha256 for c in candidates)
            if record is not None and (serving or mesh.trust.allows(NodeId.parse(peer), "cache")):
                announced[peer] = peer_announcements(record.models, sha256)
        return announced

    def link_throughput(self, peer: str) -> tuple[float, bool]:
        """Bytes/s to expect from ``peer``: measured on an earlier pull, else the configured assumption."""
        measured = self.link_rates.get(peer)
        return (measured, True) if measured else (self.config.link_mb_s * 1e6, False)

    async def _pull(self, request: Any, sha256: str, prompt: list[int],
                    announced: dict[str, list[PrefixAnnouncement]]) -> str | None:
        """Pull the longest announced prefix here when that beats re-prefill; the header value, or None."""
        from identity import NodeId

        from .kvcache import plan_cache
        from .routing.router import LOCAL

        # Only peers trusted with `cache` may send us one (the session would refuse the others).
        sources = {peer: items for peer, items in announced.items()
                   if peer == LOCAL or self.mesh.trust.allows(NodeId.parse(peer), "cache")}
        rates = {peer: self.link_throughput(peer)[0] for peer in sources if peer != LOCAL}
        plan = plan_cache(prompt, sha256, LOCAL, sources, prefill_tokens_per_s=self.backend.prefill_rate.value,
                          link_bytes_per_s=rates)
        if plan.action != "pull" or plan.holder is None or plan.prefix_sha256 is None:
            log.debug("kv cache not pulled", extra=fields(request_id=request.request_id, reason=plan.reason))
            return None
        holder = plan.holder
        link = self.mesh.active.get(NodeId.parse(holder))
        item = next(a for a in sources[holder] if a.prefix_sha256 == plan.prefix_sha256)
        measured = self.link_throughput(holder)[1]
        budget = max(PULL_TIMEOUT_FLOOR_S, 4 * (plan.transfer_s or 0.0))
        started = time.monotonic()
        try:
            if link is None:
                raise KVCacheError("the holder is no longer connected")
            bundle = await asyncio.wait_for(
                self.transfers.pull(link, item.model_id, plan.prefix_sha256, plan.cached_tokens), budget)
        except (KVCacheError, TimeoutError) as exc:
            log.warning("kv cache pull failed; prefilling instead", extra=fields(
                request_id=request.request_id, holder=holder, error=str(exc) or type(exc).__name__))
            return f"prefill;holder={_short(holder)};tokens={plan.cached_tokens};pull_failed"
        elapsed = max(time.monotonic() - started, 1e-6)
        rate = bundle.descriptor.wire_bytes / elapsed
        previous = self.link_rates.get(holder)
        self.link_rates[holder] = rate if previous is None else previous + 0.5 * (rate - previous)
        self._store(holder, bundle)
        log.info("kv cache pulled before serving", extra=fields(
            request_id=request.request_id, holder=holder, tokens=plan.cached_tokens,
            bytes=bundle.descriptor.wire_bytes, ms=round(elapsed * 1000, 1), estimate=plan.reason,
            link="measured" if measured else "assumed"))
        return (f"pull;node={_short(holder)};tokens={plan.cached_tokens};ms={elapsed * 1000:.0f};"
                f"link={'measured' if measured else 'assumed'}")


def _short(target: str) -> str:
    return target if target == "local" else target[:15]

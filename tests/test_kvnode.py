"""KvNode.plan (cache-aware candidate order) and announcement parsing, without llama.cpp or sockets."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from identity import NodeId
from meshd.backends.admission import PrefillRate
from meshd.config import KvCacheConfig
from meshd.kvcache import CacheIdentity, PrefixCache, prefix_sha256
from meshd.kvnode import KvNode, peer_announcements
from meshd.routing.router import LOCAL, Candidate

SHA = "ab" * 32
PEER = "MESHD-KDQZ-2G3N-P5DF-U6TK-H3EE-L42W-B6W6-2U7B-DI24-4BFY"  # a valid id (checksummed)
PROMPT = list(range(100, 160))


def announced(tokens: int) -> dict:
    return {"id": "m", "sha256": SHA, "kv_prefixes": [
        {"prefix_sha256": prefix_sha256(PROMPT[:tokens]), "token_count": tokens, "nbytes": 1000}]}


@dataclass
class FakeBackend:
    prefix_cache: PrefixCache = field(default_factory=lambda: PrefixCache(1 << 20))
    prefill_rate: PrefillRate = field(default_factory=PrefillRate)  # nothing measured: no pulls

    def cache_identity(self, model: str) -> CacheIdentity | None:
        return CacheIdentity("m", SHA) if model == "m" else None

    def prompt_tokens(self, request) -> list[int]:
        return PROMPT


@dataclass
class Record:
    models: list


class Mesh:
    """The mesh as KvNode reads it: one connected peer, its announcement, our trust in it."""

    def __init__(self, models: list, roles: frozenset = frozenset({"serve", "cache"})) -> None:
        self.table = self.trust = self
        self._record = Record(models)
        self.active = {NodeId.parse(PEER): object()}
        self.roles = roles

    def get(self, node_id):
        return self._record

    def allows(self, node_id, role: str) -> bool:
        return role in self.roles


@dataclass
class Request:
    model: str = "m"
    request_id: str = "r"


def candidates(peer_score: float = 1.0) -> list[Candidate]:
    return [Candidate(LOCAL, "local", "m", 1.0, "local model", identity=SHA),
            Candidate(PEER, "peer", "m", peer_score, "trusted peer", identity=SHA)]


def plan(models: list, peer_score: float = 1.0, roles: frozenset = frozenset({"serve", "cache"}),
         offered: list[Candidate] | None = None, prefill_tokens_per_s: float | None = None):
    backend = FakeBackend()
    backend.prefill_rate.value = prefill_tokens_per_s
    node = KvNode(KvCacheConfig(enabled=True), backend)
    node.mesh = Mesh(models, roles)
    return asyncio.run(node.plan(Request(), candidates(peer_score) if offered is None else offered))


def test_the_holder_goes_first_and_says_so():
    order, header = plan([announced(40)])
    assert [c.target for c in order] == [PEER, LOCAL]
    assert header == f"prefer;node={PEER[:15]};tokens=40"


def test_a_much_busier_holder_is_passed_over():
    order, header = plan([announced(40)], peer_score=5.0)
    assert [c.target for c in order] == [LOCAL, PEER]
    assert header.startswith("prefill;holder=") and header.endswith("holder_busy")


def test_a_holder_that_may_not_serve_is_a_pull_source_only():
    local_only = candidates()[:1]
    order, header = plan([announced(40)], roles=frozenset({"cache"}), offered=local_only)
    assert order == local_only
    # No prefill speed measured here yet: a pull cannot be justified, so it is prefilled, and said so.
    assert header == f"prefill;holder={PEER[:15]};tokens=40;holder_not_serving"
    # Neither serving nor trusted with cache: its announcements are not even looked at.
    assert plan([announced(40)], roles=frozenset({"use"}), offered=local_only) == (local_only, None)


def test_a_busy_holder_not_trusted_with_cache_is_never_asked_for_it():
    # Prefill is slow here, so a pull would pay off; but the holder may serve, not send caches.
    order, header = plan([announced(40)], peer_score=5.0, roles=frozenset({"serve"}), prefill_tokens_per_s=1.0)
    assert [c.target for c in order] == [LOCAL, PEER]
    assert header == f"prefill;holder={PEER[:15]};tokens=40;holder_busy"


def test_no_holder_changes_nothing():
    other = {"id": "m", "sha256": SHA, "kv_prefixes": [{"prefix_sha256": "00" * 32, "token_count": 40,
                                                        "nbytes": 1}]}
    assert plan([other]) == (candidates(), None)
    assert plan([]) == (candidates(), None)


def test_malformed_announcements_are_ignored():
    models = [{"id": "m", "sha256": SHA, "kv_prefixes": [{"token_count": "x"}, 7, {"prefix_sha256": "a"}]},
              "junk", announced(30)]
    assert [a.token_count for a in peer_announcements(models, SHA)] == [30]
    assert peer_announcements("junk", SHA) == []

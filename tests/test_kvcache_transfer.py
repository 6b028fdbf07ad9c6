"""KV caches over real QUIC: two in-process endpoints on loopback, cache channels both ways."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from test_kvcache_bundle import (  # tests/ is on sys.path (rootdir conftest)
    base_descriptor,
    make_state,
)
from test_kvcache_llama import greedy  # tests/ is on sys.path (rootdir conftest)

from identity import TlsIdentity
from meshd.kvcache import (
    CacheIdentity,
    CacheReceived,
    CacheRejected,
    CacheSent,
    CacheTransferError,
    KVBundle,
    PrefixCache,
    bundle_from_state,
    export_sequence,
    import_sequence,
    prefix_sha256,
)
from meshd.kvcache.transfer import CacheTransfers
from meshd.protocol import ROLES
from meshd.transport.endpoint import QuicEndpoint
from meshd.transport.engine import ephemeral_identity
from meshd.transport.loopback import trusting_endpoint
from meshd.transport.settings import EngineSettings

SHA = "ab" * 32


@dataclasses.dataclass
class Node:
    tls: TlsIdentity
    endpoint: QuicEndpoint
    transfers: CacheTransfers
    stored: list[tuple[str, KVBundle]]
    events: list[Any]
    port: int = 0


async def make_node(*, grants: Iterable[str] = ROLES, sha: str = SHA,
                    lookup: Any = None, store: Any = None) -> Node:
    tls = ephemeral_identity()
    stored: list[tuple[str, KVBundle]] = []
    events: list[Any] = []
    identity = CacheIdentity("m", sha)
    transfers = CacheTransfers(lambda model: identity if model == "m" else None,
                               store=store or (lambda peer, bundle: stored.append((peer, bundle))), lookup=lookup,
                               chunk_size=256 << 10, on_event=events.append)
    endpoint = trusting_endpoint(EngineSettings(), transfers.handle, tls=tls, roles=grants)
    node = Node(tls, endpoint, transfers, stored, events)
    node.port = (await endpoint.listen("127.0.0.1", 0))[1]
    return node


async def connect(a: Node, b: Node) -> Any:
    link = a.endpoint.dial("127.0.0.1", b.port, expected=b.tls.node_id)
    await asyncio.wait_for(link.connected, 10)
    return link


def synthetic(n: int = 300, seed: int = 0) -> KVBundle:
    return bundle_from_state(make_state(n, True, seed), base_descriptor(n))


@pytest.fixture
async def pair():
    nodes: list[Node] = []

    async def factory(**b_kwargs: Any) -> tuple[Node, Node, Any]:
        a = await make_node()
        b = await make_node(**b_kwargs)
        nodes.extend([a, b])
        return a, b, await connect(a, b)

    yield factory
    for node in nodes:
        node.endpoint.close()
    await asyncio.sleep(0.05)


async def test_push_delivers_a_verified_cache(pair) -> None:
    a, b, link = await pair()
    bundle = synthetic()
    await asyncio.wait_for(a.transfers.push(link, bundle), 30)  # returns after B's receipt (its FIN)
    ((peer, received),) = b.stored
    assert peer == str(a.tls.node_id)
    assert received.descriptor == bundle.descriptor and b.transfers.received == 1
    d = bundle.descriptor
    assert b.events == [CacheReceived(str(a.tls.node_id), SHA, d.prefix_sha256, 300, d.wire_bytes, "raw")]
    assert a.events == [CacheSent(str(b.tls.node_id), d.prefix_sha256, 300, d.wire_bytes)]


async def test_pull_fetches_an_announced_prefix(pair) -> None:
    bundle = synthetic(seed=3)
    cache = PrefixCache(1 << 30, min_tokens=4)
    cache.put(bundle)
    a, b, link = await pair(lookup=cache.get)
    (announced,) = cache.announcements()
    got = await asyncio.wait_for(a.transfers.pull(link, "m", announced.prefix_sha256, announced.token_count), 30)
    assert got.descriptor == bundle.descriptor
    with pytest.raises(CacheTransferError, match="not_cached"):
        await asyncio.wait_for(a.transfers.pull(link, "m", prefix_sha256([1, 2, 3]), 3), 30)


async def test_peer_without_the_cache_role_refuses(pair) -> None:
    a, b, link = await pair(grants={"use", "serve"})
    with pytest.raises(CacheTransferError, match="forbidden"):
        await asyncio.wait_for(a.transfers.push(link, synthetic()), 30)
    assert b.stored == []


async def test_cache_of_other_weights_is_rejected_by_the_receiver(pair) -> None:
    a, b, link = await pair(sha="cd" * 32)
    with pytest.raises(CacheTransferError, match="aborted"):
        await asyncio.wait_for(a.transfers.push(link, synthetic()), 30)
    assert b.stored == [] and b.transfers.rejected == 1
    (rejected,) = b.events
    assert isinstance(rejected, CacheRejected) and rejected.code == "cache_model_mismatch"


async def test_follow_up_turn_on_b_uses_a_cache_sent_over_quic(pair, model_path: Path) -> None:
    """The issue's scenario: a long prompt served on A, the next turn forced to B."""
    import llama_cpp

    identity = CacheIdentity.for_file("m", model_path)
    llama_a = llama_cpp.Llama(str(model_path), n_ctx=1024, verbose=False)
    llama_b = llama_cpp.Llama(str(model_path), n_ctx=1024, verbose=False)
    try:
        text = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
        turn_1 = llama_a.tokenize(text.encode())[:500]
        llama_a.eval(turn_1)  # A served the first turn: its context holds the prompt
        bundle = export_sequence(llama_a, identity)
        turn_2 = turn_1 + llama_a.tokenize(b"\nIn one sentence, what is a cache channel?")
        llama_a.reset()
        reference = greedy(llama_a, turn_2)  # what A alone produces for turn 2

        imported: list[int] = []
        a, b, link = await pair(sha=identity.sha256,
                                store=lambda peer, received: imported.append(import_sequence(llama_b, received, identity)))
        await asyncio.wait_for(a.transfers.push(link, bundle), 60)
        assert imported == [len(turn_1)]
        sizes: list[int] = []
        original = llama_b.eval
        llama_b.eval = lambda toks: (sizes.append(len(toks)), original(toks))[1]
        assert greedy(llama_b, turn_2) == reference
        assert sizes[0] == len(turn_2) - len(turn_1)  # B prefilled only the new tokens
    finally:
        llama_a.close()
        llama_b.close()


def conversation(first_token: int, n: int = 200) -> KVBundle:
    tokens = tuple(range(first_token, first_token + n))
    base = dataclasses.replace(base_descriptor(n), token_ids=tokens, prefix_sha256=prefix_sha256(tokens))
    return bundle_from_state(make_state(n, True, first_token), base)


async def test_drain_moves_every_cached_conversation_and_the_next_turns_hit_on_the_peer(pair) -> None:
    from meshd.kvcache.drain import drain_caches

    mine, theirs = PrefixCache(1 << 30), PrefixCache(1 << 30)
    one, two = conversation(1000), conversation(5000)
    mine.put(one)
    mine.put(two)
    a, b, link = await pair(store=lambda peer, bundle: theirs.put(bundle))
    report = await asyncio.wait_for(drain_caches(mine, [link], a.transfers), 60)
    assert len(mine) == 0 and report.failed == []
    assert sorted(tokens for _, _, tokens in report.moved) == [200, 200]
    for convo in (one, two):
        next_turn = list(convo.descriptor.token_ids) + [7, 8, 9]
        hit = theirs.lookup(SHA, next_turn, max_tokens=len(next_turn) - 1)
        assert hit is not None and hit.shared_tokens == 200

    # Nowhere to go: reported, not dropped silently.
    mine.put(conversation(9000))
    report = await drain_caches(mine, [], a.transfers)
    assert report.moved == [] and len(report.failed) == 1


def test_drain_targets_need_the_role_and_the_same_weights() -> None:
    from meshd.kvcache.drain import drain_targets

    peers = [("N1", [{"id": "m", "sha256": SHA}]), ("N2", [{"id": "m", "sha256": "cd" * 32}]),
             ("N3", [{"id": "m", "sha256": SHA}]), ("N4", [])]
    assert drain_targets(peers, SHA, may_cache=lambda node: node != "N3") == ["N1"]

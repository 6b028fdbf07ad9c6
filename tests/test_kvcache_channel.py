"""A KV cache over a `cache` channel between two in-memory PeerSessions, into a real llama.cpp context."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from meshd.kvcache import (
    CacheChecksumMismatch,
    CacheIdentity,
    CacheModelMismatch,
    CacheTransferError,
    export_sequence,
    import_sequence,
)
from meshd.kvcache.channel import CacheStreamReceiver, cache_stream, check_offer, offer_for
from meshd.protocol import (
    ROLES,
    ChannelDataReceived,
    ChannelEnded,
    ChannelKind,
    ChannelOpened,
    ChannelRefused,
    ChannelRequested,
    PeerSession,
    trust_roles,
)
from meshd.protocol.loopback import Loopback, drain
from test_kvcache_llama import greedy  # tests/ is on sys.path (rootdir conftest)

MAX = 1 << 30


def sessions(server_grants: Iterable[str] = ROLES) -> tuple[PeerSession, PeerSession, Loopback]:
    def verify(record: bytes, node_id: str, now: float) -> dict[str, Any]:
        return {}

    client = PeerSession(local_node_id="NODEA", peer_node_id="NODEB", is_client=True, now=0.0,
                         is_trusted=trust_roles(ROLES), verify_capabilities=verify)
    server = PeerSession(local_node_id="NODEB", peer_node_id="NODEA", is_client=False, now=0.0,
                         is_trusted=trust_roles(server_grants), verify_capabilities=verify)
    link = Loopback(client, server)
    link.pump(0.0)
    assert client.established and server.established
    drain(client)
    drain(server)
    return client, server, link


@pytest.fixture(scope="module")
def setup(model_path: Path) -> Any:
    import llama_cpp

    identity = CacheIdentity.for_file("smollm2", model_path)
    a = llama_cpp.Llama(str(model_path), n_ctx=1024, verbose=False)
    prompt = a.tokenize(b"The mesh moves a conversation's KV cache to the node that serves its next turn. " * 12)
    a.eval(prompt)
    bundle = export_sequence(a, identity)
    a.reset()
    reference = greedy(a, prompt)
    yield {"llama_cpp": llama_cpp, "identity": identity, "bundle": bundle, "prompt": prompt,
           "reference": reference, "path": model_path}
    a.close()


def push(client: PeerSession, link: Loopback, stream_id: int, pieces: Iterable[bytes],
         server: PeerSession, on_server: Any) -> None:
    """Send with the session's backpressure, delivering to the server as the loopback pumps."""
    for piece in pieces:
        while not client.is_writable(stream_id):
            link.pump(1.0)
            on_server(drain(server))
        client.send_channel_data(stream_id, piece)
    client.finish_stream(stream_id)
    link.pump(1.0)
    on_server(drain(server))


def test_cache_pushed_over_the_channel_continues_without_reprefill(setup: Any) -> None:
    client, server, link = sessions()
    bundle, identity = setup["bundle"], setup["identity"]
    stream_id = client.open_channel(offer_for(bundle, "conv-1"), 1.0)
    link.pump(1.0)
    (requested,) = drain(server)
    assert isinstance(requested, ChannelRequested) and requested.kind is ChannelKind.CACHE
    assert check_offer(requested.setup, identity, max_bytes=MAX) is None
    server.accept_channel(stream_id)
    link.pump(1.0)
    opened = drain(client)
    assert [type(e) for e in opened] == [ChannelOpened] and opened[0].stream_id == stream_id
    receiver = CacheStreamReceiver(requested.setup, identity, max_bytes=MAX)
    ended: list[bool] = []

    def on_server(events: list[Any]) -> None:
        for event in events:
            if isinstance(event, ChannelDataReceived):
                receiver.receive(event.data)
            elif isinstance(event, ChannelEnded):
                ended.append(True)

    push(client, link, stream_id, cache_stream(bundle, transfer_id=3, chunk_size=256 << 10), server, on_server)
    assert ended
    received = receiver.end()
    assert received.descriptor == bundle.descriptor
    b = setup["llama_cpp"].Llama(str(setup["path"]), n_ctx=1024, verbose=False)
    try:
        assert import_sequence(b, received, identity) == len(setup["prompt"])
        sizes: list[int] = []
        original = b.eval
        b.eval = lambda toks: (sizes.append(len(toks)), original(toks))[1]
        assert greedy(b, setup["prompt"]) == setup["reference"]
        assert sizes[0] == 1
    finally:
        b.close()


def test_peer_without_the_cache_role_is_refused() -> None:
    client, server, link = sessions(server_grants={"use", "serve"})
    from meshd.kvcache.descriptor import prefix_sha256
    from meshd.protocol import CacheOffer

    offer = CacheOffer(cache_id="c", model="smollm2", prefix_sha256=prefix_sha256([1, 2]), token_count=2,
                       dtype="f16", nbytes=10)
    stream_id = client.open_channel(offer, 1.0)
    link.pump(1.0)
    refused = drain(client)
    assert len(refused) == 1 and isinstance(refused[0], ChannelRefused) and refused[0].code == "forbidden"
    assert stream_id not in server._streams


def test_offer_checks(setup: Any) -> None:
    offer = offer_for(setup["bundle"], "c")
    identity = setup["identity"]
    assert check_offer(offer, CacheIdentity("other-model", identity.sha256), max_bytes=MAX)[0] == "model_mismatch"
    assert check_offer(offer, identity, max_bytes=1000)[0] == "too_large"


def test_cache_of_other_weights_is_refused_at_the_descriptor(setup: Any) -> None:
    bundle = setup["bundle"]
    stream = list(cache_stream(bundle, transfer_id=1))
    receiver = CacheStreamReceiver(offer_for(bundle, "c"), CacheIdentity("smollm2", "f" * 64), max_bytes=MAX)
    with pytest.raises(CacheModelMismatch):
        receiver.receive(stream[0] + stream[1])  # the descriptor envelope alone


def test_corruption_and_truncation_on_the_channel(setup: Any) -> None:
    bundle, identity = setup["bundle"], setup["identity"]
    data = bytearray(b"".join(cache_stream(bundle, transfer_id=1)))
    data[len(data) // 2] ^= 0x08
    receiver = CacheStreamReceiver(offer_for(bundle, "c"), identity, max_bytes=MAX)
    with pytest.raises(CacheChecksumMismatch):
        for start in range(0, len(data), 65536):
            receiver.receive(bytes(data[start : start + 65536]))
    clean = b"".join(cache_stream(bundle, transfer_id=1))
    short = CacheStreamReceiver(offer_for(bundle, "c"), identity, max_bytes=MAX)
    short.receive(clean[:-10])
    with pytest.raises(CacheTransferError, match="ended early"):
        short.end()

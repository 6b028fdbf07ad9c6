"""Cache channels on live mesh links: the thin asyncio layer over ``channel.py``.

``CacheTransfers.handle(link, event)`` consumes the session events of cache
channels (and returns False for everything else, so it chains in front of
the request handler). It serves both directions of docs/protocol.md's
``cache`` channel:

- push: ``await push(link, bundle)`` opens a channel with a ``CacheOffer``;
  the peer checks the offer (model, size), receives and verifies the cache,
  hands it to its ``store`` callback, then finishes its side: that FIN is the
  receipt. A peer that rejects the cache resets the stream (the rejection is
  logged there; here it is a ``CacheTransferError``);
- pull: ``await pull(link, ...)`` opens a channel with a ``CacheRequest``;
  the holder looks the prefix up (``lookup``), refuses ``not_cached`` or
  streams the cache, which is verified here exactly like a push.

Trust is the session's: without the ``cache`` role the channel is refused
(``forbidden``) before any of this runs. Bytes leave through the session's
bounded send buffer, paced by ``StreamWritable``, so a slow peer never grows
memory. Nothing here loads a cache into a model: ``store`` and the caller of
``pull`` decide that (``import_sequence`` re-checks everything).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..protocol import (
    CacheOffer,
    CacheRequest,
    ChannelAborted,
    ChannelDataReceived,
    ChannelEnded,
    ChannelKind,
    ChannelOpened,
    ChannelRefused,
    ChannelRequested,
    StreamWritable,
    WireCode,
)
from ..transport.channel_io import settle, wait_writable
from ..transport.timers import clock
from .bundle import DEFAULT_CHUNK, KVBundle
from .channel import CacheStreamReceiver, cache_stream, check_offer, offer_for
from .errors import CacheTransferError, KVCacheError
from .events import CacheEvent, CacheReceived, CacheRejected, CacheSent
from .llama_io import CacheIdentity

log = logging.getLogger(__name__)

__all__ = ["CacheTransfers"]

IdentityFor = Callable[[str], "CacheIdentity | None"]  # model id -> local identity (None: not served)
Store = Callable[[str, KVBundle], None]  # (peer node id, verified bundle)
Lookup = Callable[[str, str], "KVBundle | None"]  # (model sha256, prefix sha256) -> bundle


@dataclass(eq=False)
class _Channel:
    link: Any
    stream_id: int
    receiver: CacheStreamReceiver | None = None  # set when this side receives the cache
    opened: asyncio.Future | None = None  # opener: resolves on ChannelOpened / ChannelRefused
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    writable: asyncio.Event = field(default_factory=asyncio.Event)
    sender: asyncio.Task | None = None
    sent: KVBundle | None = None  # what this side streams, for the CacheSent event


class CacheTransfers:
    def __init__(self, identity_for: IdentityFor, *, store: Store | None = None, lookup: Lookup | None = None,
                 max_bytes: int = 1 << 31, chunk_size: int = DEFAULT_CHUNK,
                 on_event: Callable[[CacheEvent], None] | None = None) -> None:
        self._identity_for = identity_for
        self._on_event = on_event or (lambda event: None)
        self._store = store
        self._lookup = lookup
        self.max_bytes = max_bytes
        self.chunk_size = chunk_size
        self._channels: dict[tuple[int, int], _Channel] = {}
        self._ids = itertools.count(1)
        self.received = 0  # caches accepted from peers
        self.rejected = 0  # caches refused or failed on receipt

    # --- opening channels ------------------------------------------------------

    async def push(self, link: Any, bundle: KVBundle, cache_id: str | None = None) -> None:
        """Send ``bundle`` to the peer; returns once the peer has verified and stored it."""
        offer = offer_for(bundle, cache_id or self._new_id())
        channel = await self._open(link, offer)
        channel.sent = bundle
        channel.sender = asyncio.ensure_future(self._send(channel, cache_stream(bundle, self._transfer_id(), self.chunk_size)))
        await channel.done

    async def pull(self, link: Any, model_id: str, prefix_sha256: str, token_count: int,
                   cache_id: str | None = None) -> KVBundle:
        """Fetch a cache the peer announced; verified against our identity for ``model_id``."""
        identity = self._identity_for(model_id)
        if identity is None:
            raise CacheTransferError(f"this node does not serve {model_id!r}")
        request = CacheRequest(cache_id=cache_id or self._new_id(), model=model_id, prefix_sha256=prefix_sha256,
                               token_count=token_count)
        channel = await self._open(link, request, receiver=CacheStreamReceiver(request, identity, max_bytes=self.max_bytes))
        result: KVBundle = await channel.done
        return result

    async def _open(self, link: Any, setup: CacheOffer | CacheRequest, receiver: CacheStreamReceiver | None = None) -> _Channel:
        session = link.session
        stream_id = session.open_channel(setup, clock())
        channel = _Channel(link, stream_id, receiver=receiver, opened=asyncio.get_running_loop().create_future())
        self._channels[(id(link), stream_id)] = channel
        link.flush()
        try:
            await channel.opened
        except BaseException:
            self._forget(channel)
            raise
        return channel

    # --- session events ----------------------------------------------------------

    def handle(self, link: Any, event: Any) -> bool:
        """Consume one session event if it belongs to a cache channel."""
        if isinstance(event, ChannelRequested):
            if event.kind is not ChannelKind.CACHE:
                return False
            self._requested(link, event)
            return True
        stream_id = getattr(event, "stream_id", None)
        channel = self._channels.get((id(link), stream_id)) if stream_id is not None else None
        if channel is None:
            return False
        if isinstance(event, ChannelOpened):
            settle(channel.opened, None)
        elif isinstance(event, ChannelRefused):
            settle(channel.opened,
                   error=CacheTransferError(f"peer refused the cache channel: {event.code}: {event.message}"))
            self._forget(channel)
        elif isinstance(event, StreamWritable):
            channel.writable.set()
        elif isinstance(event, ChannelDataReceived):
            self._data(channel, event.data)
        elif isinstance(event, ChannelEnded):
            self._ended(channel)
        elif isinstance(event, ChannelAborted):
            settle(channel.opened, error=CacheTransferError(f"cache channel aborted: {event.code}"))
            settle(channel.done, error=CacheTransferError(f"cache channel aborted by the peer: {event.code}"))
            if channel.sender is not None:
                channel.sender.cancel()
            self._forget(channel)
        return True

    def _requested(self, link: Any, event: ChannelRequested) -> None:
        session, setup = link.session, event.setup
        identity = self._identity_for(setup.model)
        channel = _Channel(link, event.stream_id)
        pieces: Iterator[bytes] | None = None
        if identity is None:
            refusal: tuple[str, str] | None = ("model_mismatch", f"this node does not serve {setup.model!r}")
        elif isinstance(setup, CacheOffer):
            refusal = check_offer(setup, identity, max_bytes=self.max_bytes) if self._store else \
                ("not_accepting", "this node does not accept pushed caches")
            channel.receiver = CacheStreamReceiver(setup, identity, max_bytes=self.max_bytes)
        else:
            bundle = self._lookup(identity.sha256, setup.prefix_sha256) if self._lookup else None
            if bundle is None or bundle.descriptor.n_tokens != setup.token_count:
                refusal = ("not_cached", "no such prefix here")
            else:
                refusal = None
                channel.sent = bundle
                pieces = cache_stream(bundle, self._transfer_id(), self.chunk_size)
        if refusal is not None:
            self._on_event(CacheRejected(str(link.node_id), refusal[0], refusal[1]))
            session.refuse_channel(event.stream_id, *refusal)
            link.flush()
            return
        self._channels[(id(link), event.stream_id)] = channel
        session.accept_channel(event.stream_id)
        link.flush()
        if pieces is not None:
            channel.sender = asyncio.ensure_future(self._send(channel, pieces))

    def _data(self, channel: _Channel, data: bytes) -> None:
        if channel.receiver is None:
            self._abort(channel, CacheTransferError("unexpected bytes from the cache's receiver"))
            return
        try:
            channel.receiver.receive(data)
        except KVCacheError as exc:
            self._abort(channel, exc)

    def _ended(self, channel: _Channel) -> None:
        if channel.receiver is None:  # we sent; the peer's FIN is its receipt
            if channel.sent is not None:
                d = channel.sent.descriptor
                self._on_event(CacheSent(str(channel.link.node_id), d.prefix_sha256, d.n_tokens, d.wire_bytes))
            settle(channel.done, None)
            self._forget(channel)
            return
        try:
            bundle = channel.receiver.end()
        except KVCacheError as exc:
            self._abort(channel, exc)
            return
        peer = str(channel.link.node_id)
        if channel.opened is None:  # a pushed cache: store it, then the FIN says so
            try:
                if self._store is not None:
                    self._store(peer, bundle)
            except KVCacheError as exc:
                self._abort(channel, exc)
                return
        self.received += 1
        d = bundle.descriptor
        self._on_event(CacheReceived(peer, d.model_sha256, d.prefix_sha256, d.n_tokens, d.wire_bytes, d.wire))
        log.info("kv cache received", extra={"fields": {
            "peer": peer, "tokens": bundle.descriptor.n_tokens, "bytes": bundle.descriptor.wire_bytes,
            "wire": bundle.descriptor.wire}})
        settle(channel.done, bundle)
        channel.link.session.finish_stream(channel.stream_id)
        channel.link.flush()
        self._forget(channel)

    def _abort(self, channel: _Channel, exc: KVCacheError) -> None:
        self.rejected += 1
        self._on_event(CacheRejected(str(channel.link.node_id), exc.code, str(exc)))
        log.warning("kv cache rejected", extra={"fields": {
            "peer": str(channel.link.node_id), "code": exc.code, "error": str(exc)}})
        settle(channel.done, error=exc)
        if channel.sender is not None:
            channel.sender.cancel()
        # The peer learns *that* we rejected it; the reason stays in our log.
        channel.link.session.reset_stream(channel.stream_id, WireCode.CACHE_REJECTED)
        channel.link.flush()
        self._forget(channel)

    async def _send(self, channel: _Channel, pieces: Iterator[bytes]) -> None:
        session, link = channel.link.session, channel.link
        for piece in pieces:
            await wait_writable(session, channel.stream_id, channel.writable)
            session.send_channel_data(channel.stream_id, piece)
            link.flush()
            await asyncio.sleep(0)  # let acks and the peer's reset in between pieces
        session.finish_stream(channel.stream_id)
        link.flush()

    # --- bookkeeping ---------------------------------------------------------------

    def _forget(self, channel: _Channel) -> None:
        self._channels.pop((id(channel.link), channel.stream_id), None)

    def _new_id(self) -> str:
        return f"kv-{os.getpid()}-{next(self._ids)}"

    @staticmethod
    def _transfer_id() -> int:
        return int.from_bytes(os.urandom(8), "little")

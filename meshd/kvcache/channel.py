"""A KV cache on a mesh ``cache`` channel (sans-IO; the session moves the bytes).

docs/protocol.md defines the channel: the opener sends a setup frame
(``CacheOffer`` to push a cache, ``CacheRequest`` to pull one), the acceptor
acks or refuses, then raw bytes flow and a FIN ends them. The session
already refuses the channel to a peer without the ``cache`` role
(``forbidden``). This module supplies what goes *in* the channel:

- ``offer_for`` builds the ``CacheOffer`` for a bundle; ``check_offer`` is the
  acceptor's decision (right model, acceptable size) before it acks;
- ``cache_stream`` yields the bytes to send after the ack: the bundle's
  envelopes back to back (each self-delimiting: header size, then payload
  length from the CRC-checked header);
- ``CacheStreamReceiver`` turns received bytes back into a verified
  ``KVBundle``. It checks the descriptor against the offer and the local
  model identity as soon as the descriptor (the first envelope) is in, so a
  wrong cache is refused before its tensors are buffered; the caller resets
  the stream on any ``KVCacheError`` and serves the request by re-prefill.
"""

from __future__ import annotations

from collections.abc import Iterator

from meshd_native import EnvelopeChecksumMismatch, EnvelopeError, Limits, decode_header, peek_header_size

from ..protocol import CacheOffer, CacheRequest
from .bundle import DEFAULT_CHUNK, BundleAssembler, KVBundle, pack
from .errors import CacheChecksumMismatch, CacheDescriptorMismatch, CacheModelMismatch, CacheTransferError
from .llama_io import CacheIdentity

__all__ = ["CacheStreamReceiver", "cache_stream", "check_offer", "offer_for"]

# A cache channel carries chunks of at most this many payload bytes: bounds
# what the receiver buffers before it can verify anything.
MAX_CHUNK = 16 << 20
_LIMITS = Limits(max_payload_length=MAX_CHUNK)


def offer_for(bundle: KVBundle, cache_id: str) -> CacheOffer:
    d = bundle.descriptor
    return CacheOffer(
        cache_id=cache_id, model=d.model_id, prefix_sha256=d.prefix_sha256,
        token_count=d.n_tokens, dtype=d.k_dtype if d.wire == "raw" else d.wire, nbytes=d.wire_bytes,
    )


def check_offer(offer: CacheOffer, identity: CacheIdentity, *, max_bytes: int) -> tuple[str, str] | None:
    """``None`` to accept, else ``(code, message)`` for ``refuse_channel``.

    Only the model *name* is known here; the weights (file sha256) are checked
    against the descriptor, the first thing on the channel.
    """
    if offer.model != identity.model_id:
        return ("model_mismatch", f"this node does not serve {offer.model!r} here")
    if offer.nbytes > max_bytes:
        return ("too_large", f"{offer.nbytes} bytes exceed this node's {max_bytes}")
    return None


def cache_stream(bundle: KVBundle, transfer_id: int, chunk_size: int = DEFAULT_CHUNK) -> Iterator[bytes]:
    """The channel payload: every envelope's bytes (header, then payload view)."""
    if chunk_size > MAX_CHUNK:
        raise ValueError(f"chunk_size over {MAX_CHUNK}")
    for envelope in pack(bundle, transfer_id, chunk_size):
        header, payload = envelope.buffers()
        yield header
        yield bytes(payload)


class CacheStreamReceiver:
    """Receives one cache, for the ``CacheOffer`` we accepted or the ``CacheRequest`` we sent."""

    def __init__(self, offer: CacheOffer | CacheRequest, identity: CacheIdentity, *, max_bytes: int) -> None:
        self.offer = offer
        self.identity = identity
        self._buffer = bytearray()
        self._assembler = BundleAssembler(max_bytes=max_bytes, limits=_LIMITS)
        self._checked = False
        self.bundle: KVBundle | None = None

    def receive(self, data: bytes) -> KVBundle | None:
        """Feed channel bytes; returns the bundle once complete (then nothing more may come)."""
        if self.bundle is not None and data:
            raise CacheTransferError("bytes after the complete cache")
        self._buffer += data
        while True:
            size = self._next_envelope_size()
            if size is None:
                return self.bundle
            envelope = bytes(self._buffer[:size])
            del self._buffer[:size]
            result = self._assembler.add(envelope)
            if not self._checked and self._assembler.descriptor is not None:
                self._check_descriptor()
            if result is not None:
                self.bundle = result

    def end(self) -> KVBundle:
        """At FIN: the complete bundle, or why there is none."""
        if self.bundle is None or self._buffer:
            raise CacheTransferError(f"cache channel ended early ({len(self._buffer)} bytes pending)")
        return self.bundle

    def _next_envelope_size(self) -> int | None:
        buffer = self._buffer
        if len(buffer) < 9:
            return None
        try:
            header_size = peek_header_size(bytes(buffer[:9]))
            if len(buffer) < header_size:
                return None
            header = decode_header(bytes(buffer[:header_size]), _LIMITS)
        except EnvelopeChecksumMismatch as exc:
            raise CacheChecksumMismatch(f"envelope header rejected: {exc}") from exc
        except EnvelopeError as exc:
            raise CacheTransferError(f"envelope header rejected: {exc.code}: {exc}") from exc
        size = header_size + header.payload_length
        return size if len(buffer) >= size else None

    def _check_descriptor(self) -> None:
        self._checked = True
        d = self._assembler.descriptor
        if d is None:  # pragma: no cover - only called once the descriptor is in
            return
        if d.model_sha256 != self.identity.sha256:
            raise CacheModelMismatch(f"offered cache was computed by other weights ({d.model_sha256[:12]}…)")
        offer = self.offer
        nbytes = offer.nbytes if isinstance(offer, CacheOffer) else d.wire_bytes  # a request names no size
        if (d.model_id, d.prefix_sha256, d.n_tokens, d.wire_bytes) != (
                offer.model, offer.prefix_sha256, offer.token_count, nbytes):
            raise CacheDescriptorMismatch("the descriptor does not match the channel's setup frame")

"""The in-process llama.cpp backend: one queue and one worker thread per model.

Admission is decided on the event loop (a full queue raises ``QueueFull``
before anything is sent); execution happens in the model's single-thread
executor; events come back through ``call_soon_threadsafe``. A model's slot
is released only when its worker thread has really finished, so a cancelled
request can never overlap the next one on the same llama.cpp context.
Embeddings run on a second context and thread of their own, beside
generation, behind a queue bounded the same way.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..config import KvCacheConfig, ModelSpec, ServingConfig
from ..errors import BackendError, MeshdError, ModelNotFound, QueueFull, ServiceUnavailable
from ..modelid import FileFactsCache, ModelDescriptor, describe_gguf_async
from .admission import MeteredStream, PrefillRate, TokenRate
from .base import (
    BackendCapabilities,
    BackendHealth,
    BackendLoad,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    ModelInfo,
    ModelState,
    health_of,
)
from .llama_engine import LlamaEngine

log = logging.getLogger(__name__)

_DONE = object()


@dataclass
class _Slot:
    """One model: its engine, its executor and its admission counters."""

    spec: ModelSpec
    engine: LlamaEngine
    executor: ThreadPoolExecutor
    embed_executor: ThreadPoolExecutor
    state: ModelState = "loading"
    error: str | None = None
    running: int = 0
    waiting: int = 0
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Embeddings: their own context and thread (they may run beside a generation),
    # and their own counters, bounded by the same serving.max_queue.
    embed_running: int = 0
    embed_waiting: int = 0
    embed_turn: asyncio.Lock = field(default_factory=asyncio.Lock)


class LlamaCppBackend:
    """Serves GGUF files in-process with llama-cpp-python."""

    name = "llama.cpp"

    def __init__(self, specs: Sequence[ModelSpec], serving: ServingConfig,
                 facts_cache: FileFactsCache | None = None, kvcache: KvCacheConfig | None = None) -> None:
        self._serving = serving
        self.specs = tuple(specs)
        self.identities: dict[str, dict] = {}  # model id -> ModelDescriptor.to_dict(), filled by descriptors()
        self.facts_cache = facts_cache  # sha256 and GGUF facts, remembered across restarts
        self._rate = TokenRate()
        self.prefill_rate = PrefillRate()  # measured prompt tokens/s: KV-cache pulls are weighed against it
        self._slots: dict[str, _Slot] = {}
        # One prefix cache for every model (entries are keyed by the weights' sha256),
        # so kvcache.max_bytes bounds the node, not each model. None: caching is off.
        self.prefix_cache: Any = None
        if kvcache is not None and kvcache.enabled:
            from ..kvcache import PrefixCache

            self.prefix_cache = PrefixCache(kvcache.max_bytes, min_tokens=kvcache.min_tokens)
        for spec in specs:
            self._slots[spec.id] = _Slot(
                spec=spec,
                engine=self._make_engine(spec),
                executor=ThreadPoolExecutor(1, thread_name_prefix=f"llama-{spec.id}"),
                embed_executor=ThreadPoolExecutor(1, thread_name_prefix=f"embed-{spec.id}"),
            )

    def _make_engine(self, spec: ModelSpec) -> Any:
        """The engine that runs ``spec`` on the slot's thread (the split backend's runs in a child process)."""
        return LlamaEngine(spec.path, spec.n_ctx, self._serving.n_threads, kv_hook=self._kv_hook(spec))

    def _kv_hook(self, spec: ModelSpec) -> Any:
        if self.prefix_cache is None:
            return None
        from ..kvcache import LlamaPrefixHook

        # The identity is asked for lazily (on the worker thread, at the first
        # request): the file's sha256 is known only once descriptors() ran.
        return LlamaPrefixHook(self.prefix_cache, lambda: self._require_identity(spec.id))

    def cache_identity(self, model: str) -> Any:
        """The ``CacheIdentity`` of a served model (by id or alias), or None if unknown or not served here."""
        from ..kvcache import CacheIdentity, KVCacheError

        spec = next((s for s in self.specs if model == s.id or model in s.aliases), None)
        if spec is None or spec.id not in self.identities:
            return None
        try:
            return CacheIdentity.from_descriptor(ModelDescriptor.from_dict(self.identities[spec.id]))
        except KVCacheError:
            return None  # weights of unknown sha256 never share caches

    def _require_identity(self, model: str) -> Any:
        from ..kvcache import CacheModelMismatch

        identity = self.cache_identity(model)
        if identity is None:
            # A KVCacheError: the hook logs it and the request prefills in full; asked again next time.
            raise CacheModelMismatch(f"model {model!r} is not described yet (file sha256 unknown)")
        return identity

    def prefix_announcements(self, sha256: str | None, limit: int) -> list[dict]:
        """The most recent cached prefixes of these weights, for capability announcements."""
        if self.prefix_cache is None or not sha256:
            return []
        found = [a for a in self.prefix_cache.announcements() if a.model_sha256 == sha256][:limit]
        return [{"prefix_sha256": a.prefix_sha256, "token_count": a.token_count, "nbytes": a.nbytes}
                for a in found]

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """The request's prompt token ids, as the engine will see them (for cache-aware routing).

        Blocking; run it in a worker thread. It only reads the model's vocabulary
        (llama_tokenize) and renders the chat template, never the context the
        model's worker thread decodes with, so it may run beside a generation.
        """
        spec = next((s for s in self.specs if request.model in (s.id, *s.aliases)), None)
        slot = self._ready_slot(spec.id if spec is not None else request.model)  # routing sees aliases
        return list(slot.engine.prompt_tokens(request)[0])

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Load every model off the event loop; a model that fails is marked failed."""
        loop = asyncio.get_running_loop()
        for slot in self._slots.values():
            try:
                await loop.run_in_executor(slot.executor, slot.engine.load)
            except MeshdError as exc:
                slot.state, slot.error = "failed", exc.message
                log.error("model failed to load", extra={"fields": {"model": slot.spec.id, "error": exc.message}})
                continue
            slot.state = "ready"
            log.info(
                "model ready",
                extra={"fields": {"model": slot.spec.id, "path": str(slot.spec.path), "n_ctx": slot.engine.context_length}},
            )

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for slot in self._slots.values():
            # Wait for the worker to finish whatever it runs, then free the model.
            await loop.run_in_executor(slot.executor, slot.engine.close)
            slot.executor.shutdown(wait=False)
            slot.embed_executor.shutdown(wait=False)

    # --- introspection ---------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        infos = []
        for slot in self._slots.values():
            ready = slot.state == "ready"
            infos.append(
                ModelInfo(
                    id=slot.spec.id,
                    aliases=slot.spec.aliases,
                    context_length=slot.engine.context_length if ready else None,
                    embedding_length=slot.engine.embedding_length if ready else None,
                    state=slot.state,
                    error=slot.error,
                    details={"path": str(slot.spec.path), "bundled": slot.spec.bundled,
                             "sha256": self.identities.get(slot.spec.id, {}).get("file_sha256"),
                             "identity": self.identities.get(slot.spec.id)},
                )
            )
        return infos

    def load(self) -> BackendLoad:
        return BackendLoad(
            in_flight=sum(s.running + s.embed_running for s in self._slots.values()),
            queued=sum(s.waiting + s.embed_waiting for s in self._slots.values()),
            tokens_per_s=self._rate.per_second(),
        )

    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(json_object=True, json_schema=True, resume=True)

    def health(self) -> BackendHealth:
        return health_of(self.models())

    async def descriptors(self) -> list[ModelDescriptor]:
        """GGUF identity per model, read and hashed in a worker thread once (then remembered).

        A file that cannot be read gets a descriptor with everything unknown (and
        is tried again next time); a missing ``gguf`` package raises ImportError.
        """
        out = []
        for spec in self.specs:
            if spec.id not in self.identities:
                try:
                    described = await describe_gguf_async(spec.path, model_id=spec.id, aliases=spec.aliases,
                                                          cache=self.facts_cache)
                except (OSError, ValueError) as exc:
                    log.warning("cannot describe model", extra={"fields": {"model": spec.id, "error": str(exc)}})
                    out.append(ModelDescriptor(id=spec.id, aliases=spec.aliases, backend=self.name))
                    continue
                self.identities[spec.id] = described.to_dict()
            out.append(ModelDescriptor.from_dict(self.identities[spec.id]))
        return out

    def _ready_slot(self, model: str) -> _Slot:
        slot = self._slots.get(model)
        if slot is None:
            raise ModelNotFound(f"The model '{model}' does not exist", param="model")
        if slot.state == "loading":
            raise ServiceUnavailable(
                f"The model '{model}' is still loading", code="model_loading",
                retry_after=self._serving.retry_after_s,
            )
        if slot.state == "failed":
            raise ServiceUnavailable(f"The model '{model}' failed to load: {slot.error}", code="model_unavailable")
        return slot

    def _admit(self, slot: _Slot, busy: int, what: str = "") -> None:
        """Refuse when ``busy`` (running + waiting) already fills one running and max_queue waiting."""
        if busy > self._serving.max_queue:
            raise QueueFull(
                f"The {what}queue for model '{slot.spec.id}' is full ({self._serving.max_queue} waiting); retry later",
                retry_after=self._serving.retry_after_s,
            )

    # --- generation ------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        slot = self._ready_slot(request.model)
        self._admit(slot, slot.running + slot.waiting)
        slot.waiting += 1  # counted from admission, so concurrent admits see it
        return MeteredStream(self._run(slot, request), self._rate, resumed=len(request.resume_token_ids),
                             prefill=self.prefill_rate)

    async def _run(self, slot: _Slot, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()
        acquired = False
        job: asyncio.Future[GenerationFinished] | None = None
        try:
            await slot.turn.acquire()
            acquired = True
            slot.waiting -= 1
            slot.running += 1

            def emit(event: object) -> None:
                loop.call_soon_threadsafe(events.put_nowait, event)

            def work() -> GenerationFinished:
                try:
                    return slot.engine.generate(request, emit, cancelled)
                finally:
                    emit(_DONE)

            job = loop.run_in_executor(slot.executor, work)
            while (event := await events.get()) is not _DONE:
                yield event  # type: ignore[misc]
            yield await job
        finally:
            if not acquired:
                slot.waiting -= 1
            elif job is None:
                slot.running -= 1
                slot.turn.release()
            else:
                cancelled.set()

                def release(_: object) -> None:
                    slot.running -= 1
                    slot.turn.release()

                # Release the model only once the worker thread has stopped.
                job.add_done_callback(lambda fut: loop.call_soon_threadsafe(release, fut))
                if not job.done():
                    log.info("generation cancelled", extra={"fields": {"model": slot.spec.id, "request_id": request.request_id}})
                elif not job.cancelled() and job.exception() is not None:
                    exc = job.exception()
                    if not isinstance(exc, MeshdError):
                        log.error("generation failed", exc_info=exc, extra={"fields": {"model": slot.spec.id}})

    # --- embeddings ------------------------------------------------------------

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        slot = self._ready_slot(request.model)
        # Admission as for generation: without it every request would wait in
        # the executor's unbounded queue, never refused, however long the wait.
        self._admit(slot, slot.embed_running + slot.embed_waiting, "embedding ")
        slot.embed_waiting += 1
        try:
            await slot.embed_turn.acquire()
        finally:
            slot.embed_waiting -= 1  # now running, or cancelled while it waited
        slot.embed_running += 1

        def release(job: asyncio.Future[object] | None) -> None:
            slot.embed_running -= 1
            slot.embed_turn.release()
            if job is not None and not job.cancelled():
                job.exception()  # retrieved here too: the caller may have gone away

        loop = asyncio.get_running_loop()
        try:
            job = loop.run_in_executor(slot.embed_executor, slot.engine.embed, request.inputs)
        except RuntimeError as exc:  # the executor is shut down: the daemon is stopping
            release(None)
            raise BackendError(f"embedding failed: {exc}") from exc
        # The turn is released when the thread has finished, not when the caller
        # stops waiting: a client that goes away cannot make two embeddings overlap.
        job.add_done_callback(release)
        try:
            vectors, tokens = await asyncio.shield(job)
        except MeshdError:
            raise
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"embedding failed: {exc}") from exc
        return EmbeddingResult(vectors=tuple(tuple(v) for v in vectors), prompt_tokens=tokens)


__all__ = ["LlamaCppBackend"]

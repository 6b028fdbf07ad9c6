"""The in-process llama.cpp backend: one queue and one worker thread per model.

Admission is decided on the event loop (a full queue raises ``QueueFull``
before anything is sent); execution happens in the model's single-thread
executor; events come back through ``call_soon_threadsafe``. A model's slot
is released only when its worker thread has really finished, so a cancelled
request can never overlap the next one on the same llama.cpp context.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..config import ModelSpec, ServingConfig
from ..errors import BackendError, MeshdError, ModelNotFound, QueueFull, ServiceUnavailable
from .base import (
    BackendLoad,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    ModelInfo,
    ModelState,
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


class LlamaCppBackend:
    """Serves GGUF files in-process with llama-cpp-python."""

    name = "llama.cpp"

    def __init__(self, specs: Sequence[ModelSpec], serving: ServingConfig) -> None:
        self._serving = serving
        self._slots: dict[str, _Slot] = {}
        for spec in specs:
            self._slots[spec.id] = _Slot(
                spec=spec,
                engine=LlamaEngine(spec.path, spec.n_ctx, serving.n_threads),
                executor=ThreadPoolExecutor(1, thread_name_prefix=f"llama-{spec.id}"),
                embed_executor=ThreadPoolExecutor(1, thread_name_prefix=f"embed-{spec.id}"),
            )

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
                    details={"path": str(slot.spec.path), "bundled": slot.spec.bundled},
                )
            )
        return infos

    def load(self) -> BackendLoad:
        return BackendLoad(
            in_flight=sum(s.running for s in self._slots.values()),
            queued=sum(s.waiting for s in self._slots.values()),
        )

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

    def _admit(self, slot: _Slot) -> None:
        busy = slot.running + slot.waiting
        if busy > self._serving.max_queue:
            raise QueueFull(
                f"The queue for model '{slot.spec.id}' is full ({self._serving.max_queue} waiting); retry later",
                retry_after=self._serving.retry_after_s,
            )

    # --- generation ------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        slot = self._ready_slot(request.model)
        self._admit(slot)
        slot.waiting += 1  # counted from admission, so concurrent admits see it
        return self._run(slot, request)

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
        loop = asyncio.get_running_loop()
        try:
            vectors, tokens = await loop.run_in_executor(slot.embed_executor, slot.engine.embed, request.inputs)
        except MeshdError:
            raise
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"embedding failed: {exc}") from exc
        return EmbeddingResult(vectors=tuple(tuple(v) for v in vectors), prompt_tokens=tokens)


__all__ = ["LlamaCppBackend"]

"""MLX models in-process through mlx-lm.

MLX is Apple's array framework; its fast path is Metal on Apple Silicon, where
this backend is meant to run. Off Apple Silicon, ``mlx[cpu]`` (Linux wheels)
also runs, on the CPU only: that is opt-in (``allow_cpu``) because llama.cpp
is the better CPU engine; without it the backend reports itself unavailable
with the reason.

Like the llama.cpp backend, each model has one worker thread: loading,
decoding and embedding all run there, never on the event loop, and events
come back through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import platform
import random
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import (
    BackendError,
    BackendUnavailable,
    ContextLengthExceeded,
    InvalidRequest,
    MeshdError,
    ModelNotFound,
    ServiceUnavailable,
    UnsupportedParameter,
)
from ..modelid import FileFactsCache, ModelDescriptor, describe_hf_dir
from .admission import Admission, AdmittedStream, MeteredStream, Ticket, TokenRate
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
    SamplingParams,
    TextGenerated,
    health_of,
)
from .llama_engine import find_stop, stop_holdback, utf8_safe_end

log = logging.getLogger(__name__)

_DONE = object()


@dataclass(frozen=True)
class MlxConfig:
    model: str  # a directory (config.json + *.safetensors + tokenizer) or a Hugging Face repo id
    id: str | None = None  # local model id; default: the directory or repo name
    aliases: tuple[str, ...] = ()
    allow_cpu: bool = False  # off Apple Silicon, run MLX's CPU build
    max_queue: int = 16
    retry_after_s: int = 2
    trust_remote_code: bool = False

    @property
    def local_id(self) -> str:
        return self.id or self.model.rstrip("/").rsplit("/", 1)[-1]


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def mlx_preflight(allow_cpu: bool = False) -> tuple[bool, str]:
    """(usable, why) from the platform and the installed packages alone: cheap, imports nothing.

    Off Apple Silicon a "usable" verdict still needs ``mlx_cpu_problem()`` to
    confirm the CPU build really runs.
    """
    installed = all(importlib.util.find_spec(name) is not None for name in ("mlx", "mlx_lm"))
    host = f"{sys.platform}/{platform.machine()}"
    if is_apple_silicon():
        if not installed:
            return False, "mlx-lm is not installed: pip install 'meshd[mlx]' (or pip install mlx-lm)"
        return True, "MLX on Apple Silicon (Metal)"
    if not allow_cpu:
        return False, (
            f"MLX is for Apple Silicon and this host is {host}; llama.cpp serves this CPU better. "
            "To run MLX's CPU build anyway set allow_cpu = true (pip install 'mlx[cpu]' mlx-lm)"
        )
    if not installed:
        return False, f"MLX's CPU build is not installed on this {host} host: pip install 'mlx[cpu]' mlx-lm"
    return True, f"MLX CPU build on {host} (no Metal: slower than llama.cpp here)"


def mlx_cpu_problem() -> str | None:
    """Blocking (imports mlx.core and computes): why MLX's CPU build does not run here, or None."""
    try:
        import mlx.core as mx

        mx.eval(mx.array([1.0]) + 1)  # the CPU build loads and computes
    except (ImportError, OSError, RuntimeError) as exc:
        return f"MLX is installed but does not run on this {sys.platform}/{platform.machine()} host: {exc}"
    return None


def mlx_availability(allow_cpu: bool = False) -> tuple[bool, str]:
    """(usable, why): whether MLX models can run here, and a sentence saying why (not). Blocking."""
    usable, why = mlx_preflight(allow_cpu)
    if usable and not is_apple_silicon():
        problem = mlx_cpu_problem()
        if problem is not None:
            return False, problem
    return usable, why


def _processors(params: SamplingParams) -> list[Any]:
    from mlx_lm.sample_utils import make_logits_processors

    return make_logits_processors(
        repetition_penalty=params.repeat_penalty if params.repeat_penalty != 1.0 else None,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
    )


def _replaying_sampler(params: SamplingParams, resume: list[int]) -> Callable[[Any], Any]:
    """The request's sampler, made to pick ``resume``'s tokens first.

    Resuming replays the original run step by step (same prompt batch, then one
    token at a time) rather than prefilling prompt + output at once, which could
    differ in the last bits and continue differently at temperature 0. The real
    sampler still runs at every replayed step, so a seeded random stream is
    consumed exactly as it was the first time.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    sample = make_sampler(temp=params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=params.top_k)
    if not resume:
        return sample
    step = 0

    def replay(logprobs: Any) -> Any:
        nonlocal step
        chosen = sample(logprobs)
        if step < len(resume):
            chosen = mx.array([resume[step]], dtype=chosen.dtype)
        step += 1
        return chosen

    return replay


class MlxEngine:
    """One mlx-lm model; every method runs on the model's worker thread."""

    def __init__(self, config: MlxConfig) -> None:
        self.config = config
        self.model: Any = None
        self.tokenizer: Any = None
        self.model_config: dict[str, Any] = {}
        self.path: Path | None = None

    def load(self) -> None:
        from mlx_lm import load

        try:
            self.model, self.tokenizer, self.model_config = load(
                self.config.model, return_config=True, trust_remote_code=self.config.trust_remote_code
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise BackendError(f"cannot load MLX model {self.config.model}: {exc}", code="model_load_failed") from exc
        local = Path(self.config.model)
        self.path = local if local.is_dir() else None

    @property
    def context_length(self) -> int | None:
        value = self.model_config.get("max_position_embeddings")
        return value if isinstance(value, int) else None

    @property
    def embedding_length(self) -> int | None:
        value = self.model_config.get("hidden_size")
        return value if isinstance(value, int) else None

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        tokenizer = self.tokenizer
        if request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            if getattr(tokenizer, "chat_template", None):
                return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return list(tokenizer.encode(text))
        return list(tokenizer.encode(request.prompt or ""))

    def generate(self, request: GenerationRequest, emit: Callable[[TextGenerated], None],
                 cancelled: threading.Event) -> GenerationFinished:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        started = time.perf_counter()
        params = request.params
        prompt = self.prompt_tokens(request)
        resume = list(request.resume_token_ids)
        limit = self.context_length
        if limit is not None and len(prompt) + len(resume) >= limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens; the prompt has {len(prompt)} tokens"
                + (f" and the output so far {len(resume)}." if resume else "."),
                param="messages" if request.messages is not None else "prompt",
            )
        room = (limit - len(prompt)) if limit is not None else None
        max_tokens = params.max_tokens or room or 256
        if room is not None:
            max_tokens = min(max_tokens, room)
        if resume and len(resume) >= max_tokens:
            return GenerationFinished("length", len(prompt), len(resume))
        mx.random.seed(params.seed if params.seed is not None else random.randrange(2**32))
        stops = [s.encode() for s in params.stop if s]
        eos = set(self.tokenizer.eos_token_ids)
        detok = self.tokenizer.detokenizer
        detok.reset()
        completion: list[int] = []
        sent_tokens = len(resume)  # completion tokens the client already has
        sent_bytes = len(request.resume_text.encode())  # and their text
        text = b""
        finish = "length"
        cut_by_stop = False
        ttft: float | None = None
        steps = generate_step(mx.array(prompt), self.model, max_tokens=max_tokens,
                              sampler=_replaying_sampler(params, resume), logits_processors=_processors(params))
        try:
            for token, _ in steps:
                if len(completion) < len(resume):  # replayed output, already delivered
                    completion.append(token)
                    detok.add_token(token)
                    continue
                if ttft is None:
                    ttft = time.perf_counter() - started
                if cancelled.is_set():
                    finish = "cancelled"
                    break
                if token in eos:
                    finish = "stop"
                    break
                completion.append(token)
                detok.add_token(token)
                text = detok.text.encode()
                cut = find_stop(text, stops)
                if cut >= 0:
                    text, finish, cut_by_stop = text[:cut], "stop", True
                    break
                end = utf8_safe_end(text, len(text) - stop_holdback(text, stops))
                if end > sent_bytes:
                    emit(TextGenerated(text[sent_bytes:end].decode("utf-8", errors="replace"), tuple(completion[sent_tokens:])))
                    sent_bytes, sent_tokens = end, len(completion)
                if len(completion) >= max_tokens:
                    break
        finally:
            steps.close()
        if finish != "cancelled":
            if not cut_by_stop:
                detok.finalize()  # flush text held back for an incomplete character
                text = detok.text.encode()
                cut = find_stop(text, stops)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
            if len(text) > sent_bytes or len(completion) > sent_tokens:
                emit(TextGenerated(text[sent_bytes:].decode("utf-8", errors="ignore"), tuple(completion[sent_tokens:])))
        return GenerationFinished(finish, len(prompt), len(completion), ttft)  # type: ignore[arg-type]

    def embed(self, inputs: tuple[str, ...]) -> tuple[list[list[float]], int]:
        """Mean of the final (normed) hidden states, L2-normalised: llama.cpp's mean pooling."""
        import mlx.core as mx

        inner = getattr(self.model, "model", None)
        if not callable(inner):
            raise InvalidRequest(f"the MLX model '{self.config.local_id}' cannot produce embeddings",
                                 code="embeddings_unsupported")
        vectors: list[list[float]] = []
        total = 0
        for index, text in enumerate(inputs):
            tokens = list(self.tokenizer.encode(text))
            if self.context_length is not None and len(tokens) > self.context_length:
                raise ContextLengthExceeded(
                    f"input[{index}] has {len(tokens)} tokens; the model's context is {self.context_length} tokens",
                    param="input",
                )
            total += len(tokens)
            hidden = inner(mx.array([tokens]))
            pooled = mx.mean(hidden[0].astype(mx.float32), axis=0).tolist()
            norm = math.sqrt(sum(v * v for v in pooled)) or 1.0
            vectors.append([v / norm for v in pooled])
        return vectors, total

    def close(self) -> None:
        self.model = self.tokenizer = None


class MlxBackend:
    """One MLX model served in-process."""

    def __init__(self, config: MlxConfig, facts_cache: FileFactsCache | None = None) -> None:
        # Cheap checks only (platform, packages): a config that cannot run here is
        # rejected at once. Importing mlx.core is slow; start() does it off the loop.
        usable, why = mlx_preflight(config.allow_cpu)
        if not usable:
            raise BackendUnavailable(f"MLX backend for '{config.local_id}' unavailable: {why}", code="mlx_unavailable")
        self.config = config
        self.name = f"mlx:{config.local_id}"
        self.runtime = why
        self.engine = MlxEngine(config)
        self.state: ModelState = "loading"
        self.error: str | None = None
        self.facts_cache = facts_cache
        self._described: list[ModelDescriptor] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"mlx-{config.local_id}")
        self._admission = Admission(1, config.max_queue, config.retry_after_s)
        self._rate = TokenRate()

    def _check_and_load(self) -> None:
        problem = None if is_apple_silicon() else mlx_cpu_problem()
        if problem is not None:
            raise BackendUnavailable(f"MLX backend for '{self.config.local_id}' unavailable: {problem}",
                                     code="mlx_unavailable")
        self.engine.load()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._check_and_load)
        except MeshdError as exc:
            self.state, self.error = "failed", exc.message
            log.error("model failed to load", extra={"fields": {"model": self.config.local_id, "error": exc.message}})
            return
        self.state = "ready"
        log.info("model ready", extra={"fields": {"model": self.config.local_id, "runtime": self.runtime}})

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.engine.close)
        self._executor.shutdown(wait=False)

    def models(self) -> list[ModelInfo]:
        ready = self.state == "ready"
        return [ModelInfo(
            id=self.config.local_id, aliases=self.config.aliases, owned_by=self.name,
            context_length=self.engine.context_length if ready else None,
            embedding_length=self.engine.embedding_length if ready else None,
            state=self.state, error=self.error, details={"model": self.config.model, "runtime": self.runtime},
        )]

    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(json_object=False, json_schema=False, resume=True)

    def health(self) -> BackendHealth:
        return health_of(self.models())

    def _describe(self) -> ModelDescriptor:
        path = self.engine.path or Path(self.config.model)
        if not (path / "config.json").is_file():  # a repo id: mlx-lm's download cache is not ours to read
            return ModelDescriptor(id=self.config.local_id, aliases=self.config.aliases, backend="mlx")
        return describe_hf_dir(path, model_id=self.config.local_id, aliases=self.config.aliases, cache=self.facts_cache)

    async def descriptors(self) -> list[ModelDescriptor]:
        """Hashes the weights in a worker thread, once the model has loaded (then remembered)."""
        if self._described is not None:
            return list(self._described)
        described = [await asyncio.to_thread(self._describe)]
        if self.state == "ready":
            self._described = described
        return described

    def load(self) -> BackendLoad:
        return BackendLoad(in_flight=self._admission.in_flight, queued=self._admission.queued,
                           tokens_per_s=self._rate.per_second())

    def _check(self, model: str) -> None:
        if model != self.config.local_id:
            raise ModelNotFound(f"The model '{model}' does not exist", param="model")
        if self.state == "loading":
            raise ServiceUnavailable(f"The model '{model}' is still loading", code="model_loading",
                                     retry_after=self.config.retry_after_s)
        if self.state == "failed":
            raise ServiceUnavailable(f"The model '{model}' failed to load: {self.error}", code="model_unavailable")

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self._check(request.model)
        fmt = request.params.response_format
        if fmt and fmt.get("type") != "text":
            raise UnsupportedParameter("the MLX backend cannot constrain output to a response_format",
                                       param="response_format")
        ticket = self._admission.admit(f"model '{request.model}'")
        return MeteredStream(AdmittedStream(self._run(ticket, request), ticket), self._rate,
                             resumed=len(request.resume_token_ids))

    async def _run(self, ticket: Ticket, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(event: object) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def work() -> GenerationFinished:
            try:
                return self.engine.generate(request, emit, cancelled)
            finally:
                emit(_DONE)

        async with self._admission.slot(ticket):
            job = loop.run_in_executor(self._executor, work)
            # If we leave early nobody awaits the job: retrieve its outcome anyway.
            job.add_done_callback(lambda fut: fut.cancelled() or fut.exception())
            try:
                while (event := await events.get()) is not _DONE:
                    yield event  # type: ignore[misc]
                final = await job
            finally:
                # The single worker thread runs jobs one after another, so the
                # next request cannot overlap this one even if we leave early.
                cancelled.set()
        ticket.release()  # before the last event, so load() is exact when the caller sees it
        yield final

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        self._check(request.model)
        loop = asyncio.get_running_loop()
        vectors, tokens = await loop.run_in_executor(self._executor, self.engine.embed, request.inputs)
        return EmbeddingResult(vectors=tuple(tuple(v) for v in vectors), prompt_tokens=tokens)


__all__ = ["MlxBackend", "MlxConfig", "MlxEngine", "is_apple_silicon", "mlx_availability", "mlx_cpu_problem",
           "mlx_preflight"]

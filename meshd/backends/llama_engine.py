"""Synchronous llama.cpp execution, confined to one worker thread per model.

Owns the ``llama_cpp.Llama`` objects and the token loop. It is called only
from the backend's executor thread, never from the event loop: llama.cpp
contexts are not thread-safe, and decode calls release the GIL, so the event
loop stays responsive while this runs.

The token loop is ours rather than ``Llama.create_completion`` so that we
see every token id (usage in streams, exact resume later), can stop within
one token on cancellation, and time the first token.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import BackendError, ContextLengthExceeded, InvalidRequest
from .base import (
    GenerationFinished,
    GenerationRequest,
    SamplingParams,
    TextGenerated,
)

log = logging.getLogger(__name__)

Emit = Callable[[TextGenerated], None]


def _import_llama() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendError(
            "llama-cpp-python is not installed; install meshd[llama] (scripts/install does)"
        ) from exc
    return llama_cpp


def stop_holdback(text: bytes, stops: Sequence[bytes]) -> int:
    """How many trailing bytes of ``text`` could still begin a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def utf8_safe_end(text: bytes, end: int) -> int:
    """Move ``end`` back so that ``text[:end]`` ends on a whole UTF-8 character."""
    start = max(0, end - 3)
    for index in range(end - 1, start - 1, -1):
        byte = text[index]
        if byte < 0x80:
            return end
        if byte >= 0xC0:  # a lead byte: is its sequence complete before end?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return end if end - index >= need else index
    return end


def find_stop(text: bytes, stops: Sequence[bytes]) -> int:
    """Byte offset of the earliest stop sequence in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


class LlamaEngine:
    """One GGUF model: a generation context and, on demand, an embedding context."""

    def __init__(self, path: Path, n_ctx: int, n_threads: int = 0, kv_hook: Any = None,
                 llama_kwargs: dict[str, Any] | None = None) -> None:
        self.path = path
        # Extra ``Llama(...)`` arguments for the generation context, e.g. the
        # n_gpu_layers and tensor_split of a model split over RPC devices.
        self.llama_kwargs = dict(llama_kwargs or {})
        # Optional meshd.kvcache.LlamaPrefixHook: restores a cached prefix before
        # a request and keeps the conversation's KV after it. None: every request
        # prefills in full (bit-reproducible, see the reset below).
        self.kv_hook = kv_hook
        self.n_ctx = n_ctx
        self.n_threads = n_threads or None
        self._llama_cpp = _import_llama()
        self._llama: Any = None
        self._embedder: Any = None
        self._formatter: Any = None
        self._embed_lock = threading.Lock()

    # --- loading -------------------------------------------------------------

    def load(self) -> None:
        if not self.path.is_file():
            raise BackendError(f"model file not found: {self.path}", code="model_file_missing")
        try:
            self._llama = self._llama_cpp.Llama(
                str(self.path), n_ctx=self.n_ctx, n_threads=self.n_threads, verbose=False,
                **self.llama_kwargs,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendError(f"cannot load {self.path}: {exc}", code="model_load_failed") from exc
        self._formatter = self._make_formatter()

    def _make_formatter(self) -> Any:
        from llama_cpp import llama_chat_format

        llama = self._llama
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            return llama_chat_format.format_chatml
        eos_id, bos_id = llama.token_eos(), llama.token_bos()
        # The same formatter Llama builds for "chat_template.default", so chat
        # output matches create_chat_completion on the same model.
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=llama._model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=llama._model.token_get_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id],
        )

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._llama.metadata) if self._llama else {}

    @property
    def context_length(self) -> int:
        return int(self._llama.n_ctx())

    @property
    def embedding_length(self) -> int:
        return int(self._llama.n_embd())

    def close(self) -> None:
        for llama in (self._llama, self._embedder):
            if llama is not None:
                llama.close()
        self._llama = self._embedder = None

    # --- prompts ---------------------------------------------------------------

    def prompt_tokens(self, request: GenerationRequest) -> tuple[list[int], list[str]]:
        """Tokenize the request's prompt; returns the tokens and extra stop strings."""
        llama = self._llama
        if request.messages is not None:
            result = self._formatter(
                messages=[{"role": m.role, "content": m.content} for m in request.messages]
            )
            tokens = llama.tokenize(
                result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True
            )
            stop = result.stop or []
            return tokens, [stop] if isinstance(stop, str) else list(stop)
        text = request.prompt or ""
        # Mirrors create_completion: BOS only when the model asks for it.
        bos = [llama.token_bos()] if llama._model.add_bos_token() and llama.token_bos() != -1 else []
        return bos + llama.tokenize(text.encode("utf-8"), add_bos=False, special=True), []

    def _grammar(self, params: SamplingParams) -> Any:
        fmt = params.response_format
        if not fmt or fmt.get("type") == "text":
            return None
        from llama_cpp import llama_grammar

        try:
            if fmt.get("type") == "json_schema":
                schema = fmt.get("json_schema", {})
                import json

                body = schema.get("schema", {}) if isinstance(schema, dict) else {}
                return llama_grammar.LlamaGrammar.from_json_schema(json.dumps(body), verbose=False)
            return llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise InvalidRequest(f"cannot use this response_format: {exc}", param="response_format") from exc

    # --- generation ------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        emit: Emit,
        cancelled: threading.Event,
    ) -> GenerationFinished:
        llama = self._llama
        started = time.perf_counter()
        params = request.params
        prompt, template_stops = self.prompt_tokens(request)
        if len(prompt) >= self.context_length:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens; "
                f"the prompt has {len(prompt)} tokens.",
                param="messages" if request.messages is not None else "prompt",
            )
        room = self.context_length - len(prompt)
        max_tokens = min(params.max_tokens or room, room)
        stops = [s.encode("utf-8") for s in (*params.stop, *template_stops) if s]
        grammar = self._grammar(params)
        llama.set_seed(params.seed if params.seed is not None else random.randrange(2**32))

        # Start from an empty context. llama-cpp-python would otherwise reuse the
        # KV of a shared prefix from the previous request, and decoding one token
        # against a cached prefix is not bit-identical to a batched prefill: at
        # temperature 0 the text would depend on what ran before. Reproducible
        # output matters more here (failover resumes on another node).
        llama.reset()
        resume = list(request.resume_token_ids)
        cached = 0  # prompt tokens restored from the prefix cache, not decoded
        if self.kv_hook is not None and not resume:
            # Opt-in trade of that reproducibility for speed: only the uncached
            # suffix is decoded (generate() reuses the imported prefix).
            cached = self.kv_hook.restore(llama, prompt)
        if resume and grammar is not None:
            raise InvalidRequest("constrained output (response_format) cannot be resumed on another node",
                                 code="resume_unsupported")
        if len(prompt) + len(resume) >= self.context_length:
            raise ContextLengthExceeded("the prompt and the output so far fill the context", param="messages")
        if resume and len(resume) >= max_tokens:
            return GenerationFinished("length", len(prompt), len(resume))
        completion: list[int] = list(resume)
        sent_tokens = len(resume)  # completion tokens already reported in a delta
        sent_bytes = len(request.resume_text.encode("utf-8"))  # completion text the client already has
        finish = "length"
        ttft: float | None = None
        text = b""
        sampling = dict(
            top_k=params.top_k, top_p=params.top_p, min_p=params.min_p, temp=params.temperature,
            repeat_penalty=params.repeat_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, grammar=grammar,
        )
        if resume:
            # Replay the original evaluation pattern exactly: the prompt as one
            # batch, then each delivered token on its own. A single batched
            # prefill of prompt + output would differ in the last bits and, at
            # temperature 0, could continue differently.
            llama.eval(prompt)
            for token in resume[:-1]:
                llama.eval([token])
            tokens = llama.generate(resume[-1:], reset=False, **sampling)
        else:
            tokens = llama.generate(prompt, **sampling)
        try:
            for token in tokens:
                if ttft is None:
                    ttft = time.perf_counter() - started
                if cancelled.is_set():
                    finish = "cancelled"
                    break
                if self._llama_cpp.llama_vocab_is_eog(llama._model.vocab, token):
                    finish = "stop"
                    break
                completion.append(token)
                text = llama.detokenize(completion, prev_tokens=prompt)
                cut = find_stop(text, stops)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
                end = utf8_safe_end(text, len(text) - stop_holdback(text, stops))
                if end > sent_bytes:
                    emit(TextGenerated(text[sent_bytes:end].decode("utf-8", errors="replace"), tuple(completion[sent_tokens:])))
                    sent_bytes, sent_tokens = end, len(completion)
                if len(completion) >= max_tokens:
                    break
        finally:
            tokens.close()
        if finish != "cancelled" and (len(text) > sent_bytes or len(completion) > sent_tokens):
            tail = text[sent_bytes:].decode("utf-8", errors="ignore")
            emit(TextGenerated(tail, tuple(completion[sent_tokens:])))
        if self.kv_hook is not None and finish != "cancelled":
            self.kv_hook.store(llama)  # after the last text: the client is not kept waiting
        return GenerationFinished(
            finish_reason=finish,  # type: ignore[arg-type]
            prompt_tokens=len(prompt),
            completion_tokens=len(completion),
            ttft_s=ttft,
            cached_tokens=cached,
        )

    # --- embeddings ------------------------------------------------------------

    def _embedding_llama(self) -> Any:
        # A second context with mean pooling: causal LMs default to no pooling,
        # which would return one vector per token instead of one per input.
        with self._embed_lock:
            if self._embedder is None:
                lc = self._llama_cpp
                self._embedder = lc.Llama(
                    str(self.path),
                    n_ctx=self.n_ctx,
                    n_threads=self.n_threads,
                    embedding=True,
                    pooling_type=lc.LLAMA_POOLING_TYPE_MEAN,
                    verbose=False,
                )
            return self._embedder

    def embed(self, inputs: Sequence[str]) -> tuple[list[list[float]], int]:
        llama = self._embedding_llama()
        total = 0
        vectors: list[list[float]] = []
        for index, text in enumerate(inputs):
            tokens = llama.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            if len(tokens) > self.context_length:
                raise ContextLengthExceeded(
                    f"input[{index}] has {len(tokens)} tokens; the model's context is "
                    f"{self.context_length} tokens",
                    param="input",
                )
            total += len(tokens)
            vector = llama.embed(text, normalize=False)
            # OpenAI embeddings are unit length; normalise here, explicitly.
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            vectors.append([v / norm for v in vector])
        return vectors, total


__all__ = ["LlamaEngine", "find_stop", "stop_holdback", "utf8_safe_end"]

"""The one protocol every backend implements, and the typed values it moves.

The API layer turns HTTP bodies into these requests; backends turn them into
a stream of ``TextGenerated`` deltas closed by one ``GenerationFinished``.
Nothing here knows about HTTP, JSON or asyncio transports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "cancelled"]
ModelState = Literal["loading", "ready", "failed"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings. Defaults are llama.cpp server's, documented in docs/api.md."""

    max_tokens: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # None, {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}
    response_format: Mapping[str, object] | None = None


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """A chat (``messages``) or text completion (``prompt``) request."""

    model: str
    params: SamplingParams
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    request_id: str = ""
    # Failover resume: completion tokens already produced elsewhere, and the
    # text of them the client has already received. The backend continues
    # after them and emits only text beyond ``resume_text``.
    resume_token_ids: tuple[int, ...] = ()
    resume_text: str = ""


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str, ...]
    request_id: str = ""


@dataclass(frozen=True)
class TextGenerated:
    """A delta of completion text and the token ids it covers.

    Text is held back while it could still be the start of a stop sequence or
    an incomplete UTF-8 character, so ``token_ids`` may run ahead of ``text``.
    """

    text: str
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerationFinished:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None = None  # time from admission to the first generated token


GenerationEvent = TextGenerated | GenerationFinished


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int


@dataclass(frozen=True)
class ModelInfo:
    """What a backend says about one model it serves."""

    id: str
    aliases: tuple[str, ...] = ()
    owned_by: str = "meshd"
    context_length: int | None = None
    embedding_length: int | None = None
    state: ModelState = "loading"
    error: str | None = None
    details: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendLoad:
    in_flight: int
    queued: int


@runtime_checkable
class Backend(Protocol):
    """A source of completions and embeddings for one or more models."""

    name: str

    def models(self) -> list[ModelInfo]: ...

    def load(self) -> BackendLoad: ...

    async def start(self) -> None:
        """Load models; raises a MeshdError subclass if it cannot."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Admit the request (raising QueueFull at once) and stream its events.

        Closing the iterator early cancels the generation within a token.
        """
        ...

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult: ...

    async def close(self) -> None: ...


__all__ = [
    "Backend",
    "BackendLoad",
    "ChatMessage",
    "EmbeddingRequest",
    "EmbeddingResult",
    "FinishReason",
    "GenerationEvent",
    "GenerationFinished",
    "GenerationRequest",
    "ModelInfo",
    "ModelState",
    "SamplingParams",
    "TextGenerated",
]

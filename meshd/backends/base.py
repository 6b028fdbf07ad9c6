"""The one protocol every backend implements, and the typed values it moves.

The API layer turns HTTP bodies into these requests; backends turn them into
a stream of ``TextGenerated`` deltas closed by one ``GenerationFinished``.
Nothing here knows about HTTP, JSON or asyncio transports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..modelid import ModelDescriptor

FinishReason = Literal["stop", "length", "cancelled"]
ModelState = Literal["loading", "ready", "failed"]
HealthStatus = Literal["ok", "starting", "degraded", "down"]


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
    cached_tokens: int = 0  # prompt tokens restored from a KV cache instead of prefilled


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
    tokens_per_s: float = 0.0  # completion tokens per second over the last minute


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend can do; the same for every model it serves."""

    chat: bool = True
    completion: bool = True
    embeddings: bool = True
    streaming: bool = True  # text arrives token by token (or chunk by chunk), not all at the end
    json_object: bool = False  # response_format {"type": "json_object"}
    json_schema: bool = False  # response_format {"type": "json_schema"}
    resume: bool = False  # continues a generation from resume_token_ids (failover)
    cancellation: bool = True  # closing the iterator stops the work within a token or a chunk

    def names(self) -> list[str]:
        """The capabilities it has, as wire names (sorted)."""
        return sorted(f.name for f in fields(self) if getattr(self, f.name))


@dataclass(frozen=True)
class BackendHealth:
    """``ok``: every model ready; ``starting``: some still loading; ``degraded``: some
    failed, some ready; ``down``: nothing can be served. ``reason`` says why when not ok."""

    status: HealthStatus
    reason: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"status": self.status, "reason": self.reason}


def health_of(models: Iterable[ModelInfo]) -> BackendHealth:
    """A backend's health from its models' states (the usual ``health()``)."""
    infos = list(models)
    failed = [m for m in infos if m.state == "failed"]
    loading = [m for m in infos if m.state == "loading"]
    why = "; ".join(f"{m.id}: {m.error or 'failed'}" for m in failed) or None
    if not infos:
        return BackendHealth("down", "serves no models")
    if len(failed) == len(infos):
        return BackendHealth("down", why)
    if failed:
        return BackendHealth("degraded", why)
    if loading:
        return BackendHealth("starting", "loading: " + ", ".join(m.id for m in loading))
    return BackendHealth("ok")


@runtime_checkable
class Backend(Protocol):
    """A source of completions and embeddings for one or more models."""

    name: str

    def capabilities(self) -> BackendCapabilities: ...

    def models(self) -> list[ModelInfo]: ...

    def health(self) -> BackendHealth:
        """Cheap (no I/O): from what the backend already knows."""
        ...

    def load(self) -> BackendLoad: ...

    async def descriptors(self) -> list[ModelDescriptor]:
        """Identity of every model it serves; unknown fields are None, never guessed.

        Hashing and file reads run in worker threads, never on the event loop.
        """
        ...

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
    "BackendCapabilities",
    "BackendHealth",
    "BackendLoad",
    "ChatMessage",
    "EmbeddingRequest",
    "EmbeddingResult",
    "FinishReason",
    "GenerationEvent",
    "GenerationFinished",
    "GenerationRequest",
    "HealthStatus",
    "ModelInfo",
    "ModelState",
    "SamplingParams",
    "TextGenerated",
    "health_of",
]

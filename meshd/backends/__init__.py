"""Backends: where completions and embeddings actually come from."""

from .base import (
    Backend,
    BackendLoad,
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    TextGenerated,
)

__all__ = [
    "Backend",
    "BackendLoad",
    "ChatMessage",
    "EmbeddingRequest",
    "EmbeddingResult",
    "GenerationEvent",
    "GenerationFinished",
    "GenerationRequest",
    "ModelInfo",
    "SamplingParams",
    "TextGenerated",
]

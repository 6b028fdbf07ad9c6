"""OpenAI response bodies and SSE chunks, built from backend events."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import GenerationFinished, ModelInfo


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def usage(finished: GenerationFinished) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }
    if finished.cached_tokens:
        # OpenAI's field for prompt tokens served from a cache (only with [kvcache] enabled).
        body["prompt_tokens_details"] = {"cached_tokens": finished.cached_tokens}
    return body


def model_object(info: ModelInfo, created: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"state": info.state, "aliases": list(info.aliases)}
    if info.context_length:
        meta["context_length"] = info.context_length
    if info.embedding_length:
        meta["embedding_length"] = info.embedding_length
    if info.error:
        meta["error"] = info.error
    if (info.details or {}).get("split"):
        meta["split"] = info.details["split"]  # where a split model's layers run (docs/split.md)
    return {"id": info.id, "object": "model", "created": created, "owned_by": info.owned_by, "meshd": meta}


@dataclass
class Completion:
    """Shapes one generation as chat or text completion, whole or streamed."""

    chat: bool
    model: str
    include_usage: bool = False
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or new_id("chatcmpl" if self.chat else "cmpl")
        self._object = "chat.completion" if self.chat else "text_completion"

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return body

    def _choice(self, text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    # --- streaming -------------------------------------------------------------

    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def first_chunk(self) -> bytes | None:
        """Chat streams announce the role once, with empty content, as OpenAI does."""
        if not self.chat:
            return None
        return sse(self._envelope(self.chunk_object(), [self._choice("", None, role=True)]))

    def text_chunk(self, text: str) -> bytes:
        return sse(self._envelope(self.chunk_object(), [self._choice(text, None)]))

    def final_chunks(self, finished: GenerationFinished) -> bytes:
        out = [sse(self._envelope(self.chunk_object(), [self._choice(None if self.chat else "", finished.finish_reason)]))]
        if self.include_usage:
            body = self._envelope(self.chunk_object(), [])
            body["usage"] = usage(finished)
            out.append(sse(body))
        out.append(sse("[DONE]"))
        return b"".join(out)

    # --- whole -----------------------------------------------------------------

    def whole(self, text: str, finished: GenerationFinished) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finished.finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finished.finish_reason}
        return {
            "id": self.id,
            "object": self._object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(finished),
        }


__all__ = ["Completion", "model_object", "new_id", "sse", "usage"]

"""The OpenAI wire format as an upstream speaks it: sans-IO pieces.

Request bodies from typed requests, SSE decoding, chunk parsing, embedding
pooling and error mapping. No sockets, no asyncio: ``upstream.py`` moves the
bytes, these functions decide what they mean, and tests drive them directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import (
    ContextLengthExceeded,
    InvalidRequest,
    MeshdError,
    ModelNotFound,
    PayloadTooLarge,
    QueueFull,
    UnsupportedParameter,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .base import FinishReason, GenerationRequest, SamplingParams

# Which sampling extensions an upstream understands, and under which names.
# llama.cpp's llama-server, llama-cpp-python's server and LM Studio: top_k,
# min_p, repeat_penalty. vLLM: top_k, min_p, repetition_penalty. OpenAI proper
# and Ollama's /v1: none (OpenAI rejects unknown fields, Ollama ignores them).
Dialect = Literal["openai", "llama.cpp", "vllm", "ollama"]
DIALECTS: tuple[str, ...] = ("openai", "llama.cpp", "vllm", "ollama")
_EXTENSION_NAMES: dict[str, dict[str, str]] = {
    "llama.cpp": {"top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repeat_penalty"},
    "vllm": {"top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repetition_penalty"},
    "openai": {},
    "ollama": {},
}
_DEFAULTS = SamplingParams()


def request_body(
    request: GenerationRequest,
    upstream_model: str,
    dialect: str,
    *,
    stream: bool,
    include_usage: bool,
) -> dict[str, Any]:
    """The /v1/chat/completions or /v1/completions body for ``request``.

    Standard fields are always sent; llama.cpp's sampling extensions only when
    the request moved them off their defaults, so an upstream keeps its own
    defaults otherwise. A moved extension the dialect cannot express is refused
    rather than silently dropped.
    """
    params = request.params
    body: dict[str, Any] = {"model": upstream_model, "stream": stream}
    if request.messages is not None:
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        body["prompt"] = request.prompt or ""
    if stream and include_usage:
        body["stream_options"] = {"include_usage": True}
    body["temperature"] = params.temperature
    body["top_p"] = params.top_p
    if params.max_tokens is not None:
        body["max_tokens"] = params.max_tokens
    if params.presence_penalty:
        body["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        body["frequency_penalty"] = params.frequency_penalty
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.response_format is not None:
        body["response_format"] = dict(params.response_format)
    names = _EXTENSION_NAMES.get(dialect, {})
    for field_name in ("top_k", "min_p", "repeat_penalty"):
        value = getattr(params, field_name)
        if value == getattr(_DEFAULTS, field_name):
            continue
        if field_name not in names:
            raise UnsupportedParameter(
                f"'{field_name}' is a llama.cpp extension that this upstream ({dialect} dialect) does not accept",
                param=field_name,
            )
        body[names[field_name]] = value
    return body


# --- server-sent events -----------------------------------------------------------


class SseDecoder:
    """Feed it lines; it returns each event's data when the event ends.

    Comments (``: ping``) and other fields are skipped; multi-line data is
    joined with newlines, as the SSE spec says.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed_line(self, line: bytes) -> str | None:
        text = line.decode("utf-8", errors="replace").rstrip("\r\n")
        if not text:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if text.startswith(":"):
            return None
        name, _, value = text.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """Data of a last event the server did not terminate with a blank line."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


# --- responses ---------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ChunkFacts:
    """What one streamed chunk (or a whole response) says."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


def parse_usage(raw: Any) -> Usage | None:
    if not isinstance(raw, Mapping):
        return None
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt, completion)


def _json_object(payload: Any, upstream: str) -> Mapping[str, Any]:
    """Every OpenAI response body is an object; anything else is the upstream's fault (502)."""
    if not isinstance(payload, Mapping):
        raise UpstreamError(f"{upstream} answered with a JSON {type(payload).__name__}, not an object")
    return payload


def parse_choice_payload(payload: Any, chat: bool, upstream: str = "upstream") -> ChunkFacts:
    """A chunk or a whole response: text of choice 0, its finish reason, usage.

    Raises the mapped error when the payload is an ``{"error": ...}`` object
    (some servers report mid-stream failures that way).
    """
    payload = _json_object(payload, upstream)
    if "error" in payload and not payload.get("choices"):
        raise error_from_payload(upstream, None, payload)
    usage = parse_usage(payload.get("usage"))
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        return ChunkFacts(usage=usage)
    choice = choices[0]
    text: Any
    if chat:
        holder = choice.get("delta") if isinstance(choice.get("delta"), Mapping) else choice.get("message")
        text = holder.get("content") if isinstance(holder, Mapping) else None
    else:
        text = choice.get("text")
    reason = choice.get("finish_reason")
    return ChunkFacts(
        text=text if isinstance(text, str) else "",
        finish_reason=reason if isinstance(reason, str) else None,
        usage=usage,
    )


def finish_reason(raw: str | None) -> FinishReason:
    """OpenAI's reasons folded into ours: only a length cut-off is not a stop."""
    return "length" if raw == "length" else "stop"


def pool_embedding(raw: Any) -> tuple[list[float], int]:
    """One unit vector from an upstream embedding, and how many token vectors it had.

    Servers without pooling (llama-cpp-python's, for causal models) return one
    vector per token: those are mean-pooled, as llama.cpp's mean pooling does.
    Every vector is L2-normalised, like the in-process backend's.
    """
    if not isinstance(raw, list) or not raw:
        raise UpstreamError("upstream returned an empty or malformed embedding")
    if isinstance(raw[0], list):
        width = len(raw[0])
        if not width or any(not isinstance(row, list) or len(row) != width for row in raw):
            raise UpstreamError("upstream returned ragged per-token embeddings")
        vector = [sum(row[i] for row in raw) / len(raw) for i in range(width)]
        tokens = len(raw)
    else:
        vector = [float(v) for v in raw]
        tokens = 0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector], tokens


def embedding_vectors(payload: Any, expected: int) -> tuple[list[list[float]], int, int]:
    """Vectors in input order, upstream-reported prompt tokens, counted token vectors."""
    data = _json_object(payload, "upstream").get("data")
    if not isinstance(data, list) or len(data) != expected:
        raise UpstreamError(f"upstream returned {len(data) if isinstance(data, list) else 'no'} embeddings for {expected} inputs")
    ordered = sorted(data, key=lambda item: item.get("index", 0) if isinstance(item, Mapping) else 0)
    vectors: list[list[float]] = []
    counted = 0
    for item in ordered:
        if not isinstance(item, Mapping):
            raise UpstreamError("upstream returned a malformed embedding item")
        vector, tokens = pool_embedding(item.get("embedding"))
        vectors.append(vector)
        counted += tokens
    usage = payload.get("usage")
    prompt = usage.get("prompt_tokens") if isinstance(usage, Mapping) else None
    return vectors, prompt if isinstance(prompt, int) else 0, counted


# --- errors ------------------------------------------------------------------------


def _error_message(payload: Any) -> tuple[str, Any, Any]:
    """(message, code, param) from the shapes servers use for errors."""
    if isinstance(payload, Mapping):
        error = payload.get("error")
        if isinstance(error, Mapping):
            return str(error.get("message") or json.dumps(error)), error.get("code"), error.get("param")
        if isinstance(error, str):  # Ollama: {"error": "model 'x' not found"}
            return error, None, None
        detail = payload.get("detail")  # FastAPI: {"detail": "Not Found"} or a validation list
        if detail is not None:
            return detail if isinstance(detail, str) else json.dumps(detail), None, None
        message = payload.get("message")  # vLLM's older ErrorResponse
        if isinstance(message, str):
            return message, payload.get("code"), payload.get("param")
    return "", None, None


def error_from_payload(
    upstream: str,
    status: int | None,
    payload: Any,
    raw: bytes = b"",
    retry_after: float | None = None,
) -> MeshdError:
    """Map an upstream's error answer to our family, keeping its status in the message."""
    message, code, param = _error_message(payload)
    if not message:
        message = raw.decode("utf-8", errors="replace").strip()[:500] or "no details"
    where = f"upstream '{upstream}'" + (f" returned HTTP {status}" if status is not None else " reported an error")
    text = f"{where}: {message}"
    param = param if isinstance(param, str) else None
    lowered = message.lower()
    if code == "context_length_exceeded" or ("context" in lowered and ("length" in lowered or "window" in lowered)):
        return ContextLengthExceeded(text, param=param)
    if status in (400, 422):
        return InvalidRequest(text, param=param)
    if status == 404 and (code == "model_not_found" or "model" in lowered):
        return ModelNotFound(text, param="model")
    if status == 413:
        return PayloadTooLarge(text)
    if status == 429:
        return QueueFull(text, code="upstream_busy", retry_after=retry_after)
    if status in (408, 504):
        return UpstreamTimeout(text, upstream_status=status)
    if status in (502, 503):
        return UpstreamUnavailable(text, upstream_status=status, retry_after=retry_after)
    if status in (401, 403):
        return UpstreamError(text, upstream_status=status, code="upstream_auth_failed")
    return UpstreamError(text, upstream_status=status)


def error_from_response(upstream: str, status: int, body: bytes, headers: Mapping[str, str]) -> MeshdError:
    try:
        payload: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        payload = None
    retry_after: float | None = None
    header = headers.get("Retry-After")
    if header is not None:
        try:
            retry_after = float(header)
        except ValueError:
            retry_after = None
    return error_from_payload(upstream, status, payload, body, retry_after)


def models_listing(payload: Any) -> dict[str, Mapping[str, Any]]:
    """``/v1/models`` as {upstream model id: entry}."""
    data = payload.get("data") if isinstance(payload, Mapping) else None
    if not isinstance(data, list):
        raise UpstreamError("upstream /v1/models did not return a model list")
    return {str(e["id"]): e for e in data if isinstance(e, Mapping) and "id" in e}


def ollama_tags(payload: Any) -> dict[str, Mapping[str, Any]]:
    """Ollama's ``/api/tags`` as {model name: entry}."""
    models = payload.get("models") if isinstance(payload, Mapping) else None
    if not isinstance(models, list):
        return {}
    return {str(m.get("name") or m.get("model")): m for m in models if isinstance(m, Mapping)}


def batched(items: Sequence[str], size: int) -> list[Sequence[str]]:
    """Split ``items`` into chunks of ``size`` (0: one chunk)."""
    if size <= 0 or size >= len(items):
        return [items]
    return [items[i : i + size] for i in range(0, len(items), size)]


__all__ = [
    "DIALECTS",
    "ChunkFacts",
    "Dialect",
    "SseDecoder",
    "Usage",
    "batched",
    "embedding_vectors",
    "error_from_payload",
    "error_from_response",
    "finish_reason",
    "models_listing",
    "ollama_tags",
    "parse_choice_payload",
    "parse_usage",
    "pool_embedding",
    "request_body",
]

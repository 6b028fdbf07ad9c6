"""Typed backend requests <-> the `InferenceRequest` frame's body, and errors <-> codes."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..backends.base import ChatMessage, EmbeddingRequest, GenerationRequest, SamplingParams
from ..errors import (
    BackendError,
    ContextLengthExceeded,
    InvalidRequest,
    MeshdError,
    ModelNotFound,
    PermissionDenied,
    QueueFull,
    ServiceUnavailable,
)

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def generation_body(request: GenerationRequest) -> dict[str, Any]:
    params = dataclasses.asdict(request.params)
    params["stop"] = list(params["stop"])
    body: dict[str, Any] = {"params": params}
    if request.messages is not None:
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        body["prompt"] = request.prompt or ""
    return body


def generation_from_body(model: str, body: dict[str, Any], request_id: str) -> GenerationRequest:
    raw = body.get("params")
    if not isinstance(raw, dict) or set(raw) - _SAMPLING_FIELDS:
        raise InvalidRequest("forwarded request has bad sampling parameters")
    raw = dict(raw)
    raw["stop"] = tuple(raw.get("stop") or ())
    try:
        params = SamplingParams(**raw)
    except TypeError as exc:
        raise InvalidRequest(f"forwarded request has bad sampling parameters: {exc}") from None
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidRequest("forwarded request has bad messages")
        chat = tuple(ChatMessage(role=str(m.get("role")), content=str(m.get("content", ""))) for m in messages)
        return GenerationRequest(model=model, params=params, messages=chat, request_id=request_id)
    return GenerationRequest(model=model, params=params, prompt=str(body.get("prompt", "")), request_id=request_id)


def embedding_body(request: EmbeddingRequest) -> dict[str, Any]:
    return {"inputs": list(request.inputs)}


def embedding_from_body(model: str, body: dict[str, Any], request_id: str) -> EmbeddingRequest:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise InvalidRequest("forwarded embedding request has bad inputs")
    return EmbeddingRequest(model=model, inputs=tuple(inputs), request_id=request_id)


_BY_CODE: dict[str, type[MeshdError]] = {
    "model_not_found": ModelNotFound,
    "context_length_exceeded": ContextLengthExceeded,
    "queue_full": QueueFull,
    "invalid_request": InvalidRequest,
    "unsupported_parameter": InvalidRequest,
}


def error_from_wire(code: str, message: str, http_status: int | None) -> MeshdError:
    """A peer's request error, as the same typed error the local path would raise."""
    cls = _BY_CODE.get(code)
    if cls is None and http_status == 403:  # e.g. the peer refused our verdict: not worth a failover
        cls = PermissionDenied
    if cls is None:
        cls = ServiceUnavailable if http_status in (None, 503) or code in ("untrusted", "forbidden") else BackendError
    error = cls(message, code=code)
    return error


__all__ = ["embedding_body", "embedding_from_body", "error_from_wire", "generation_body", "generation_from_body"]

"""The error family shared by the API, the backends and (later) the wire.

Every error carries a stable string ``code``, an OpenAI error ``type``, the
HTTP status it maps to, and optionally the request ``param`` at fault. The
HTTP boundary renders them as ``{"error": {...}}``; nothing else formats them.
"""

from __future__ import annotations

from typing import Any


class MeshdError(Exception):
    """Base of every error that can be shown to a client."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def to_openai(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(MeshdError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class ModelNotFound(MeshdError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(MeshdError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(MeshdError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(MeshdError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class QueueFull(MeshdError):
    """The model's bounded queue is full; the client should retry later."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class ServiceUnavailable(MeshdError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class ShuttingDown(ServiceUnavailable):
    code = "shutting_down"


class BackendError(MeshdError):
    status = 500
    type = "server_error"
    code = "backend_error"


class RequestCancelled(MeshdError):
    """The client went away; never rendered, only used to unwind."""

    status = 499
    type = "invalid_request_error"
    code = "request_cancelled"


__all__ = [
    "BackendError",
    "ContextLengthExceeded",
    "InvalidRequest",
    "MeshdError",
    "MethodNotAllowed",
    "ModelNotFound",
    "NotFound",
    "PayloadTooLarge",
    "QueueFull",
    "RequestCancelled",
    "ServiceUnavailable",
    "ShuttingDown",
    "UnsupportedParameter",
]

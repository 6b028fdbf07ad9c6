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



# --- API keys, permissions, quotas (meshd.auth) ------------------------------------------


class InvalidApiKey(MeshdError):
    """No usable API key: wrong, unknown or malformed. The message never echoes the key."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class MissingApiKey(InvalidApiKey):
    code = "missing_api_key"


class ApiKeyRevoked(InvalidApiKey):
    """The key is genuine (its secret matched) but was revoked."""

    code = "api_key_revoked"


class ApiKeyExpired(InvalidApiKey):
    """The key is genuine (its secret matched) but its expiry time has passed."""

    code = "api_key_expired"


class PermissionDenied(MeshdError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class ModelNotAllowed(PermissionDenied):
    """The key's (or its tenant's) model allow-list does not include the model."""

    code = "model_not_allowed"


class DataClassNotAllowed(PermissionDenied):
    """The request's data class is above the key's (or tenant's) ``max_data_class``."""

    code = "data_class_not_allowed"


class InvalidVerdict(PermissionDenied):
    """A forwarded request's entry-node verdict did not verify; ``code`` says why."""

    code = "invalid_verdict"


class RateLimited(MeshdError):
    """A request, token or daily budget is used up; ``retry_after`` is exact (whole seconds, rounded up).

    ``limit`` names the exhausted limit (``requests``, ``tokens`` or
    ``tokens_per_day``) and ``scope`` whose it is (``key`` or ``tenant``);
    ``retry_after_ms`` is the same wait in milliseconds; ``headers`` are the
    ``x-ratelimit-*`` (and ``retry-after-ms``) headers the response should carry.
    """

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        limit: str,
        scope: str,
        retry_after: float | None,
        retry_after_ms: int | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code, retry_after=retry_after)
        self.limit = limit
        self.scope = scope
        self.retry_after_ms = retry_after_ms
        self.headers = dict(headers or {})


class RequestExceedsLimit(RateLimited):
    """The request alone needs more tokens than the limit allows: retrying cannot help."""

    code = "request_exceeds_limit"


__all__ = [
    "ApiKeyExpired",
    "ApiKeyRevoked",
    "BackendError",
    "ContextLengthExceeded",
    "DataClassNotAllowed",
    "InvalidApiKey",
    "InvalidRequest",
    "InvalidVerdict",
    "MeshdError",
    "MethodNotAllowed",
    "MissingApiKey",
    "ModelNotAllowed",
    "ModelNotFound",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "QueueFull",
    "RateLimited",
    "RequestCancelled",
    "RequestExceedsLimit",
    "ServiceUnavailable",
    "ShuttingDown",
    "UnsupportedParameter",
]


# --- backends beyond in-process llama.cpp (upstream servers, vLLM, MLX) ---------


class UpstreamError(BackendError):
    """An upstream server (vLLM, Ollama, LM Studio, llama-server) answered with an error.

    ``upstream_status`` keeps the upstream's HTTP status (None when there was no
    HTTP answer); the message names the upstream and repeats the status.
    """

    status = 502
    type = "server_error"
    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        upstream_status: int | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, retry_after=retry_after)
        self.upstream_status = upstream_status


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached or dropped the connection: a router fails over."""

    status = 503
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    """The upstream accepted the request but did not answer in time: a router fails over."""

    status = 504
    code = "upstream_timeout"


class BackendUnavailable(BackendError):
    """A configured backend cannot run on this host (package missing, no GPU, wrong platform)."""

    status = 503
    code = "backend_unavailable"


__all__ += ["BackendUnavailable", "UpstreamError", "UpstreamTimeout", "UpstreamUnavailable"]

"""Messages between meshd and its split host child: framing, requests and errors.

A frame is a 4-byte big-endian length and then a msgpack map. The channel is a
socketpair of our own, not stdio: llama.cpp writes to stdout and stderr at will.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

from .. import errors
from ..backends.base import ChatMessage, GenerationRequest, SamplingParams
from ..errors import BackendError, MeshdError

__all__ = [
    "MAX_FRAME",
    "error_from_wire",
    "error_to_wire",
    "recv_msg",
    "request_from_wire",
    "request_to_wire",
    "send_msg",
]

MAX_FRAME = 16 * 1024 * 1024  # far above any prompt or delta; a larger length means a broken stream
_LENGTH = struct.Struct(">I")


def _too_large(size: int) -> BackendError:
    return BackendError(f"split host message of {size} bytes exceeds the {MAX_FRAME} byte limit",
                        code="split_protocol_error")


def send_msg(sock: socket.socket, message: dict[str, Any]) -> None:
    """Send one message; OSError (BrokenPipeError, ...) when the peer is gone."""
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise _too_large(len(body))
    sock.sendall(_LENGTH.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def recv_msg(sock: socket.socket) -> dict[str, Any] | None:
    """The next message, or None when the peer has gone (EOF, also in the middle of a frame)."""
    head = _recv_exact(sock, _LENGTH.size)
    if head is None:
        return None
    (size,) = _LENGTH.unpack(head)
    if size > MAX_FRAME:
        raise _too_large(size)
    body = _recv_exact(sock, size)
    if body is None:
        return None
    message = msgpack.unpackb(body, raw=False)
    if not isinstance(message, dict):
        raise BackendError(f"split host message is a {type(message).__name__}, not a map",
                           code="split_protocol_error")
    return message


# --- requests -----------------------------------------------------------------


def request_to_wire(request: GenerationRequest) -> dict[str, Any]:
    p = request.params
    return {
        "model": request.model,
        "params": {
            "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
            "min_p": p.min_p, "repeat_penalty": p.repeat_penalty, "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty, "stop": list(p.stop), "seed": p.seed,
            "response_format": dict(p.response_format) if p.response_format is not None else None,
        },
        "messages": [[m.role, m.content] for m in request.messages] if request.messages is not None else None,
        "prompt": request.prompt,
        "request_id": request.request_id,
        "resume_token_ids": list(request.resume_token_ids),
        "resume_text": request.resume_text,
    }


def request_from_wire(data: dict[str, Any]) -> GenerationRequest:
    raw = dict(data["params"])
    raw["stop"] = tuple(raw.get("stop") or ())
    messages = data.get("messages")
    return GenerationRequest(
        model=data["model"],
        params=SamplingParams(**raw),
        messages=tuple(ChatMessage(role, content) for role, content in messages) if messages is not None else None,
        prompt=data.get("prompt"),
        request_id=data.get("request_id", ""),
        resume_token_ids=tuple(data.get("resume_token_ids") or ()),
        resume_text=data.get("resume_text", ""),
    )


# --- errors -------------------------------------------------------------------


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """An ``{"op": "error"}`` message; anything but a MeshdError becomes a plain backend error."""
    if isinstance(exc, MeshdError):
        return {"op": "error", "error": type(exc).__name__, "message": exc.message, "code": exc.code,
                "param": exc.param, "retry_after": exc.retry_after}
    return {"op": "error", "error": "BackendError", "message": f"{type(exc).__name__}: {exc}",
            "code": BackendError.code, "param": None, "retry_after": None}


def error_from_wire(message: dict[str, Any]) -> MeshdError:
    """The MeshdError the child raised, rebuilt as its own class when that is possible."""
    text = str(message.get("message") or "the split host failed")
    code, param, retry_after = message.get("code"), message.get("param"), message.get("retry_after")
    cls = getattr(errors, str(message.get("error")), None)
    if isinstance(cls, type) and issubclass(cls, MeshdError):
        try:
            return cls(text, param=param, code=code, retry_after=retry_after)
        except TypeError:  # a constructor with required extras (RateLimited): fall through
            pass
    return BackendError(text, param=param, code=code, retry_after=retry_after)

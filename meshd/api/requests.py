"""Parse and validate OpenAI request bodies into typed backend requests.

Every rejection is an ``InvalidRequest`` naming the offending ``param``;
parameters we understand but cannot honour are refused, never ignored.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..backends.base import ChatMessage, EmbeddingRequest, GenerationRequest, SamplingParams
from ..errors import InvalidRequest, UnsupportedParameter

MAX_STOP_SEQUENCES = 4
CHAT_ROLES = ("system", "developer", "user", "assistant")

# Parameters OpenAI defines that meshd does not implement (yet): refused with 400.
UNSUPPORTED = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "logit_bias": "logit_bias is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "suffix": "suffix (insertion) is not supported",
    "best_of": "best_of is not supported",
    "echo": "echo is not supported",
}
# Accepted and harmless when they ask for the default behaviour.
DEFAULT_ONLY: dict[str, object] = {
    "n": 1,
    "logprobs": False,
    "echo": False,
    "best_of": 1,
    "parallel_tool_calls": None,
    "store": False,
}
IGNORED = {"user", "metadata", "service_tier"}


@dataclass(frozen=True)
class StreamOptions:
    stream: bool = False
    include_usage: bool = False


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"'{name}' must be a number", param=name)
    if not lo <= value <= hi:
        raise InvalidRequest(f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, lo: int, hi: int = 2**31 - 1) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be an integer", param=name)
    if not lo <= value <= hi:
        raise InvalidRequest(f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return value


def _check_keys(body: Mapping[str, Any], known: set[str]) -> None:
    for key, value in body.items():
        if key in DEFAULT_ONLY and value == DEFAULT_ONLY[key]:
            continue
        if value is None and key in UNSUPPORTED:
            continue
        if key in UNSUPPORTED:
            raise UnsupportedParameter(f"'{key}' is not supported by meshd: {UNSUPPORTED[key]}", param=key)
        if key in DEFAULT_ONLY:
            raise UnsupportedParameter(f"'{key}' must be {DEFAULT_ONLY[key]!r} on meshd, got {value!r}", param=key)
        if key not in known and key not in IGNORED:
            raise InvalidRequest(f"Unrecognized request argument supplied: {key}", param=key)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("'stop' must be a string or a list of strings", param="stop")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences", param="stop")
    return tuple(s for s in stop if s)


def _response_format(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidRequest(
            "'response_format.type' must be 'text', 'json_object' or 'json_schema'", param="response_format"
        )
    if fmt["type"] == "json_schema" and not isinstance(fmt.get("json_schema"), dict):
        raise InvalidRequest("'response_format.json_schema' must be an object", param="response_format")
    return fmt


def _sampling(body: Mapping[str, Any], max_tokens: int | None) -> SamplingParams:
    defaults = SamplingParams()
    top_k = _integer(body, "top_k", 0)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", defaults.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", defaults.top_p, 0.0, 1.0),
        top_k=defaults.top_k if top_k is None else top_k,
        min_p=_number(body, "min_p", defaults.min_p, 0.0, 1.0),
        repeat_penalty=_number(body, "repeat_penalty", defaults.repeat_penalty, 0.0, 10.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        stop=_stop(body),
        seed=_integer(body, "seed", -(2**63), 2**64 - 1),
        response_format=_response_format(body),
    )


def _stream_options(body: Mapping[str, Any]) -> StreamOptions:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is None:
        return StreamOptions(stream=stream)
    if not stream:
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise InvalidRequest("'stream_options' supports only 'include_usage'", param="stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise InvalidRequest("'stream_options.include_usage' must be a boolean", param="stream_options")
    return StreamOptions(stream=True, include_usage=include)


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    return model


def _content(index: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise UnsupportedParameter(
                    f"messages[{index}].content: only text parts are supported", param=f"messages[{index}].content"
                )
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequest(f"messages[{index}].content must be a string or a list of text parts",
                         param=f"messages[{index}].content")


def _messages(body: Mapping[str, Any]) -> tuple[ChatMessage, ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{index}] must be an object", param=f"messages[{index}]")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidRequest(
                f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}", param=f"messages[{index}].role"
            )
        if message.get("tool_calls") or message.get("function_call"):
            raise UnsupportedParameter("tool calls are not supported", param=f"messages[{index}]")
        # "developer" is OpenAI's newer name for the system role.
        parsed.append(ChatMessage(role="system" if role == "developer" else role,
                                  content=_content(index, message.get("content"))))
    return tuple(parsed)


SAMPLING_KEYS = {
    "model", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
    "frequency_penalty", "stop", "seed", "stream", "stream_options", "max_tokens",
}


def parse_chat(body: Mapping[str, Any], request_id: str) -> tuple[GenerationRequest, StreamOptions]:
    _check_keys(body, SAMPLING_KEYS | {"messages", "max_completion_tokens", "response_format", "n", "store"})
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    request = GenerationRequest(
        model=_model(body),
        params=_sampling(body, max_tokens),
        messages=_messages(body),
        request_id=request_id,
    )
    return request, _stream_options(body)


def parse_completion(body: Mapping[str, Any], request_id: str) -> tuple[GenerationRequest, StreamOptions]:
    _check_keys(body, SAMPLING_KEYS | {"prompt", "n", "echo", "best_of", "logprobs"})
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequest("'prompt' must be a string (batches of prompts are not supported)", param="prompt")
    max_tokens = _integer(body, "max_tokens", 1)
    request = GenerationRequest(
        model=_model(body),
        params=_sampling(body, 16 if max_tokens is None else max_tokens),  # OpenAI's default for completions
        prompt=prompt,
        request_id=request_id,
    )
    return request, _stream_options(body)


@dataclass(frozen=True)
class EmbeddingOptions:
    encoding_format: str = "float"


def parse_embedding(body: Mapping[str, Any], request_id: str) -> tuple[EmbeddingRequest, EmbeddingOptions]:
    _check_keys(body, {"model", "input", "encoding_format", "dimensions"})
    if body.get("dimensions") is not None:
        raise UnsupportedParameter("'dimensions' is not supported: vectors have the model's size", param="dimensions")
    raw = body.get("input")
    if isinstance(raw, str):
        inputs: list[str] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
        inputs = list(raw)
    elif isinstance(raw, list) and raw and all(isinstance(item, int) and not isinstance(item, bool) for item in raw):
        raise UnsupportedParameter("token-id input is not supported; send text", param="input")
    else:
        raise InvalidRequest("'input' must be a string or a non-empty list of strings", param="input")
    if any(not item for item in inputs):
        raise InvalidRequest("'input' must not contain empty strings", param="input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    return (
        EmbeddingRequest(model=_model(body), inputs=tuple(inputs), request_id=request_id),
        EmbeddingOptions(encoding_format=encoding),
    )


def encode_vector(vector: tuple[float, ...], encoding: str) -> list[float] | str:
    """OpenAI's base64 form is little-endian float32."""
    if encoding == "float":
        return list(vector)
    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


__all__ = [
    "EmbeddingOptions",
    "StreamOptions",
    "encode_vector",
    "parse_chat",
    "parse_completion",
    "parse_embedding",
]

"""Every frame of the wire protocol, defined once as a frozen dataclass.

A frame travels as a msgpack map: ``{"t": <type tag>, <field>: <value>, ...}``.
Adding a frame is one decorated dataclass: ``@frame("tag")`` makes it frozen,
derives a validator for every field from its type hints, and registers the
tag. Field types are limited to what msgpack carries without extensions:
``int``, ``float``, ``bool``, ``str``, ``bytes``, ``dict[str, Any]``,
``tuple[X, ...]``, ``Literal[...]`` of strings, ``X | None``, and
``Annotated[X, Bounds(...) | Length(...) | Pattern(...)]`` for limits.

Validation runs in ``__post_init__``, so a frame built locally and a frame
decoded from the peer pass the same checks; failures raise ``InvalidFrame``.
Each frame class gets its own ``__post_init__`` and ``to_wire``, generated
once at registration (as ``dataclasses`` generates ``__init__``): every
control message builds and validates two frames per side, and the generic
loop over field checkers was most of a ping's protocol cost. The generated
code tests the common case inline (``type(v) is int and 0 <= v <= ...``) and
calls the field's full checker for anything else, so it accepts, normalises
and rejects exactly what the checkers do.
Decoding is strict: unknown tags raise ``UnknownFrameType``; missing or unknown
fields raise ``InvalidFrame`` (the protocol version must match exactly, so
there is no forward-compatibility slack to preserve).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Callable, Mapping
from typing import (
    Annotated,
    Any,
    ClassVar,
    Literal,
    TypeVar,
    Union,
    dataclass_transform,
    get_args,
    get_origin,
    get_type_hints,
)

from .errors import InvalidFrame, UnknownFrameType

PROTOCOL_VERSION = 1
"""Bumped on any change to a frame or a state machine; peers must match exactly."""

TYPE_KEY = "t"
INT_MIN = -(2**63)
U64_MAX = 2**64 - 1


# --- field constraints (used inside Annotated[...]) --------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Bounds:
    """Inclusive numeric range; ``None`` leaves a side open."""

    low: float | None = None
    high: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Length:
    """Inclusive length range for ``str`` (characters), ``bytes`` and tuples."""

    low: int = 0
    high: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Pattern:
    """A regular expression the whole string must match."""

    regex: str


NonNegInt = Annotated[int, Bounds(0, U64_MAX)]
Name = Annotated[str, Length(1, 256)]  # ids, codes, tags: short and never empty
Seconds = Annotated[float, Bounds(0.0, None)]
HttpStatus = Annotated[int, Bounds(100, 599)]
Sha256Hex = Annotated[str, Pattern(r"[0-9a-f]{64}")]
RoleName = Literal["serve", "use", "cache", "tensor"]
RequestKind = Literal["chat", "completion", "embedding"]
TensorPurpose = Literal["envelopes", "tunnel"]


# --- the registry ------------------------------------------------------------------------

Checker = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    hint: Any
    required: bool
    check: Checker


class Frame:
    """Base of all frames. Subclasses are made with ``@frame(tag)``."""

    __slots__ = ()
    TAG: ClassVar[str]
    SPECS: ClassVar[tuple[FieldSpec, ...]]
    _WIRE_KEYS: ClassVar[frozenset[str]]  # the type tag and every field name
    _REQUIRED: ClassVar[frozenset[str]]  # fields without a default

    def __post_init__(self) -> None:
        # The reference validation; registered frames run a generated equivalent
        # (_compile_post_init), and the tests hold the two to the same results.
        for spec in self.SPECS:
            value = getattr(self, spec.name)
            checked = spec.check(value)
            if checked is not value:
                object.__setattr__(self, spec.name, checked)
        self.check()

    def check(self) -> None:
        """Cross-field rules; override and raise ``InvalidFrame``."""

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {TYPE_KEY: self.TAG}
        for spec in self.SPECS:
            wire[spec.name] = getattr(self, spec.name)
        return wire


FRAME_TYPES: dict[str, type[Frame]] = {}
F = TypeVar("F", bound=Frame)


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def frame(tag: str) -> Callable[[type[F]], type[F]]:
    """Class decorator: make a frozen frame dataclass and register it under ``tag``."""

    def register(cls: type[F]) -> type[F]:
        if tag in FRAME_TYPES:
            raise ValueError(f"frame tag {tag!r} is already registered")
        made = dataclasses.dataclass(frozen=True, slots=True)(cls)
        made.TAG = tag
        made.SPECS = _field_specs(made)
        made.__post_init__ = _compile_post_init(made)  # type: ignore[method-assign]
        made.to_wire = _compile_to_wire(made)  # type: ignore[method-assign]
        made._WIRE_KEYS = frozenset(spec.name for spec in made.SPECS) | {TYPE_KEY}
        made._REQUIRED = frozenset(spec.name for spec in made.SPECS if spec.required)
        FRAME_TYPES[tag] = made
        return made

    return register


def decode_frame_object(obj: object) -> Frame:
    """Turn one decoded msgpack object into a frame, or raise a ``FrameError``."""
    if not isinstance(obj, dict):
        raise InvalidFrame(f"a frame must be a map, got {type(obj).__name__}")
    return frame_from_map(dict(obj))


def frame_from_map(obj: dict[Any, Any]) -> Frame:
    """``decode_frame_object`` for a map the caller hands over: it is consumed (the tag popped)."""
    tag = obj.pop(TYPE_KEY, None)
    if not isinstance(tag, str):
        raise InvalidFrame(f"frame type tag {TYPE_KEY!r} is missing or not a string")
    cls = FRAME_TYPES.get(tag)
    if cls is None:
        raise UnknownFrameType(tag)
    keys = obj.keys()
    if not keys <= cls._WIRE_KEYS:  # set comparisons in C; the error path spells it out
        unknown = [key for key in obj if key not in cls._WIRE_KEYS]
        raise InvalidFrame(f"{tag}: unknown field(s) {sorted(map(repr, unknown))}")
    if not cls._REQUIRED <= keys:
        missing = [spec.name for spec in cls.SPECS if spec.required and spec.name not in obj]
        raise InvalidFrame(f"{tag}: missing field(s) {missing}")
    return cls(**obj)


# --- field checkers derived from type hints ----------------------------------------------


def _field_specs(cls: type) -> tuple[FieldSpec, ...]:
    hints = get_type_hints(cls, include_extras=True)
    specs = []
    for field in dataclasses.fields(cls):
        if field.name == TYPE_KEY:
            raise TypeError(f"{cls.__name__}: field name {TYPE_KEY!r} is reserved for the type tag")
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        where = f"{cls.TAG}.{field.name}"  # type: ignore[attr-defined]
        specs.append(FieldSpec(field.name, hints[field.name], required, _checker(hints[field.name], where)))
    return tuple(specs)


def _checker(hint: Any, where: str) -> Checker:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        return _constrained(_checker(args[0], where), args[1:], where)
    if origin in (Union, types.UnionType):
        options = [arg for arg in args if arg is not type(None)]
        if len(options) != 1 or len(args) != 2:
            raise TypeError(f"{where}: only 'X | None' unions are supported")
        inner = _checker(options[0], where)
        return lambda value: None if value is None else inner(value)
    if origin is Literal:
        return _literal(args, where)
    if origin is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{where}: only tuple[X, ...] is supported")
        return _sequence(_checker(args[0], where), where)
    if origin is dict:
        if args[0] is not str:
            raise TypeError(f"{where}: maps must have str keys")
        return _mapping(where)
    simple = _SIMPLE.get(hint)
    if simple is None:
        raise TypeError(f"{where}: unsupported field type {hint!r}")
    return simple(where)


def _fail(where: str, expected: str, value: object) -> InvalidFrame:
    return InvalidFrame(f"{where}: expected {expected}, got {type(value).__name__}")


def _int(where: str) -> Checker:
    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(where, "int", value)
        if not INT_MIN <= value <= U64_MAX:
            raise InvalidFrame(f"{where}: {value} does not fit in 64 bits")
        return value if type(value) is int else int(value)

    return check


def _float(where: str) -> Checker:
    def check(value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _fail(where, "float", value)
        if isinstance(value, int) and not INT_MIN <= value <= U64_MAX:
            raise InvalidFrame(f"{where}: {value} is out of range")
        number = float(value)
        if not math.isfinite(number):
            raise InvalidFrame(f"{where}: must be finite")
        return value if type(value) is float else number

    return check


def _bool(where: str) -> Checker:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise _fail(where, "bool", value)
        return value

    return check


def _str(where: str) -> Checker:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _fail(where, "str", value)
        return value if type(value) is str else str.__str__(value)

    return check


def _bytes(where: str) -> Checker:
    def check(value: Any) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, (bytearray, memoryview)):
            return bytes(value)
        raise _fail(where, "bytes", value)

    return check


_SIMPLE: dict[Any, Callable[[str], Checker]] = {int: _int, float: _float, bool: _bool, str: _str, bytes: _bytes}


def _literal(options: tuple[Any, ...], where: str) -> Checker:
    allowed = frozenset(options)

    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise InvalidFrame(f"{where}: {value!r} is not one of {sorted(allowed)}")
        return value if type(value) is str else str.__str__(value)

    return check


def _sequence(item: Checker, where: str) -> Checker:
    def check(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            raise _fail(where, "array", value)
        return tuple(item(element) for element in value)

    return check


def _mapping(where: str) -> Checker:
    def check(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _fail(where, "map", value)
        for key in value:
            if not isinstance(key, str):
                raise InvalidFrame(f"{where}: map keys must be strings, got {type(key).__name__}")
        return value

    return check


def _constrained(inner: Checker, constraints: tuple[Any, ...], where: str) -> Checker:
    def check(value: Any) -> Any:
        value = inner(value)
        for rule in constraints:
            if isinstance(rule, Bounds):
                if (rule.low is not None and value < rule.low) or (rule.high is not None and value > rule.high):
                    raise InvalidFrame(f"{where}: {value} is outside [{rule.low}, {rule.high}]")
            elif isinstance(rule, Length):
                if len(value) < rule.low or (rule.high is not None and len(value) > rule.high):
                    raise InvalidFrame(f"{where}: length {len(value)} is outside [{rule.low}, {rule.high}]")
            elif isinstance(rule, Pattern):
                if re.fullmatch(rule.regex, value) is None:
                    raise InvalidFrame(f"{where}: {value!r} does not match {rule.regex}")
        return value

    return check


# --- generated per-class code ------------------------------------------------------------


def _fast_test(hint: Any, consts: dict[str, Any]) -> str | None:
    """An expression over ``v`` that is true only for values the field's full checker
    accepts and returns unchanged; None where there is no such shortcut.

    False never means invalid, only "ask the checker" (which normalises or raises).
    """
    origin, args = get_origin(hint), get_args(hint)

    def const(value: Any) -> str:
        name = f"_k{len(consts)}"
        consts[name] = value
        return name

    if origin is Annotated:
        inner = _fast_test(args[0], consts)
        if inner is None:
            return None
        tests = [inner]
        for rule in args[1:]:
            if isinstance(rule, Bounds):
                if rule.low is not None:
                    tests.append(f"v >= {const(rule.low)}")
                if rule.high is not None:
                    tests.append(f"v <= {const(rule.high)}")
            elif isinstance(rule, Length) and get_origin(args[0]) is None:  # str, bytes
                tests.append(f"{const(rule.low)} <= len(v)")
                if rule.high is not None:
                    tests.append(f"len(v) <= {const(rule.high)}")
            else:
                return None  # patterns, tuple lengths: the checker decides
        return " and ".join(f"({test})" for test in tests)
    if origin in (Union, types.UnionType):
        (inner_hint,) = [arg for arg in args if arg is not type(None)]
        inner = _fast_test(inner_hint, consts)
        return "v is None" if inner is None else f"v is None or ({inner})"
    if origin is Literal:
        return f"type(v) is str and v in {const(frozenset(args))}"
    if hint is int:
        return f"type(v) is int and {const(INT_MIN)} <= v <= {const(U64_MAX)}"
    if hint is float:
        return f"type(v) is float and {const(math.isfinite)}(v)"
    if hint in (bool, str, bytes):
        return f"type(v) is {const(hint)}"
    return None  # maps (keys to check), tuples (lists to convert): always the checker


def _compile_post_init(cls: type[Frame]) -> Callable[[Frame], None]:
    consts: dict[str, Any] = {"_set": object.__setattr__}
    lines = ["def __post_init__(self):"]
    for index, spec in enumerate(cls.SPECS):
        check = f"_check{index}"
        consts[check] = spec.check
        lines.append(f"    v = self.{spec.name}")
        test = _fast_test(spec.hint, consts)
        lines.append(f"    if not ({test}):" if test else "    if True:")
        lines.append(f"        checked = {check}(v)")
        lines.append("        if checked is not v:")
        lines.append(f"            _set(self, {spec.name!r}, checked)")
    if cls.check is not Frame.check:
        lines.append("    self.check()")
    lines.append("    return None")
    return _define(cls, "__post_init__", lines, consts)


def _compile_to_wire(cls: type[Frame]) -> Callable[[Frame], dict[str, Any]]:
    # The same map, in the same key order, as the loop over SPECS: the bytes on the wire do not change.
    items = ", ".join([f"{TYPE_KEY!r}: _tag"] + [f"{spec.name!r}: self.{spec.name}" for spec in cls.SPECS])
    return _define(cls, "to_wire", ["def to_wire(self):", f"    return {{{items}}}"], {"_tag": cls.TAG})


def _define(cls: type, name: str, lines: list[str], consts: dict[str, Any]) -> Any:
    namespace: dict[str, Any] = {}
    exec("\n".join(lines), consts, namespace)  # noqa: S102 - source built above from field names only
    function = namespace[name]
    function.__qualname__ = f"{cls.__qualname__}.{name}"
    return function


# --- control channel ---------------------------------------------------------------------


@frame("hello")
class Hello(Frame):
    """First frame of a connection, sent by the dialler on the control stream."""

    protocol_version: NonNegInt
    node_id: Name
    software: Annotated[str, Length(0, 256)]
    capabilities_hint: dict[str, Any] | None = None


@frame("hello_ack")
class HelloAck(Frame):
    """The acceptor's answer to a hello from a trusted peer at the same version."""

    protocol_version: NonNegInt
    node_id: Name
    software: Annotated[str, Length(0, 256)]
    granted_roles: tuple[RoleName, ...] = ()


@frame("refused")
class Refused(Frame):
    """A refusal: of the connection on the control stream, of a channel on its stream.

    ``protocol_version`` is set on version mismatches so the refused side can
    report both versions.
    """

    code: Name
    message: str
    protocol_version: NonNegInt | None = None


@frame("capabilities")
class Capabilities(Frame):
    """A signed capability announcement (an ``identity`` signed record, opaque here)."""

    signed_record: Annotated[bytes, Length(1, None)]


@frame("ping")
class Ping(Frame):
    nonce: NonNegInt
    sent_at: float


@frame("pong")
class Pong(Frame):
    """Echoes the ping's nonce and ``sent_at``; the pinger measures RTT on its own clock."""

    nonce: NonNegInt
    sent_at: float


@frame("goodbye")
class Goodbye(Frame):
    reason: str


@frame("protocol_error")
class ProtocolErrorFrame(Frame):
    """The last frame on a control stream whose peer broke the protocol."""

    code: Name
    message: str


# --- request channel ---------------------------------------------------------------------


@frame("request")
class InferenceRequest(Frame):
    """A forwarded inference request; the first and only frame the requester sends.

    ``deadline`` is the time budget in seconds left when the request was sent
    (relative, because peer clocks are not synchronised). ``resume_text`` and
    ``resume_token_ids`` carry output already delivered to the client by a
    peer that failed mid-response. ``verdict`` is an opaque signed routing
    decision.
    """

    request_id: Name
    kind: RequestKind
    model: Name
    body: dict[str, Any]
    data_class: Name
    stream: bool = False
    deadline: Seconds | None = None
    resume_text: str | None = None
    resume_token_ids: tuple[NonNegInt, ...] | None = None
    verdict: bytes | None = None

    def check(self) -> None:
        if self.kind == "embedding" and self.stream:
            raise InvalidFrame("request: embeddings cannot be streamed")


@frame("token")
class TokenChunk(Frame):
    """One streamed piece of output; ``index`` counts chunks from 0 without gaps."""

    request_id: Name
    index: NonNegInt
    text: str
    token_ids: tuple[NonNegInt, ...] | None = None
    finish_reason: Name | None = None


@frame("response")
class ResponseBody(Frame):
    """The whole response of a non-streamed request (an OpenAI response object)."""

    request_id: Name
    body: dict[str, Any]


@frame("usage")
class Usage(Frame):
    """Closes a successful response."""

    request_id: Name
    prompt_tokens: NonNegInt
    completion_tokens: NonNegInt
    cached_tokens: NonNegInt = 0  # prompt tokens the server restored from a KV cache instead of prefilling


@frame("request_error")
class RequestError(Frame):
    """Closes a failed response; ``code``/``http_status`` follow meshd's API errors."""

    request_id: Name
    code: Name
    message: str
    http_status: HttpStatus


@frame("cancel")
class Cancel(Frame):
    """Graceful cancel: the server stops generating and still closes with usage or error."""

    request_id: Name
    reason: str


# --- tensor, cache and events channels ---------------------------------------------------


@frame("tensor_open")
class TensorOpen(Frame):
    """Opens a tensor channel; raw bytes (tensor envelopes or a tunnel) follow the ack."""

    purpose: TensorPurpose
    tag: Name
    model: Name | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


@frame("cache_offer")
class CacheOffer(Frame):
    """Opens a cache channel to push a KV cache for a token prefix; raw bytes follow the ack."""

    cache_id: Name
    model: Name
    prefix_sha256: Sha256Hex
    token_count: NonNegInt
    dtype: Name
    nbytes: NonNegInt


@frame("cache_request")
class CacheRequest(Frame):
    """Opens a cache channel to fetch a KV cache; the acceptor streams raw bytes after the ack."""

    cache_id: Name
    model: Name
    prefix_sha256: Sha256Hex
    token_count: NonNegInt


@frame("events_subscribe")
class EventsSubscribe(Frame):
    topics: Annotated[tuple[Name, ...], Length(1, 64)]


@frame("mesh_event")
class MeshEvent(Frame):
    topic: Name
    at: float
    data: dict[str, Any]


@frame("channel_ack")
class ChannelAck(Frame):
    """The acceptor's yes to a tensor, cache or events channel."""

    params: dict[str, Any] = dataclasses.field(default_factory=dict)


def frame_types() -> Mapping[str, type[Frame]]:
    """A read-only view of the registry: tag -> frame class."""
    return types.MappingProxyType(FRAME_TYPES)


__all__ = [
    "PROTOCOL_VERSION",
    "Bounds",
    "Cancel",
    "CacheOffer",
    "CacheRequest",
    "Capabilities",
    "ChannelAck",
    "EventsSubscribe",
    "FieldSpec",
    "Frame",
    "Goodbye",
    "Hello",
    "HelloAck",
    "InferenceRequest",
    "Length",
    "MeshEvent",
    "Pattern",
    "Ping",
    "Pong",
    "ProtocolErrorFrame",
    "Refused",
    "RequestError",
    "ResponseBody",
    "TensorOpen",
    "TokenChunk",
    "Usage",
    "decode_frame_object",
    "frame",
    "frame_from_map",
    "frame_types",
]

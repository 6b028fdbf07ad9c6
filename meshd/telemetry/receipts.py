"""Receipts: one hash-chained JSON line per API request (schema: docs/receipt.schema.json).

A receipt says who asked (key id and tenant, never the key), for what (model
and its identity, data class), where it ran (entry node, serving node,
failovers), which policy decisions were taken, what it cost (tokens) and how
it went (TTFT, latency, outcome, error code).

Line format (version 1)::

    {"completion_tokens":5,...,"prev":"<64 hex>","seq":41,...,"hash":"<64 hex>"}

Every key but ``hash`` is serialized canonically (sorted keys, no spaces,
ASCII only); ``hash`` is SHA-256 of exactly those bytes, appended as the last
member. ``prev`` is the previous record's ``hash`` (64 zeros for the first
record ever), ``seq`` counts from 0 across all files. So each line can be
checked on its own (strip the ``,"hash":"..."`` suffix, hash, compare) and
against its neighbour, in any language, without re-serializing anything.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidReceipt

SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64
OUTCOMES = ("success", "error", "cancelled")
REQUEST_TYPES = ("chat.completions", "completions", "embeddings")
TIERS = ("local", "peer")
DATA_CLASSES = ("public", "internal", "confidential", "secret")
_KEY_ID = re.compile(r"[a-z2-7]{12}")
_HASH = re.compile(r"[0-9a-f]{64}")
_SUFFIX = re.compile(r',"hash":"([0-9a-f]{64})"\}\Z')
_MAX_TEXT = 512


@dataclass(frozen=True, slots=True)
class Failover:
    """A candidate that failed before or during the response, in the order tried."""

    node: str
    error_code: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    entry_node: str
    serving_node: str | None = None  # None: never served (refused or failed everywhere)
    failovers: tuple[Failover, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """One decision taken for the request, e.g. ("quota", "admitted", "reserved 1040 tokens")."""

    name: str
    result: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Receipt:
    """One request's receipt, before it is numbered and chained by the writer."""

    time: float  # when the request arrived, seconds since the epoch
    request_id: str
    request_type: str
    model: str
    route: Route
    outcome: str
    status: int
    latency_ms: float
    key_id: str | None = None
    tenant: str | None = None
    model_identity: Mapping[str, Any] | None = None
    data_class: str | None = None
    tier: str | None = None
    policy: tuple[PolicyDecision, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_estimated: bool = False
    ttft_ms: float | None = None
    error_code: str | None = None
    stream: bool = False

    def __post_init__(self) -> None:
        _check(math.isfinite(self.time) and self.time >= 0, "time must be a finite epoch time")
        for name in ("request_id", "model"):
            _text(name, getattr(self, name), required=True)
        _check(self.request_type in REQUEST_TYPES, f"request_type must be one of {REQUEST_TYPES}")
        _check(self.outcome in OUTCOMES, f"outcome must be one of {OUTCOMES}")
        _check(type(self.status) is int and 100 <= self.status <= 599, "status must be an HTTP status code")
        _check(self.outcome != "success" or self.error_code is None, "a successful request has no error_code")
        _check(self.outcome == "success" or self.error_code is not None, "a failed request needs an error_code")
        # Only a key *id* fits here, so a secret can never be written into a receipt by mistake.
        _check(self.key_id is None or bool(_KEY_ID.fullmatch(str(self.key_id))), "key_id must be a key id")
        for name in ("tenant", "error_code"):
            _text(name, getattr(self, name), required=False)
        _check(self.data_class is None or self.data_class in DATA_CLASSES, f"data_class must be one of {DATA_CLASSES}")
        _check(self.tier is None or self.tier in TIERS, f"tier must be one of {TIERS}")
        for name in ("prompt_tokens", "completion_tokens"):
            value = getattr(self, name)
            _check(type(value) is int and value >= 0, f"{name} must be a non-negative integer")
        _check(_duration(self.latency_ms), "latency_ms must be a non-negative number")
        _check(self.ttft_ms is None or _duration(self.ttft_ms), "ttft_ms must be a non-negative number or None")
        _text("route.entry_node", self.route.entry_node, required=True)
        _text("route.serving_node", self.route.serving_node, required=False)
        for failover in self.route.failovers:
            _text("failover node", failover.node, required=True)
            _text("failover error_code", failover.error_code, required=False)
        for decision in self.policy:
            _text("policy name", decision.name, required=True)
            _text("policy result", decision.result, required=True)
            _text("policy detail", decision.detail, required=False)
        if self.model_identity is not None:
            _check(isinstance(self.model_identity, Mapping), "model_identity must be a mapping or None")
            try:
                json.dumps(dict(self.model_identity), allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise InvalidReceipt(f"model_identity must be JSON-serializable: {exc}") from None

    def body(self, *, seq: int, prev: str) -> dict[str, Any]:
        """The record as written, without ``hash``."""
        return {
            "v": SCHEMA_VERSION,
            "seq": seq,
            "prev": prev,
            "time": format_time(self.time),
            "request_id": self.request_id,
            "request_type": self.request_type,
            "stream": self.stream,
            "key_id": self.key_id,
            "tenant": self.tenant,
            "model": self.model,
            "model_identity": None if self.model_identity is None else dict(self.model_identity),
            "data_class": self.data_class,
            "tier": self.tier,
            "node_id": self.route.serving_node,
            "route": {
                "entry_node": self.route.entry_node,
                "serving_node": self.route.serving_node,
                "failovers": [{"node": f.node, "error_code": f.error_code} for f in self.route.failovers],
            },
            "policy": [{"name": p.name, "result": p.result, "detail": p.detail} for p in self.policy],
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "tokens_estimated": self.tokens_estimated,
            "ttft_ms": None if self.ttft_ms is None else round(float(self.ttft_ms), 3),
            "latency_ms": round(float(self.latency_ms), 3),
            "outcome": self.outcome,
            "success": self.outcome == "success",
            "status": self.status,
            "error_code": self.error_code,
        }


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidReceipt(message)


def _duration(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _text(name: str, value: object, *, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT:
        raise InvalidReceipt(f"{name} must be a non-empty string of at most {_MAX_TEXT} characters")


def format_time(epoch: float) -> str:
    """RFC 3339 UTC with milliseconds: ``2026-01-31T12:00:00.123Z``."""
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


# --- lines ----------------------------------------------------------------------------------


def encode_line(body: Mapping[str, Any]) -> tuple[bytes, str]:
    """The line (with newline) for a record body, and the record's hash."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    digest = hashlib.sha256(canonical.encode("ascii")).hexdigest()
    return (canonical[:-1] + f',"hash":"{digest}"}}\n').encode("ascii"), digest


@dataclass(frozen=True, slots=True)
class DecodedLine:
    """A line taken apart. ``hash_ok`` says whether the content still matches its own hash."""

    record: dict[str, Any]
    seq: int
    prev: str
    hash: str
    hash_ok: bool


class LineMalformed(ValueError):
    pass


def decode_line(line: str | bytes) -> DecodedLine:
    """Parse one line (without its newline); ``LineMalformed`` if it is not a receipt line at all."""
    text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    match = _SUFFIX.search(text)
    if match is None:
        raise LineMalformed("the line does not end with its hash")
    try:
        record = json.loads(text)
    except ValueError:
        raise LineMalformed("the line is not valid JSON") from None
    if not isinstance(record, dict):
        raise LineMalformed("the line is not a JSON object")
    seq, prev = record.get("seq"), record.get("prev")
    if type(seq) is not int or seq < 0 or not isinstance(prev, str) or not _HASH.fullmatch(prev):
        raise LineMalformed("the line has no valid seq and prev")
    canonical = text[: match.start()] + "}"
    digest = match.group(1)
    actual = hashlib.sha256(canonical.encode("utf-8", errors="replace")).hexdigest()
    return DecodedLine(record=record, seq=seq, prev=prev, hash=digest, hash_ok=actual == digest)


__all__ = [
    "GENESIS_HASH",
    "OUTCOMES",
    "REQUEST_TYPES",
    "SCHEMA_VERSION",
    "TIERS",
    "DecodedLine",
    "Failover",
    "LineMalformed",
    "PolicyDecision",
    "Receipt",
    "Route",
    "decode_line",
    "encode_line",
    "format_time",
    "parse_time",
]

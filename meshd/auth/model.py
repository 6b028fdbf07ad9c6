"""Key and tenant data: data classes, limits, key and tenant records, secret formats.

Kept apart from the key file codec and the store so the API, the limiter, the
admin API and ``meshctl`` can share these types without touching files.

An API key secret reads ``mk-<key id>-<52 base32 characters>``. The key id is
not secret: it names the key in logs, receipts and ``meshctl keys list`` and
makes the lookup O(1). Only a salted hash of the whole secret is stored.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import fnmatch
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidKeySpec

SECRET_PREFIX = "mk"
KEY_ID_LENGTH = 12
_KEY_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # lowercase RFC 4648 base32
_SECRET_BYTES = 32  # 256 bits of randomness
SECRET_BODY_LENGTH = 52  # base32 of 32 bytes, unpadded
DEFAULT_TENANT = "default"
MAX_NAME_LENGTH = 64
MAX_NOTE_LENGTH = 1024
MAX_MODEL_PATTERNS = 256

KEY_ID_PATTERN = re.compile(rf"[a-z2-7]{{{KEY_ID_LENGTH}}}")
SECRET_PATTERN = re.compile(rf"{SECRET_PREFIX}-([a-z2-7]{{{KEY_ID_LENGTH}}})-([a-z2-7]{{{SECRET_BODY_LENGTH}}})")
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Anything that looks like one of our secrets, even truncated or with a bad body,
# so that redaction also catches near-misses (a key pasted with a typo is still a key).
_REDACT_PATTERN = re.compile(rf"\b{SECRET_PREFIX}-([a-z2-7]{{{KEY_ID_LENGTH}}})-[A-Za-z0-9]+")


class DataClass(enum.StrEnum):
    """How sensitive a request's data is; ordered ``public < internal < confidential < secret``."""

    PUBLIC = "public"
    INTERNAL = "internal"
    CONFIDENTIAL = "confidential"
    SECRET = "secret"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    @classmethod
    def parse(cls, text: str) -> DataClass:
        try:
            return cls(str(text).strip().lower())
        except ValueError:
            choices = ", ".join(c.value for c in cls)
            raise InvalidKeySpec(f"unknown data class {text!r} (expected one of: {choices})") from None

    def at_most(self, limit: DataClass) -> bool:
        return self.rank <= limit.rank


_RANKS = {c: i for i, c in enumerate(DataClass)}


def lowest(*classes: DataClass) -> DataClass:
    return min(classes, key=lambda c: c.rank)


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-key or per-tenant limits; None means unlimited.

    ``rpm``/``tpm``: requests / tokens in any sliding 60-second window;
    ``tokens_per_day``: tokens per UTC calendar day (docs/auth.md, "Quotas").
    """

    rpm: int | None = None
    tpm: int | None = None
    tokens_per_day: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "tokens_per_day"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise InvalidKeySpec(f"{name} must be a positive integer or unset, got {value!r}")

    @property
    def unlimited(self) -> bool:
        return self.rpm is None and self.tpm is None and self.tokens_per_day is None

    def to_dict(self) -> dict[str, int | None]:
        return {"rpm": self.rpm, "tpm": self.tpm, "tokens_per_day": self.tokens_per_day}


@dataclass(frozen=True, slots=True)
class TenantRecord:
    """A group of keys sharing limits, a model allow-list and a data class ceiling.

    A tenant that is named by keys but not configured in the file is implicitly
    unrestricted (``TenantRecord(name)``).
    """

    name: str
    limits: Limits = Limits()
    models: tuple[str, ...] | None = None
    max_data_class: DataClass = DataClass.SECRET
    note: str = ""

    def __post_init__(self) -> None:
        check_tenant_name(self.name)
        check_models(self.models)
        check_text("note", self.note, MAX_NOTE_LENGTH)

    def allows_model(self, *names: str) -> bool:
        return model_allowed(self.models, names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "limits": self.limits.to_dict(),
            "models": None if self.models is None else list(self.models),
            "max_data_class": self.max_data_class.value,
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One API key as stored: everything but the secret, which is kept only as a salted hash.

    ``repr`` and ``to_dict`` leave the hash out; nothing here can reveal the secret.
    """

    key_id: str
    name: str
    tenant: str
    created_at: dt.datetime
    secret_hash: str = field(repr=False, compare=False)
    models: tuple[str, ...] | None = None
    limits: Limits = Limits()
    max_data_class: DataClass = DataClass.SECRET
    expires_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None
    created_by: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        check_key_id(self.key_id)
        check_name(self.name)
        check_tenant_name(self.tenant)
        check_models(self.models)
        check_text("note", self.note, MAX_NOTE_LENGTH)
        check_text("created_by", self.created_by, 256)
        for name in ("created_at", "expires_at", "revoked_at"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise InvalidKeySpec(f"{name} must be timezone-aware")

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at.timestamp() <= now

    def active(self, now: float) -> bool:
        return not self.revoked and not self.expired(now)

    def status(self, now: float) -> str:
        """``active``, ``revoked`` or ``expired`` (what ``meshctl keys list`` shows)."""
        if self.revoked:
            return "revoked"
        return "expired" if self.expired(now) else "active"

    def allows_model(self, *names: str) -> bool:
        return model_allowed(self.models, names)

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """Everything an operator may see (admin API, ``meshctl keys show --json``); no hash."""
        body: dict[str, Any] = {
            "key_id": self.key_id,
            "name": self.name,
            "tenant": self.tenant,
            "models": None if self.models is None else list(self.models),
            "limits": self.limits.to_dict(),
            "max_data_class": self.max_data_class.value,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
            "created_by": self.created_by,
            "note": self.note,
        }
        if now is not None:
            body["status"] = self.status(now)
        return body


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


# --- secrets ----------------------------------------------------------------------------


def new_key_id() -> str:
    return "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))


def new_secret(key_id: str) -> str:
    body = base64.b32encode(secrets.token_bytes(_SECRET_BYTES)).decode("ascii").rstrip("=").lower()
    return f"{SECRET_PREFIX}-{key_id}-{body}"


def split_secret(token: str) -> str | None:
    """The key id of a well-formed secret, or None (never raises, never logs the token)."""
    match = SECRET_PATTERN.fullmatch(token)
    return match.group(1) if match else None


def redact(text: str) -> str:
    """Replace every API-key-looking substring with ``mk-<key id>-***``.

    For anything that might carry a key towards a log line: header values,
    exception messages, request dumps. Only the (non-secret) key id survives.
    """
    return _REDACT_PATTERN.sub(lambda m: f"{SECRET_PREFIX}-{m.group(1)}-***", text)


# --- validation ---------------------------------------------------------------------------


def check_key_id(key_id: str) -> None:
    if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
        raise InvalidKeySpec(f"key id must be {KEY_ID_LENGTH} characters of a-z and 2-7, got {key_id!r}")


def check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise InvalidKeySpec("key name must be a non-empty string")
    if split_secret(name.strip()) is not None or _REDACT_PATTERN.search(name):
        raise InvalidKeySpec("key name must not contain an API key")
    check_text("name", name, MAX_NAME_LENGTH)


def check_tenant_name(name: str) -> None:
    if not isinstance(name, str) or not TENANT_PATTERN.fullmatch(name):
        raise InvalidKeySpec(
            f"tenant must be 1-64 characters of letters, digits, '.', '_' or '-' (starting with a letter "
            f"or digit), got {name!r}"
        )


def check_text(what: str, text: str, limit: int) -> None:
    if not isinstance(text, str):
        raise InvalidKeySpec(f"{what} must be a string")
    if len(text) > limit:
        raise InvalidKeySpec(f"{what} is longer than {limit} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InvalidKeySpec(f"{what} must not contain control characters")


def check_models(models: tuple[str, ...] | None) -> None:
    if models is None:
        return
    if not isinstance(models, tuple):
        raise InvalidKeySpec("models must be a tuple of model ids or patterns")
    if len(models) > MAX_MODEL_PATTERNS:
        raise InvalidKeySpec(f"at most {MAX_MODEL_PATTERNS} model patterns per key")
    for pattern in models:
        if not isinstance(pattern, str) or not pattern.strip() or pattern != pattern.strip():
            raise InvalidKeySpec(f"model pattern {pattern!r} must be a non-empty string without surrounding spaces")
        check_text("model pattern", pattern, 256)


def parse_models(text: str | None) -> tuple[str, ...] | None:
    """``--models a,b`` -> ("a", "b"); None or "" or "*" -> None (every model)."""
    if text is None:
        return None
    items = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not items or items == ("*",):
        return None
    check_models(items)
    return items


def model_allowed(patterns: tuple[str, ...] | None, names: tuple[str, ...]) -> bool:
    """True if any of ``names`` (a model id and its aliases) matches a pattern.

    Patterns are exact ids or shell-style globs (``llama-3*``), compared
    case-sensitively, as model ids are.
    """
    if patterns is None:
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in patterns)


_RELATIVE = re.compile(r"(\d+)\s*([mhdw])")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(text: str, *, now: float) -> dt.datetime:
    """``--expires``: ``2026-01-31`` (00:00 UTC that day), an ISO datetime, or ``30d``/``12h``/``90m``/``2w``.

    A datetime without an offset is taken as UTC. It must lie in the future.
    """
    cleaned = text.strip()
    match = _RELATIVE.fullmatch(cleaned.lower())
    if match:
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        when = dt.datetime.fromtimestamp(now + seconds, dt.timezone.utc)
    else:
        try:
            if len(cleaned) == 10:
                day = dt.date.fromisoformat(cleaned)
                when = dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc)
            else:
                when = dt.datetime.fromisoformat(cleaned)
        except ValueError:
            raise InvalidKeySpec(
                f"cannot read expiry {text!r}: use YYYY-MM-DD, an ISO date-time, or a duration like 30d, 12h, 90m"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
    if when.timestamp() <= now:
        raise InvalidKeySpec(f"expiry {text!r} is not in the future")
    return when.astimezone(dt.timezone.utc)


__all__ = [
    "DEFAULT_TENANT",
    "KEY_ID_LENGTH",
    "SECRET_PREFIX",
    "DataClass",
    "KeyRecord",
    "Limits",
    "TenantRecord",
    "lowest",
    "model_allowed",
    "new_key_id",
    "new_secret",
    "parse_expiry",
    "parse_models",
    "redact",
    "split_secret",
]

"""The key file codec: TOML read with ``tomllib``, written by a small serializer.

``<state dir>/keys.toml`` is readable by people (mode 0600; it holds only
salted hashes) and may be hand-edited, e.g. to change a limit; problems are
reported with the line of the offending table when it can be found.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import InvalidKeySpec, KeyFileError
from .model import DEFAULT_TENANT, DataClass, KeyRecord, Limits, TenantRecord, check_key_id

FILE_VERSION = 1
_TOP_KEYS = ("version", "tenants", "keys")
_LIMIT_KEYS = ("rpm", "tpm", "tokens_per_day")
_TENANT_KEYS = (*_LIMIT_KEYS, "models", "max_data_class", "note")
_KEY_KEYS = (
    "name", "tenant", "models", *_LIMIT_KEYS, "max_data_class", "created_at", "expires_at",
    "revoked_at", "created_by", "note", "hash",
)
_REQUIRED_KEY_KEYS = ("name", "created_at", "hash")
_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")

HEADER = """\
# meshd API keys and tenants. Only salted hashes of the secrets are stored here.
# Change it with `meshctl keys ...`; the running daemon also picks up hand edits
# (e.g. a changed limit) on the next request. A broken edit is reported with its
# line and the previous state stays in force. Comments are not kept.
#
# Limits: rpm / tpm = requests / tokens in any 60-second window,
#         tokens_per_day = tokens per UTC calendar day. Absent = unlimited.
# max_data_class: public < internal < confidential < secret.
"""


def parse_key_file(text: str, *, path: Path) -> tuple[dict[str, KeyRecord], dict[str, TenantRecord]]:
    """Parse the key file into (keys by id, configured tenants by name); ``KeyFileError`` if broken."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _POSITION.search(str(exc))
        line = int(match.group(1)) if match else None
        raise KeyFileError(f"not valid TOML: {_POSITION.sub('', str(exc)).strip()}", path=path, line=line) from exc

    def fail(detail: str, table: str | None = None) -> KeyFileError:
        return KeyFileError(detail, path=path, line=_table_line(text, table) if table else None)

    for key in document:
        if key not in _TOP_KEYS:
            raise fail(f"unknown top-level key {key!r} (expected: {', '.join(_TOP_KEYS)})")
    version = document.get("version", FILE_VERSION)
    if type(version) is not int or version != FILE_VERSION:
        raise fail(f"unsupported version {version!r}; this meshd reads version {FILE_VERSION}")

    tenants: dict[str, TenantRecord] = {}
    for name, table in _tables(document, "tenants", fail).items():
        where = f"tenants.{name}"
        _check_keys(table, _TENANT_KEYS, where, fail)
        try:
            tenants[name] = TenantRecord(
                name=name,
                limits=_limits(table),
                models=_models(table),
                max_data_class=DataClass.parse(table.get("max_data_class", "secret")),
                note=table.get("note", ""),
            )
        except InvalidKeySpec as exc:
            raise fail(f"[{where}]: {exc.message}", where) from exc

    keys: dict[str, KeyRecord] = {}
    for key_id, table in _tables(document, "keys", fail).items():
        where = f"keys.{key_id}"
        _check_keys(table, _KEY_KEYS, where, fail)
        missing = [k for k in _REQUIRED_KEY_KEYS if k not in table]
        if missing:
            raise fail(f"[{where}] is missing {', '.join(missing)}", where)
        try:
            check_key_id(key_id)
            if not isinstance(table["hash"], str):
                raise InvalidKeySpec("hash must be a string")
            keys[key_id] = KeyRecord(
                key_id=key_id,
                name=table["name"],
                tenant=table.get("tenant", DEFAULT_TENANT),
                created_at=_time(table, "created_at"),
                secret_hash=table["hash"],
                models=_models(table),
                limits=_limits(table),
                max_data_class=DataClass.parse(table.get("max_data_class", "secret")),
                expires_at=_optional_time(table, "expires_at"),
                revoked_at=_optional_time(table, "revoked_at"),
                created_by=table.get("created_by", ""),
                note=table.get("note", ""),
            )
        except InvalidKeySpec as exc:
            raise fail(f"[{where}]: {exc.message}", where) from exc
    return keys, tenants


def render_key_file(keys: Iterable[KeyRecord], tenants: Iterable[TenantRecord]) -> str:
    """The file as ``meshctl`` writes it: tenants by name, then keys by creation time."""
    out = [HEADER, f"\nversion = {FILE_VERSION}\n"]
    for tenant in sorted(tenants, key=lambda t: t.name):
        out.append(f"\n[tenants.{_key(tenant.name)}]\n")
        out.extend(_limit_lines(tenant.limits))
        if tenant.models is not None:
            out.append(f"models = {_array(tenant.models)}\n")
        if tenant.max_data_class is not DataClass.SECRET:
            out.append(f"max_data_class = {_string(tenant.max_data_class.value)}\n")
        if tenant.note:
            out.append(f"note = {_string(tenant.note)}\n")
    for record in sorted(keys, key=lambda k: (k.created_at, k.key_id)):
        out.append(f"\n[keys.{record.key_id}]\n")
        out.append(f"name = {_string(record.name)}\n")
        out.append(f"tenant = {_string(record.tenant)}\n")
        if record.models is not None:
            out.append(f"models = {_array(record.models)}\n")
        out.extend(_limit_lines(record.limits))
        if record.max_data_class is not DataClass.SECRET:
            out.append(f"max_data_class = {_string(record.max_data_class.value)}\n")
        out.append(f"created_at = {_datetime(record.created_at)}\n")
        if record.expires_at is not None:
            out.append(f"expires_at = {_datetime(record.expires_at)}\n")
        if record.revoked_at is not None:
            out.append(f"revoked_at = {_datetime(record.revoked_at)}\n")
        if record.created_by:
            out.append(f"created_by = {_string(record.created_by)}\n")
        if record.note:
            out.append(f"note = {_string(record.note)}\n")
        out.append(f"hash = {_string(record.secret_hash)}\n")
    return "".join(out)


# --- reading helpers --------------------------------------------------------------------


def _tables(document: dict[str, Any], name: str, fail: Any) -> dict[str, dict[str, Any]]:
    value = document.get(name, {})
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise fail(f"{name!r} must be a set of [{name}.<name>] tables")
    return value


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str, fail: Any) -> None:
    for key in table:
        if key not in allowed:
            raise fail(f"[{where}] has unknown key {key!r} (expected: {', '.join(allowed)})", where)


def _limits(table: dict[str, Any]) -> Limits:
    return Limits(**{k: table.get(k) for k in _LIMIT_KEYS})


def _models(table: dict[str, Any]) -> tuple[str, ...] | None:
    value = table.get("models")
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidKeySpec("models must be a list of model ids or patterns")
    return tuple(value)


def _time(table: dict[str, Any], name: str) -> dt.datetime:
    value = table[name]
    if not isinstance(value, dt.datetime):
        raise InvalidKeySpec(f"{name} must be a date-time like 2026-01-31T00:00:00Z")
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value


def _optional_time(table: dict[str, Any], name: str) -> dt.datetime | None:
    return _time(table, name) if name in table else None


def _table_line(text: str, table: str) -> int | None:
    # Enough for the file as we write it and ordinary hand edits: find the header.
    head, _, rest = table.partition(".")
    pattern = re.compile(rf"^[ \t]*\[\s*{re.escape(head)}\s*\.\s*\"?{re.escape(rest)}\"?\s*\]", re.MULTILINE)
    match = pattern.search(text)
    return text.count("\n", 0, match.start()) + 1 if match else None


# --- writing helpers ------------------------------------------------------------------------


def _string(value: str) -> str:
    # A JSON string with ASCII escapes is also a valid TOML basic string.
    return json.dumps(value, ensure_ascii=True)


def _array(values: Iterable[str]) -> str:
    return "[" + ", ".join(_string(v) for v in values) + "]"


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _string(name)


def _datetime(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _limit_lines(limits: Limits) -> list[str]:
    return [f"{name} = {value}\n" for name, value in limits.to_dict().items() if value is not None]


__all__ = ["FILE_VERSION", "parse_key_file", "render_key_file"]

"""The trust file codec: TOML read with ``tomllib``, written by a small serializer.

The file is meant to be read and, carefully, edited by people, so every
problem is reported with the line it is on. ``tomllib`` gives positions for
syntax errors only; for schema errors (unknown role, bad id, misspelt key) a
small line index maps tables and keys back to lines. It understands the file
as we write it and ordinary hand edits; for exotic TOML (inline tables,
dotted keys spanning tables) it falls back to the nearest line it can find.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from identity.errors import InvalidNodeId
from identity.nodeid import NodeId

from .trust_model import (
    InvalidRole,
    InvalidTrustEntry,
    Role,
    TrustEntry,
    TrustFileError,
    sorted_roles,
)

FILE_VERSION = 1
_ENTRY_KEYS = ("name", "roles", "added_at", "added_by", "note")
_TOP_KEYS = ("version", "peers")
_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")

HEADER = """\
# meshd trust store: the peers this node trusts, and for what.
# Change it with `meshctl trust add|revoke`; the running daemon also picks up
# hand edits (a broken edit is reported with its line and the previous state
# stays in force). Comments added here are not kept when meshctl rewrites it.
#
# roles: serve  = my users' requests may be sent to this peer
#        use    = this peer may send requests to me
#        cache  = KV-cache / session exchange
#        tensor = tensor and shard work
"""


# --- reading --------------------------------------------------------------------------


def parse_trust_file(text: str, *, path: Path) -> dict[NodeId, TrustEntry]:
    """Parse the trust file; raise ``TrustFileError`` with the offending line."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, column = _decode_error_position(exc, text)
        detail = _POSITION.sub("", str(exc)).strip()
        raise TrustFileError(f"not valid TOML: {detail}", path=path, line=line, column=column) from exc
    lines = _LineIndex(text)

    def fail(detail: str, table: tuple[str, ...] = (), key: str | None = None) -> TrustFileError:
        return TrustFileError(detail, path=path, line=lines.find(table, key))

    for key in document:
        if key not in _TOP_KEYS:
            raise fail(f"unknown top-level key {key!r} (expected: version, peers)", (), key)
    version = document.get("version", FILE_VERSION)
    if type(version) is not int or version != FILE_VERSION:
        raise fail(f"unsupported version {version!r}; this meshd reads version {FILE_VERSION}", (), "version")
    peers = document.get("peers", {})
    if not isinstance(peers, dict):
        raise fail("'peers' must be a table of [peers.<node id>] sections", (), "peers")

    entries: dict[NodeId, TrustEntry] = {}
    for raw_id, table in peers.items():
        where = ("peers", raw_id)
        try:
            node_id = NodeId.parse(raw_id)
        except InvalidNodeId as exc:
            raise fail(f"[peers.{raw_id}]: {exc.message}", where) from exc
        if node_id in entries:
            raise fail(f"[peers.{raw_id}]: {node_id} is listed twice", where)
        if not isinstance(table, dict):
            raise fail(f"peers.{raw_id} must be a table", ("peers",), raw_id)
        entries[node_id] = _parse_entry(node_id, table, where, fail)
    return entries


def _parse_entry(node_id: NodeId, table: dict[str, Any], where: tuple[str, ...], fail: Any) -> TrustEntry:
    for key in table:
        if key not in _ENTRY_KEYS:
            raise fail(f"unknown key {key!r} (expected: {', '.join(_ENTRY_KEYS)})", where, key)
    for key in ("name", "added_by", "note"):
        if key in table and not isinstance(table[key], str):
            raise fail(f"{key} must be a string", where, key)
    roles_value = table.get("roles", [])
    if not isinstance(roles_value, list) or not all(isinstance(r, str) for r in roles_value):
        raise fail('roles must be a list of strings, e.g. roles = ["serve", "use"]', where, "roles")
    try:
        roles = frozenset(Role.parse(r) for r in roles_value)
    except InvalidRole as exc:
        raise fail(exc.message, where, "roles") from exc
    added_at = table.get("added_at")
    if added_at is not None and not isinstance(added_at, dt.datetime):
        raise fail("added_at must be a date and time, e.g. 2025-01-31T12:00:00Z", where, "added_at")
    try:
        return TrustEntry(
            node_id=node_id,
            name=table.get("name", ""),
            roles=roles,
            added_at=added_at,
            added_by=table.get("added_by", ""),
            note=table.get("note", ""),
        )
    except InvalidTrustEntry as exc:
        raise fail(exc.message, where) from exc


def _decode_error_position(exc: tomllib.TOMLDecodeError, text: str) -> tuple[int | None, int | None]:
    # Python 3.14 exposes lineno/colno; 3.11-3.13 only put them in the message.
    line = getattr(exc, "lineno", None)
    if isinstance(line, int):
        return line, getattr(exc, "colno", None)
    match = _POSITION.search(str(exc))
    if match:
        return int(match.group(1)), int(match.group(2))
    if "end of document" in str(exc):
        return max(1, text.count("\n") + (0 if text.endswith("\n") else 1)), None
    return None, None


class _LineIndex:
    """Where each table header and key of a (syntactically valid) TOML text is."""

    def __init__(self, text: str) -> None:
        self._tables: dict[tuple[str, ...], int] = {}
        self._keys: dict[tuple[tuple[str, ...], str], int] = {}
        current: tuple[str, ...] = ()
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("[") and not line.startswith("[["):
                parts = _split_key(line[1:], stop="]")
                if parts:
                    current = tuple(parts)
                    self._tables.setdefault(current, number)
                continue
            parts = _split_key(line, stop="=")
            if parts:
                full = current + tuple(parts)
                # A dotted key also "opens" its parent tables at this line.
                for depth in range(len(current), len(full)):
                    self._keys.setdefault((full[:depth], full[depth]), number)

    def find(self, table: tuple[str, ...], key: str | None) -> int | None:
        if key is not None:
            if (table, key) in self._keys:
                return self._keys[(table, key)]
            opened = (*table, key)
            for header, number in self._tables.items():
                if header[: len(opened)] == opened:
                    return number
        while table:
            if table in self._tables:
                return self._tables[table]
            if (table[:-1], table[-1]) in self._keys:
                return self._keys[(table[:-1], table[-1])]
            table = table[:-1]
        return None


def _split_key(text: str, *, stop: str) -> list[str]:
    """Split ``a."b.c".d`` up to ``stop`` into its parts; [] if it is not a key."""
    parts: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        char = text[i]
        if char in "\"'":
            end = text.find(char, i + 1)
            if end < 0:
                return []
            current += text[i + 1 : end]
            i = end + 1
            continue
        if char == ".":
            parts.append(current.strip())
            current = ""
        elif char == stop:
            parts.append(current.strip())
            return parts if all(parts) else []
        else:
            current += char
        i += 1
    return []


# --- writing --------------------------------------------------------------------------


def render_trust_file(entries: Iterable[TrustEntry]) -> str:
    """The whole trust file for ``entries``, in the given order."""
    out = [HEADER, f"\nversion = {FILE_VERSION}\n"]
    for entry in entries:
        out.append(f"\n[peers.{entry.node_id}]\n")
        out.append(f"name = {toml_string(entry.name)}\n")
        roles = ", ".join(toml_string(r.value) for r in sorted_roles(entry.roles))
        out.append(f"roles = [{roles}]\n")
        if entry.added_at is not None:
            out.append(f"added_at = {toml_datetime(entry.added_at)}\n")
        if entry.added_by:
            out.append(f"added_by = {toml_string(entry.added_by)}\n")
        if entry.note:
            out.append(f"note = {toml_string(entry.note)}\n")
    return "".join(out)


def toml_datetime(value: dt.datetime) -> str:
    """RFC 3339 in UTC, whole seconds (strftime's %Y does not zero-pad years < 1000)."""
    v = value.astimezone(dt.timezone.utc)
    return f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}Z"


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(value: str) -> str:
    """A TOML basic string; control characters are escaped, other text kept as is."""
    out = ['"']
    for char in value:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


__all__ = ["FILE_VERSION", "HEADER", "parse_trust_file", "render_trust_file", "toml_string"]

"""Trust store data: roles, entries, change events and errors.

Kept apart from the file codec and the store so the daemon, the admin API and
``meshctl`` can share these types without touching files.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from identity.errors import IdentityError
from identity.nodeid import NodeId

MAX_NAME_LENGTH = 128
MAX_NOTE_LENGTH = 1024
MAX_ADDED_BY_LENGTH = 256


# --- errors ---------------------------------------------------------------------------


class TrustError(IdentityError):
    """Base of trust store errors."""

    code = "trust_error"


class TrustFileError(TrustError):
    """The trust file cannot be used; ``line`` (1-based) points at the problem when known."""

    code = "trust_file_invalid"

    def __init__(self, detail: str, *, path: Path, line: int | None = None, column: int | None = None) -> None:
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"trust file {where}: {detail}")
        self.detail = detail
        self.path = path
        self.line = line
        self.column = column


class PeerNotTrusted(TrustError):
    code = "peer_not_trusted"


class AmbiguousNodeId(TrustError):
    """A shortened id matches more than one trusted peer."""

    code = "ambiguous_node_id"


class InvalidRole(TrustError, ValueError):
    code = "invalid_role"


class InvalidTrustEntry(TrustError, ValueError):
    code = "invalid_trust_entry"


# --- roles ----------------------------------------------------------------------------


class Role(enum.StrEnum):
    """What a trusted peer is allowed to do; each role is granted separately."""

    SERVE = "serve"  # my users' requests may be sent to it
    USE = "use"  # it may send requests to me
    CACHE = "cache"  # KV-cache / session exchange
    TENSOR = "tensor"  # tensor and shard work

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls(text.strip().lower())
        except ValueError:
            known = ", ".join(r.value for r in cls)
            raise InvalidRole(f"unknown role {text!r} (roles: {known})") from None


ROLE_ORDER: tuple[Role, ...] = tuple(Role)
ALL_ROLES: frozenset[Role] = frozenset(Role)
# Enough for the two-machine case in the brief: each side serves the other.
DEFAULT_ROLES: frozenset[Role] = frozenset({Role.SERVE, Role.USE})


def parse_roles(text: str | Iterable[str]) -> frozenset[Role]:
    """``"serve,use"`` or ``["serve", "use"]`` to roles; ``"all"`` grants every role."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [item.strip() for item in items if item.strip()]
    if [n.lower() for n in names] == ["all"]:
        return ALL_ROLES
    return frozenset(Role.parse(n) for n in names)


def sorted_roles(roles: Iterable[Role]) -> list[Role]:
    present = set(roles)
    return [r for r in ROLE_ORDER if r in present]


# --- entries --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustEntry:
    """One trusted peer. ``added_at`` is normalised to whole seconds in UTC."""

    node_id: NodeId
    name: str = ""
    roles: frozenset[Role] = field(default_factory=frozenset)
    added_at: dt.datetime | None = None
    added_by: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, NodeId):
            raise InvalidTrustEntry(f"node_id must be a NodeId, not {type(self.node_id).__name__}")
        _check_text("name", self.name, MAX_NAME_LENGTH, single_line=True)
        _check_text("added_by", self.added_by, MAX_ADDED_BY_LENGTH, single_line=True)
        _check_text("note", self.note, MAX_NOTE_LENGTH, single_line=False)
        object.__setattr__(self, "roles", frozenset(Role.parse(str(r)) for r in self.roles))
        if self.added_at is not None:
            object.__setattr__(self, "added_at", _normalise_time(self.added_at))

    def allows(self, role: Role | str) -> bool:
        return Role.parse(str(role)) in self.roles

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view for the admin API and ``meshctl trust list --json``."""
        return {
            "node_id": str(self.node_id),
            "name": self.name,
            "roles": [r.value for r in sorted_roles(self.roles)],
            "added_at": None if self.added_at is None else self.added_at.isoformat().replace("+00:00", "Z"),
            "added_by": self.added_by,
            "note": self.note,
        }


def _check_text(what: str, value: object, limit: int, *, single_line: bool) -> None:
    if not isinstance(value, str):
        raise InvalidTrustEntry(f"{what} must be a string, not {type(value).__name__}")
    if len(value) > limit:
        raise InvalidTrustEntry(f"{what} is {len(value)} characters; the limit is {limit}")
    if single_line and any(c in value for c in "\r\n"):
        raise InvalidTrustEntry(f"{what} must be a single line")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise InvalidTrustEntry(f"{what} contains an unpaired surrogate")


def _normalise_time(value: object) -> dt.datetime:
    if not isinstance(value, dt.datetime):
        raise InvalidTrustEntry(f"added_at must be a date and time, not {type(value).__name__}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)  # a hand-written local time: read it as UTC
    return value.astimezone(dt.timezone.utc).replace(microsecond=0)


# --- change events --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerTrusted:
    entry: TrustEntry

    @property
    def node_id(self) -> NodeId:
        return self.entry.node_id


@dataclass(frozen=True, slots=True)
class PeerRevoked:
    """The peer is no longer trusted at all: close its connections and forget its state."""

    node_id: NodeId
    previous: TrustEntry


@dataclass(frozen=True, slots=True)
class TrustRolesChanged:
    node_id: NodeId
    old_roles: frozenset[Role]
    new_roles: frozenset[Role]
    entry: TrustEntry

    @property
    def granted(self) -> frozenset[Role]:
        return self.new_roles - self.old_roles

    @property
    def withdrawn(self) -> frozenset[Role]:
        """Roles to stop honouring now (e.g. cancel tensor work if TENSOR is here)."""
        return self.old_roles - self.new_roles


@dataclass(frozen=True, slots=True)
class TrustDetailsChanged:
    """Name, note or provenance changed; permissions did not."""

    node_id: NodeId
    previous: TrustEntry
    entry: TrustEntry


TrustChange = PeerTrusted | PeerRevoked | TrustRolesChanged | TrustDetailsChanged


def diff_entries(old: Mapping[NodeId, TrustEntry], new: Mapping[NodeId, TrustEntry]) -> tuple[TrustChange, ...]:
    """Events turning ``old`` into ``new``: revocations first, then role changes, then the rest."""
    revoked: list[TrustChange] = [PeerRevoked(n, old[n]) for n in sorted(old.keys() - new.keys())]
    roles: list[TrustChange] = []
    details: list[TrustChange] = []
    for node_id in sorted(old.keys() & new.keys()):
        before, after = old[node_id], new[node_id]
        if before.roles != after.roles:
            roles.append(TrustRolesChanged(node_id, before.roles, after.roles, after))
        if (before.name, before.note, before.added_at, before.added_by) != (
            after.name,
            after.note,
            after.added_at,
            after.added_by,
        ):
            details.append(TrustDetailsChanged(node_id, before, after))
    trusted: list[TrustChange] = [PeerTrusted(new[n]) for n in sorted(new.keys() - old.keys())]
    return (*revoked, *roles, *trusted, *details)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did: the changes applied, or the error that kept the old state."""

    changes: tuple[TrustChange, ...] = ()
    error: TrustFileError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


__all__ = [
    "ALL_ROLES",
    "DEFAULT_ROLES",
    "AmbiguousNodeId",
    "InvalidRole",
    "InvalidTrustEntry",
    "PeerNotTrusted",
    "PeerRevoked",
    "PeerTrusted",
    "ReloadResult",
    "Role",
    "TrustChange",
    "TrustDetailsChanged",
    "TrustEntry",
    "TrustError",
    "TrustFileError",
    "TrustRolesChanged",
    "diff_entries",
    "parse_roles",
    "sorted_roles",
]

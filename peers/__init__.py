"""Peers: the trust store (and, later, the peer table and discovery).

See docs/identity.md for the trust file format and the change events.
"""

from .trust import TRUST_FILE_NAME, TrustStore
from .trust_file import parse_trust_file, render_trust_file
from .trust_model import (
    ALL_ROLES,
    DEFAULT_ROLES,
    AmbiguousNodeId,
    InvalidRole,
    InvalidTrustEntry,
    PeerNotTrusted,
    PeerRevoked,
    PeerTrusted,
    ReloadResult,
    Role,
    TrustChange,
    TrustDetailsChanged,
    TrustEntry,
    TrustError,
    TrustFileError,
    TrustRolesChanged,
    diff_entries,
    parse_roles,
)

__all__ = [
    "ALL_ROLES",
    "DEFAULT_ROLES",
    "TRUST_FILE_NAME",
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
    "TrustStore",
    "diff_entries",
    "parse_roles",
    "parse_trust_file",
    "render_trust_file",
]

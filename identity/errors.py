"""The identity error family.

Every error carries a stable string ``code`` (the wire/admin-API code) and a
one-line human message. Callers at a boundary (the admin API, the QUIC
handshake, the CLI) map codes to their own status values; nothing in this
package formats errors for a particular transport.
"""

from __future__ import annotations

from pathlib import Path


class IdentityError(Exception):
    """Base of every error raised by ``identity`` (and the trust store)."""

    code: str = "identity_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- state directory, key files, locks ------------------------------------------------


class StateDirError(IdentityError):
    """The state directory or a file in it cannot be used."""

    code = "state_dir_error"

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class InsecurePermissions(StateDirError):
    """A secret file or the state directory is accessible to other users."""

    code = "insecure_permissions"


class StateDirLocked(StateDirError):
    """Another live process holds the state directory lock."""

    code = "state_dir_locked"

    def __init__(self, message: str, *, path: Path | None = None, pid: int | None = None) -> None:
        super().__init__(message, path=path)
        self.pid = pid


class KeyFileError(StateDirError):
    """The node key file exists but cannot be trusted (corrupt, wrong type, not a file)."""

    code = "key_file_invalid"


# --- node ids ------------------------------------------------------------------------


class InvalidNodeId(IdentityError, ValueError):
    """Text that is not a well-formed node id (bad length, character or check character)."""

    code = "invalid_node_id"


# --- signed records ------------------------------------------------------------------


class RecordError(IdentityError):
    """A signed record was rejected."""

    code = "record_invalid"


class RecordMalformed(RecordError):
    code = "record_malformed"


class RecordSignatureInvalid(RecordError):
    code = "record_bad_signature"


class RecordKeyMismatch(RecordError):
    """The public key carried in the record does not hash to the node id it claims."""

    code = "record_key_mismatch"


class RecordSignerMismatch(RecordError):
    """The record is authentic but signed by a node other than the one expected."""

    code = "record_unexpected_signer"


class RecordKindMismatch(RecordError):
    code = "record_wrong_kind"


class RecordExpired(RecordError):
    code = "record_expired"


class RecordNotYetValid(RecordError):
    """Issued further in the future than the clock-skew allowance."""

    code = "record_from_future"


class RecordLifetimeTooLong(RecordError):
    code = "record_lifetime_too_long"


class RecordReplayed(RecordError):
    """An older sequence number (or a different record under the same sequence number)."""

    code = "record_replayed"


# --- certificates --------------------------------------------------------------------


class CertificateError(IdentityError):
    """A peer certificate does not prove a node id."""

    code = "certificate_invalid"


class CertificateMalformed(CertificateError):
    code = "certificate_malformed"


class CertificateKeyUnsupported(CertificateError):
    code = "certificate_key_unsupported"


class CertificateSignatureInvalid(CertificateError):
    code = "certificate_bad_signature"


class CertificateNodeIdMismatch(CertificateError):
    code = "certificate_node_id_mismatch"


class CertificateExpired(CertificateError):
    code = "certificate_expired"


class CertificateNotYetValid(CertificateError):
    code = "certificate_not_yet_valid"


__all__ = [
    "CertificateError",
    "CertificateExpired",
    "CertificateKeyUnsupported",
    "CertificateMalformed",
    "CertificateNodeIdMismatch",
    "CertificateNotYetValid",
    "CertificateSignatureInvalid",
    "IdentityError",
    "InsecurePermissions",
    "InvalidNodeId",
    "KeyFileError",
    "RecordError",
    "RecordExpired",
    "RecordKeyMismatch",
    "RecordKindMismatch",
    "RecordLifetimeTooLong",
    "RecordMalformed",
    "RecordNotYetValid",
    "RecordReplayed",
    "RecordSignatureInvalid",
    "RecordSignerMismatch",
    "StateDirError",
    "StateDirLocked",
]

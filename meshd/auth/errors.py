"""Errors of key and tenant management (the key file, ``meshctl keys``, the admin API).

Errors a *client* of the OpenAI API can see (a wrong key, a model it may not
use, a rate limit) are ``meshd.errors`` classes with an HTTP status; these
ones are for the operator and carry only a stable ``code`` that the admin API
maps to its own status.
"""

from __future__ import annotations

from pathlib import Path


class KeyStoreError(Exception):
    """Base of key store errors."""

    code: str = "key_store_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class KeyFileError(KeyStoreError):
    """The key file cannot be used; ``line`` (1-based) points at the problem when known."""

    code = "key_file_invalid"

    def __init__(self, detail: str, *, path: Path, line: int | None = None) -> None:
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"key file {where}: {detail}")
        self.detail = detail
        self.path = path
        self.line = line


class KeyNotFound(KeyStoreError):
    code = "key_not_found"


class AmbiguousKey(KeyStoreError):
    """A name matches more than one key; use the key id."""

    code = "ambiguous_key"


class TenantNotFound(KeyStoreError):
    code = "tenant_not_found"


class InvalidKeySpec(KeyStoreError, ValueError):
    """A bad name, tenant, model pattern, limit, data class or expiry."""

    code = "invalid_key_spec"


class AdmissionClosed(RuntimeError):
    """``settle`` was called on an admission that is already settled or released (a caller bug)."""

    code = "admission_closed"


__all__ = [
    "AdmissionClosed",
    "AmbiguousKey",
    "InvalidKeySpec",
    "KeyFileError",
    "KeyNotFound",
    "KeyStoreError",
    "TenantNotFound",
]

"""The KV-cache error family.

Every reason a cache is refused (on export, on the wire, or at import) is a
``KVCacheError`` with a stable string ``code`` for logs, events and the
``refused`` frame of a cache channel. A refused cache is never loaded: all of
these are raised before llama.cpp sees a byte, except ``CacheImportFailed``,
which means llama.cpp itself rejected the state (and the sequence was cleared).

The caller's fallback for every one of them is the same: re-prefill.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "CacheChecksumMismatch",
    "CacheDescriptorInvalid",
    "CacheDescriptorMismatch",
    "CacheImportFailed",
    "CacheModelMismatch",
    "CacheStateUnsupported",
    "CacheTransferError",
    "KVCacheError",
]


class KVCacheError(Exception):
    """Base of every KV-cache export, transfer and import failure."""

    code: ClassVar[str] = "kv_cache_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CacheDescriptorInvalid(KVCacheError):
    """The descriptor is malformed: wrong types, missing or unknown fields, bad version."""

    code = "cache_descriptor_invalid"


class CacheDescriptorMismatch(KVCacheError):
    """Descriptor, tensors and receiving context disagree (layout, dtypes, shapes, tokens)."""

    code = "cache_descriptor_mismatch"


class CacheModelMismatch(CacheDescriptorMismatch):
    """The cache was computed by different weights (file sha256) than the receiver's."""

    code = "cache_model_mismatch"


class CacheChecksumMismatch(KVCacheError):
    """An envelope or whole-tensor CRC32C does not match the bytes received."""

    code = "cache_checksum_mismatch"


class CacheTransferError(KVCacheError):
    """The envelope stream is malformed, incomplete or oversized (not a checksum failure)."""

    code = "cache_transfer_error"


class CacheStateUnsupported(KVCacheError):
    """The backend's state has a layout this module cannot address (refused at export)."""

    code = "cache_state_unsupported"


class CacheImportFailed(KVCacheError):
    """llama.cpp refused the state after every check of ours passed."""

    code = "cache_import_failed"

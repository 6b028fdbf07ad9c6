"""Node ids: a human-checkable fingerprint of a node's Ed25519 public key.

Format (see docs/identity.md): ``MESHD-`` followed by ten groups of four
RFC 4648 base32 characters, e.g. ``MESHD-7Q2K-...``. The first 39 characters
are the first 195 bits of ``SHA-256("meshd node id v1\\0" || public_key)``;
the 40th is a check character.

The check character makes the whole id a codeword of a one-symbol check over
GF(32): reading the 40 symbols as the coefficients of a polynomial and
evaluating it at a primitive element ``a`` must give zero. A wrong character
at position ``i`` shifts the value by ``e * a^k`` (never zero in a field), and
swapping two different characters ``d`` apart shifts it by
``(x ^ y) * a^k * (a^d + 1)``, which is zero only when 31 divides ``d``. So
every single-character typo and every adjacent transposition is detected
before the id is ever used on the network.
"""

from __future__ import annotations

import hashlib
from base64 import b32encode
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import InvalidNodeId

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
PREFIX = "MESHD"
DATA_LENGTH = 39
ID_LENGTH = DATA_LENGTH + 1
GROUP_SIZE = 4
PUBLIC_KEY_LENGTH = 32
FINGERPRINT_DOMAIN = b"meshd node id v1\x00"

_VALUES = {c: i for i, c in enumerate(ALPHABET)}
# 0, 1 and 8 are not in the alphabet; people type them for O, I and B.
_LOOKALIKES = str.maketrans({"0": "O", "1": "I", "8": "B"})
_SEPARATORS = str.maketrans("", "", "- \t\r\n")

# GF(2^5) modulo the primitive polynomial x^5 + x^2 + 1; ``a`` is the element x.
_GF_POLY = 0b100101


def _gf_mul(a: int, b: int) -> int:
    result = 0
    while b:
        if b & 1:
            result ^= a
        b >>= 1
        a <<= 1
        if a & 0b100000:
            a ^= _GF_POLY
    return result


_TIMES_A = tuple(_gf_mul(x, 0b10) for x in range(32))


def _syndrome(symbols: Iterable[int]) -> int:
    """Horner evaluation of the symbols as a polynomial at ``a``."""
    acc = 0
    for symbol in symbols:
        acc = _TIMES_A[acc] ^ symbol
    return acc


def check_character(data: str) -> str:
    """The check character that makes ``data + check`` evaluate to zero."""
    return ALPHABET[_TIMES_A[_syndrome(_VALUES[c] for c in data)]]


def normalize(text: str) -> str:
    """Upper-case, drop separators and map look-alike digits; no validation.

    Useful for prefix matching of partial ids (``meshctl trust revoke 7Q2K``).
    A leading ``MESHD`` prefix is kept: only ``NodeId.parse`` knows from the
    length whether it is a prefix or data.
    """
    return text.translate(_SEPARATORS).upper().translate(_LOOKALIKES)


@dataclass(frozen=True, order=True, slots=True)
class NodeId:
    """A validated node id; ``compact`` is the canonical 40-character form."""

    compact: str

    def __post_init__(self) -> None:
        _validate(self.compact)

    @classmethod
    def parse(cls, text: str) -> NodeId:
        """Parse an id typed by a human: any case, with or without dashes or the prefix."""
        if not isinstance(text, str):
            raise InvalidNodeId(f"node id must be text, not {type(text).__name__}")
        cleaned = normalize(text)
        if len(cleaned) == len(PREFIX) + ID_LENGTH and cleaned.startswith(PREFIX):
            cleaned = cleaned[len(PREFIX) :]
        return cls(cleaned)

    @classmethod
    def from_public_key(cls, public_key: bytes) -> NodeId:
        if len(public_key) != PUBLIC_KEY_LENGTH:
            raise InvalidNodeId(f"an Ed25519 public key has 32 bytes, not {len(public_key)}")
        digest = hashlib.sha256(FINGERPRINT_DOMAIN + bytes(public_key)).digest()
        data = b32encode(digest[:25]).decode("ascii")[:DATA_LENGTH]
        return cls(data + check_character(data))

    def matches_public_key(self, public_key: bytes) -> bool:
        return len(public_key) == PUBLIC_KEY_LENGTH and NodeId.from_public_key(public_key) == self

    def groups(self) -> list[str]:
        return [self.compact[i : i + GROUP_SIZE] for i in range(0, ID_LENGTH, GROUP_SIZE)]

    def short(self, groups: int = 2) -> str:
        """A display form for tables, e.g. ``MESHD-7Q2K-ABCD``; never use it to identify a peer."""
        return "-".join([PREFIX, *self.groups()[:groups]])

    def __str__(self) -> str:
        return "-".join([PREFIX, *self.groups()])

    def __repr__(self) -> str:
        return f"NodeId({str(self)!r})"


def _validate(compact: object) -> None:
    if not isinstance(compact, str):
        raise InvalidNodeId(f"node id must be text, not {type(compact).__name__}")
    if not compact:
        raise InvalidNodeId("node id is empty")
    bad = sorted({c for c in compact if c not in _VALUES})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise InvalidNodeId(f"node id contains characters outside base32 (A-Z, 2-7): {shown}")
    if len(compact) != ID_LENGTH:
        raise InvalidNodeId(
            f"node id has {len(compact)} characters; expected {ID_LENGTH} "
            f"(plus the optional {PREFIX} prefix and dashes)"
        )
    if _syndrome(_VALUES[c] for c in compact) != 0:
        raise InvalidNodeId("node id check character does not match: the id has a typo")


__all__ = [
    "ALPHABET",
    "ID_LENGTH",
    "PREFIX",
    "NodeId",
    "check_character",
    "normalize",
]

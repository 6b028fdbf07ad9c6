"""The two facts the endpoint reads from a datagram before any connection owns it.

RFC 9000 section 17 (and RFC 8999's version-independent header): a long
header (first bit set) carries version and length-prefixed connection ids; a
short header carries only the destination id, whose length the receiver
chose. Parsed here in a few byte operations, engine-independent: it runs
once per datagram on the receive path.
"""

from __future__ import annotations

QUIC_V1 = b"\x00\x00\x00\x01"
MAX_CID_LENGTH = 20


def destination_cid(data: bytes, host_cid_length: int) -> bytes | None:
    """The destination connection id, or None for a datagram that cannot be QUIC."""
    if not data:
        return None
    if data[0] & 0x80:  # long header: flags, version(4), dcid_len, dcid
        if len(data) < 6 or data[5] > MAX_CID_LENGTH or len(data) < 6 + data[5]:
            return None
        return data[6:6 + data[5]]
    if len(data) < 1 + host_cid_length:
        return None
    return data[1:1 + host_cid_length]


def is_initial(data: bytes) -> bool:
    """A QUIC v1 Initial packet: long header, fixed bit, type 0 (RFC 9000 17.2.2)."""
    return len(data) >= 7 and data[0] & 0xF0 == 0xC0 and data[1:5] == QUIC_V1


__all__ = ["destination_cid", "is_initial"]

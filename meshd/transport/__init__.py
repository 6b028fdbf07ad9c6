"""QUIC glue: one UDP endpoint, one PeerLink (QUIC connection + PeerSession) per peer.

The QUIC engine (aioquic, or qh3 when installed and usable) is chosen at
import, see engine.py and docs/transport.md.
"""

from .endpoint import QuicEndpoint, links_of
from .engine import DEFAULT_ENGINE, ENGINE_NAME, load_engine
from .errors import EngineUnavailable, InvalidTransportSettings, TransportError
from .link import PeerLink
from .settings import ALPN, EngineSettings

__all__ = [
    "ALPN",
    "DEFAULT_ENGINE",
    "ENGINE_NAME",
    "EngineSettings",
    "EngineUnavailable",
    "InvalidTransportSettings",
    "PeerLink",
    "QuicEndpoint",
    "TransportError",
    "links_of",
    "load_engine",
]

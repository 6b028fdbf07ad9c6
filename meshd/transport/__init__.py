"""QUIC glue: one UDP endpoint, one PeerLink (QUIC connection + PeerSession) per peer."""

from .endpoint import QuicEndpoint, links_of
from .engine import ALPN, ENGINE_NAME, EngineSettings
from .link import PeerLink

__all__ = ["ALPN", "ENGINE_NAME", "EngineSettings", "PeerLink", "QuicEndpoint", "links_of"]

"""The mesh: discovery, peer connections and the peer table, composed."""

from .service import MeshService

__all__ = ["MeshService"]

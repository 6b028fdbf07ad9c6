"""Which of two connections between the same pair of nodes survives.

When both nodes dial each other at about the same time, each ends up with two
connections to the other. Both must close the same one without talking about
it, so the rule is a pure function of facts both sides know: the two node ids
and which node initiated each connection.

Rule: keep the connection initiated by the node whose id sorts first
(comparing the canonical ids as strings, i.e. ``NodeId.compact`` on both
sides); close the other with ``WireCode.DUPLICATE_CONNECTION``.
"""

from __future__ import annotations

from .errors import LocalProtocolError


def preferred_initiator(node_a: str, node_b: str) -> str:
    """The node whose outgoing connection survives between ``node_a`` and ``node_b``."""
    if node_a == node_b:
        raise LocalProtocolError(f"a connection from {node_a} to itself has no duplicate to resolve")
    return min(node_a, node_b)


def connection_survives(local_node_id: str, peer_node_id: str, *, initiated_locally: bool) -> bool:
    """True if this connection (dialled by us when ``initiated_locally``) is the one to keep.

    Symmetric by construction: for the same connection, the dialler calls this
    with ``initiated_locally=True`` and the acceptor with ``False``, and both
    get the same answer; for the other connection both get the opposite one.
    """
    initiator = local_node_id if initiated_locally else peer_node_id
    return initiator == preferred_initiator(local_node_id, peer_node_id)


__all__ = ["connection_survives", "preferred_initiator"]

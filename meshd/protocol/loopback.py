"""Two ``PeerSession`` objects wired back to back in memory, with no sockets.

Used by the tests and useful to anyone checking the transport contract: it
does exactly what the QUIC glue must do with ``data_to_send()`` (deliver
stream data in order, turn a ``ResetStream`` into the peer's
``stream_reset``, and a ``CloseConnection`` into the peer's
``connection_lost``), and records every transmit for inspection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .events import CloseConnection, Event, ResetStream, StreamData, Transmit
from .session import PeerSession


@dataclass
class Loopback:
    client: PeerSession
    server: PeerSession
    sent_by_client: list[Transmit] = field(default_factory=list)
    sent_by_server: list[Transmit] = field(default_factory=list)
    closed: bool = False

    def pump(self, now: float, *, max_bytes_per_stream: int | None = None, rounds: int = 64) -> int:
        """Move transmits both ways until both sides are quiet; return how many moved."""
        moved = 0
        for _ in range(rounds):
            step = self.client_to_server(now, max_bytes_per_stream)
            step += self.server_to_client(now, max_bytes_per_stream)
            moved += step
            if step == 0:
                return moved
        return moved

    def client_to_server(self, now: float, max_bytes_per_stream: int | None = None) -> int:
        """Deliver what the client has to send right now; return how many transmits moved."""
        return self._deliver(self.client, self.server, self.sent_by_client, now, max_bytes_per_stream)

    def server_to_client(self, now: float, max_bytes_per_stream: int | None = None) -> int:
        return self._deliver(self.server, self.client, self.sent_by_server, now, max_bytes_per_stream)

    def _deliver(
        self, sender: PeerSession, receiver: PeerSession, log: list[Transmit], now: float, limit: int | None
    ) -> int:
        transmits = sender.data_to_send(limit)
        log.extend(transmits)
        for transmit in transmits:
            if self.closed:
                break  # a closed QUIC connection delivers nothing more
            if isinstance(transmit, StreamData):
                receiver.receive_stream_data(transmit.stream_id, transmit.data, transmit.end_stream, now)
            elif isinstance(transmit, ResetStream):
                receiver.stream_reset(transmit.stream_id, now, transmit.error_code)
            elif isinstance(transmit, CloseConnection):
                self.closed = True
                receiver.connection_lost(now, transmit.reason)
        return len(transmits)


def drain(session: PeerSession) -> list[Event]:
    """Every pending event of ``session``, in order."""
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    return events


__all__ = ["Loopback", "drain"]

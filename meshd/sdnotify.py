"""systemd's readiness protocol: one datagram to $NOTIFY_SOCKET per state change."""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends ``READY=1`` / ``STOPPING=1``; does nothing when not under systemd."""

    def __init__(self, socket_path: str | None) -> None:
        self._address = socket_path or None
        if self._address and self._address.startswith("@"):
            self._address = "\0" + self._address[1:]  # abstract namespace

    def notify(self, state: str) -> bool:
        if not self._address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self._address)
                sock.sendall(state.encode())
        except OSError as exc:
            log.warning("sd_notify failed", extra={"fields": {"state": state, "error": exc.strerror}})
            return False
        return True


__all__ = ["Notifier"]

"""A small synchronous client for the daemon's admin socket (HTTP over AF_UNIX)."""

from __future__ import annotations

import errno
import http.client
import json
import socket
from pathlib import Path
from typing import Any


class DaemonNotRunning(Exception):
    pass


class AdminError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = json.loads(resp.read() or b"{}")
        except FileNotFoundError:
            raise DaemonNotRunning(f"meshd is not running (no admin socket at {self.socket_path})") from None
        except ConnectionRefusedError:
            raise DaemonNotRunning(f"meshd is not running (nothing listens on {self.socket_path})") from None
        except PermissionError:
            raise DaemonNotRunning(f"permission denied on {self.socket_path}: run as the daemon's user") from None
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise DaemonNotRunning(f"meshd is not running ({self.socket_path})") from None
            raise
        finally:
            conn.close()
        if resp.status >= 400:
            error = payload.get("error", {})
            raise AdminError(resp.status, error.get("code", "error"), error.get("message", resp.reason))
        return payload


__all__ = ["AdminClient", "AdminError", "DaemonNotRunning"]

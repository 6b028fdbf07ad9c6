"""This node as a split worker: the llama.cpp RPC server child process, on demand.

The server has no authentication and known memory-safety issues, so it runs in
its own process, bound to 127.0.0.1 on a port chosen here, reachable only
through tunnels from peers trusted with ``tensor`` (``tunnel.py``). It starts
when the first tunnel arrives and stops after ``split.worker_idle_s`` with no
tunnel open; a process that dies is started again by the next tunnel (the host
has re-planned by then, or retries). Its tensor cache lives in the state dir.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path
from typing import Any

from ..config import SplitConfig
from ..errors import BackendError

log = logging.getLogger(__name__)

__all__ = ["RpcWorker"]

START_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RpcWorker:
    def __init__(self, config: SplitConfig, state_dir: Path) -> None:
        self.config = config
        self.dir = state_dir / "split"
        self.proc: Any = None  # subprocess.Popen
        self.port: int | None = None
        self.tunnels = 0
        self.starts = 0
        self._starting: asyncio.Lock | None = None
        self._idle: asyncio.TimerHandle | None = None
        self.peers: set[str] = set()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def connect(self, peer: str, model: str | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A fresh loopback connection to the RPC server, started first if needed (a tunnel's local end)."""
        port = await self._ensure()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self.tunnels += 1
        self.peers.add(peer)
        self._cancel_idle()
        log.info("split worker tunnel opened", extra={"fields": {"peer": peer, "model": model, "port": port}})
        return reader, writer

    async def _ensure(self) -> int:
        from .rpc_server import spawn_rpc_server, wait_listening

        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.running and self.port is not None:
                return self.port
            if self.proc is not None:
                log.warning("split worker process had exited; starting it again",
                            extra={"fields": {"exit_code": self.proc.poll()}})
            self.dir.mkdir(mode=0o700, exist_ok=True)
            (self.dir / "cache").mkdir(mode=0o700, exist_ok=True)
            port = _free_port()
            threads = self.config.n_threads or os.cpu_count() or 1
            self.proc = spawn_rpc_server(port, self.dir / "cache", threads, self.dir / "worker.log")
            self.starts += 1
            try:
                await asyncio.to_thread(wait_listening, port, self.proc, START_TIMEOUT_S)
            except BackendError:
                self._kill()
                raise
            self.port = port
            log.info("split worker started", extra={"fields": {"pid": self.proc.pid, "port": port, "threads": threads}})
            return port

    def release(self, peer: str) -> None:
        """A tunnel that ``connect`` served has closed."""
        self.tunnels -= 1
        if self.tunnels <= 0:
            self.tunnels = 0
            self._cancel_idle()
            self._idle = asyncio.get_running_loop().call_later(self.config.worker_idle_s, self._stop_idle)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _stop_idle(self) -> None:
        self._idle = None
        if self.tunnels == 0 and self.running:
            log.info("split worker stopped: unused", extra={"fields": {"idle_s": self.config.worker_idle_s}})
            self._kill()

    def _kill(self) -> None:
        proc, self.proc, self.port = self.proc, None, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - a zombie is reaped at exit
            pass

    def close(self) -> None:
        self._cancel_idle()
        self._kill()

    def status(self) -> dict[str, Any]:
        return {"running": self.running, "pid": self.proc.pid if self.running else None,
                "port": self.port if self.running else None,
                "tunnels": self.tunnels, "starts": self.starts, "rss_bytes": _rss(self.proc) if self.running else None,
                "peers": sorted(self.peers)}


def _rss(proc: Any) -> int | None:
    """The worker's resident memory: the layers it holds show up here."""
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None

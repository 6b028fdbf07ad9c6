"""The composition root: builds every service from config, starts and stops them.

No service reaches for another on its own; everything is wired here, so the
order of start-up and shut-down is visible in one place.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from pathlib import Path

from .api import ApiMetrics, ApiServer, NodeFacts
from .backends.base import Backend, BackendLoad
from .backends.bundled import bundled_model_spec
from .backends.llama_cpp import LlamaCppBackend
from .catalog import ModelCatalog
from .config import DaemonConfig
from .errors import MeshdError
from .logs import fields
from .sdnotify import Notifier

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The daemon cannot start; the message is one line for the operator."""


def prepare_state_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create state dir {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise StartupError(f"state dir {path} is not writable")


class Daemon:
    def __init__(self, config: DaemonConfig, notify_socket: str | None = None) -> None:
        self.config = config
        self.notifier = Notifier(notify_socket)
        self.stopping = asyncio.Event()
        self.backends: list[Backend] = []
        self.api: ApiServer | None = None

    def _model_specs(self) -> list:
        specs = list(self.config.models)
        if self.config.default_model and not specs:
            try:
                specs.append(bundled_model_spec())
            except MeshdError as exc:
                raise StartupError(exc.message) from None
        return specs

    def _load(self) -> BackendLoad:
        loads = [b.load() for b in self.backends]
        return BackendLoad(sum(x.in_flight for x in loads), sum(x.queued for x in loads))

    def request_stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            log.info("stopping", extra=fields(reason=reason))
            self.stopping.set()

    async def run(self) -> int:
        config = self.config
        prepare_state_dir(config.state_dir)
        specs = self._model_specs()
        if specs:
            self.backends.append(LlamaCppBackend(specs, config.serving))
        catalog = ModelCatalog(self.backends)
        metrics = ApiMetrics(self._load)
        node = NodeFacts(node_id=socket.gethostname(), started=int(time.time()))
        self.api = ApiServer(config.api, catalog, metrics, node, config.shutdown_grace_s)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        try:
            try:
                await self.api.start()
            except OSError as exc:
                raise StartupError(f"cannot listen on {config.api.listen}: {exc.strerror or exc}") from None
            host, port = self.api.bound or (config.api.listen.host, config.api.listen.port)
            url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"
            log.info("api listening", extra=fields(url=url, models=",".join(s.id for s in specs) or "-"))
            starting = [asyncio.create_task(b.start()) for b in self.backends]
            stop_wait = asyncio.create_task(self.stopping.wait())
            await asyncio.wait([*starting, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            if all(t.done() for t in starting) and not self.stopping.is_set():
                for task in starting:
                    task.result()
                self.notifier.notify("READY=1")
                log.info("ready", extra=fields(url=url))
            await stop_wait
            self.notifier.notify("STOPPING=1")
            await self._shutdown(starting)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("stopped")
        return 0

    async def _shutdown(self, starting: list[asyncio.Task]) -> None:
        if self.api is not None:
            await self.api.stop()  # bounded by shutdown_grace_s
        await asyncio.gather(*starting, return_exceptions=True)
        for backend in self.backends:
            await backend.close()


__all__ = ["Daemon", "StartupError", "prepare_state_dir"]

"""The composition root: builds every service from config, starts and stops them.

No service reaches for another on its own; everything is wired here, so the
order of start-up and shut-down is visible in one place.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from pathlib import Path

from identity import (
    IdentityError,
    NodeKey,
    StateDirLock,
    load_or_create_node_key,
    load_or_create_tls_identity,
    lock_state_dir,
)
from peers import TRUST_FILE_NAME, TrustStore
from peers.trust_model import TrustChange

from .api import ApiMetrics, ApiServer, NodeFacts
from .api.admin import SOCKET_NAME, AdminConfig, AdminServer
from .backends.base import Backend, BackendLoad
from .backends.bundled import bundled_model_spec
from .backends.llama_cpp import LlamaCppBackend
from .catalog import ModelCatalog
from .config import DaemonConfig
from .errors import MeshdError
from .logs import fields
from .mesh.service import LocalNode, MeshService, new_boot_id
from .routing import Dispatcher, RequestMux, Router
from .sdnotify import Notifier

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The daemon cannot start; the message is one line for the operator."""


TRUST_POLL_S = 1.0


def claim_state_dir(path: Path) -> tuple[StateDirLock, NodeKey]:
    """Lock the state dir (one live daemon per dir) and load or create the node key."""
    try:
        lock = lock_state_dir(path)
    except IdentityError as exc:
        raise StartupError(str(exc)) from None
    try:
        return lock, load_or_create_node_key(path)
    except IdentityError as exc:
        lock.release()
        raise StartupError(str(exc)) from None


class Daemon:
    def __init__(self, config: DaemonConfig, notify_socket: str | None = None) -> None:
        self.config = config
        self.notifier = Notifier(notify_socket)
        self.stopping = asyncio.Event()
        self.backends: list[Backend] = []
        self.api: ApiServer | None = None
        self.admin: AdminServer | None = None
        self.trust: TrustStore | None = None
        self.mesh: MeshService | None = None
        self.dispatcher: Dispatcher | None = None

    def _model_specs(self) -> list:
        specs = list(self.config.models)
        if self.config.default_model and not specs:
            try:
                specs.append(bundled_model_spec())
            except MeshdError as exc:
                raise StartupError(exc.message) from None
        return specs

    def _capabilities(self, catalog: ModelCatalog) -> dict:
        """What peers learn about this node in its signed capability announcements."""
        models = [
            {"id": info.id, "aliases": list(info.aliases), "state": info.state, "backend": backend.name,
             "context_length": info.context_length}
            for backend, info in catalog.models()
        ]
        load = self._load()
        return {"backends": sorted({b.name for b in self.backends}), "models": models,
                "load": {"in_flight": load.in_flight, "queued": load.queued,
                         "served_for_peers": self.dispatcher.mux.served if self.dispatcher else 0}}

    def _load(self) -> BackendLoad:
        loads = [b.load() for b in self.backends]
        return BackendLoad(sum(x.in_flight for x in loads), sum(x.queued for x in loads))

    def request_stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            log.info("stopping", extra=fields(reason=reason))
            self.stopping.set()

    def trust_changed(self, changes: tuple[TrustChange, ...]) -> None:
        """Every trust change, from meshctl or a hand edit, lands here.

        The trust store already logs each change; the mesh re-checks every live
        session (a revoked peer is disconnected) and dials newly trusted peers.
        """
        if self.mesh is not None:
            self.mesh.trust_changed(changes)

    async def _watch_trust(self, trust: TrustStore) -> None:
        """Pick up hand edits of the trust file without a restart."""
        while True:
            await asyncio.sleep(TRUST_POLL_S)
            result = trust.poll()
            if result is None:
                continue
            if result.error is not None:
                log.error("trust file rejected; the previous state stays in force", extra=fields(error=str(result.error)))
            elif result.changes:
                log.info("trust file changed on disk", extra=fields(changes=len(result.changes)))
                self.trust_changed(result.changes)

    async def run(self) -> int:
        config = self.config
        lock, key = claim_state_dir(config.state_dir)
        try:
            return await self._run(key)
        finally:
            lock.release()

    async def _run(self, key: NodeKey) -> int:
        config = self.config
        name = config.name or socket.gethostname()
        self.trust = TrustStore(config.state_dir / TRUST_FILE_NAME)
        loaded = self.trust.reload()
        if loaded.error is not None:
            # No earlier good state exists at start-up: trust nobody until it is fixed.
            log.error("trust file rejected; no peer is trusted", extra=fields(error=str(loaded.error)))
        log.info("node identity", extra=fields(node_id=str(key.node_id), name=name, trusted_peers=len(self.trust)))
        specs = self._model_specs()
        if specs:
            self.backends.append(LlamaCppBackend(specs, config.serving))
        catalog = ModelCatalog(self.backends)
        metrics = ApiMetrics(self._load)
        node = NodeFacts(node_id=str(key.node_id), started=int(time.time()))
        mux = RequestMux(catalog)
        router = Router(config.routing, catalog, None, config.serving.max_queue)
        self.dispatcher = Dispatcher(router, mux, None, str(key.node_id))
        self.api = ApiServer(config.api, catalog, metrics, node, config.shutdown_grace_s, self.dispatcher)
        self.admin = AdminServer(
            AdminConfig(config.state_dir / SOCKET_NAME, config.admin.group), key.node_id, name, self.trust,
            self.trust_changed, lambda: self._api_url(),
        )

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        try:
            try:
                await self.api.start()
            except OSError as exc:
                raise StartupError(f"cannot listen on {config.api.listen}: {exc.strerror or exc}") from None
            bound_port = self.api.bound[1] if self.api.bound else config.api.listen.port
            try:
                tls = load_or_create_tls_identity(config.state_dir, key=key)
            except IdentityError as exc:
                raise StartupError(str(exc)) from None
            self.mesh = MeshService(config.mesh, LocalNode(key, name, bound_port, new_boot_id()), self.trust, tls,
                                    capabilities=lambda: self._capabilities(catalog))
            self.admin.mesh = self.mesh
            self.admin.dispatcher = self.dispatcher
            self.mesh.request_handler = mux
            self.mesh.on_link_closed = mux.link_closed
            router.mesh = self.dispatcher.mesh = self.mesh
            try:
                await self.mesh.start()
            except OSError as exc:
                raise StartupError(f"cannot start the mesh on {config.mesh.listen}: {exc.strerror or exc}") from None
            try:
                await self.admin.start()
            except OSError as exc:
                raise StartupError(f"cannot create the admin socket {self.admin.config.socket_path}: "
                                   f"{exc.strerror or exc}") from None
            watcher = asyncio.create_task(self._watch_trust(self.trust))
            url = self._api_url()
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
            watcher.cancel()
            await self._shutdown(starting)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("stopped")
        return 0

    def _api_url(self) -> str:
        listen = self.config.api.listen
        host, port = self.api.bound if self.api and self.api.bound else (listen.host, listen.port)
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"

    async def _shutdown(self, starting: list[asyncio.Task]) -> None:
        if self.admin is not None:
            await self.admin.stop()
        if self.mesh is not None:
            await self.mesh.stop()
        if self.api is not None:
            await self.api.stop()  # bounded by shutdown_grace_s
        await asyncio.gather(*starting, return_exceptions=True)
        for backend in self.backends:
            await backend.close()


__all__ = ["Daemon", "StartupError", "claim_state_dir"]

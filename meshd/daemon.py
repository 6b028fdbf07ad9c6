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
from typing import Any

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
from .api.gate import AccessGate
from .backends.base import Backend, BackendLoad
from .backends.bundled import bundled_model_spec
from .backends.llama_cpp import LlamaCppBackend
from .catalog import ModelCatalog
from .config import DaemonConfig
from .errors import MeshdError
from .logs import fields
from .mesh.service import LocalNode, MeshService, new_boot_id
from .modelid import FileFactsCache
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


def build_other_backends(config: DaemonConfig, facts_cache: FileFactsCache | None = None) -> list[Backend]:
    """Upstream, vLLM and MLX backends; one that cannot run here stops start-up with its reason."""
    from .backends.mlx import MlxBackend
    from .backends.upstream import UpstreamBackend
    from .backends.vllm import VllmBackend

    backends: list[Backend] = [UpstreamBackend(c) for c in config.upstreams]
    try:
        backends += [VllmBackend(c) for c in config.vllm]
        backends += [MlxBackend(c, facts_cache) for c in config.mlx]
    except MeshdError as exc:
        raise StartupError(exc.message) from None
    return backends


DESCRIBE_INTERVAL_S = 15.0  # upstream descriptors follow their /v1/models refreshes


async def describe_backend(backend: Backend, catalog: ModelCatalog, warned: set[str]) -> None:
    """One backend's model identity into the catalog; failures are logged, never raised."""
    try:
        descriptors = await backend.descriptors()  # hashing and file reads run in worker threads
    except ImportError as exc:
        if backend.name not in warned:
            warned.add(backend.name)
            log.warning("cannot describe models: a package is missing (GGUF identity needs `gguf`: "
                        "pip install 'meshd[llama]'); their identity stays unknown",
                        extra=fields(backend=backend.name, error=str(exc)))
        return
    except (OSError, ValueError, KeyError) as exc:  # unreadable or malformed model files
        log.warning("cannot describe models", extra=fields(backend=backend.name, error=str(exc)))
        return
    catalog.set_descriptors(backend, descriptors)


async def describe_models(backends: list[Backend], starting: list[asyncio.Task], catalog: ModelCatalog,
                          interval_s: float = DESCRIBE_INTERVAL_S) -> None:
    """Model identity of every backend once its start is over, then again every ``interval_s``.

    Files are hashed once (the backends remember, the facts cache survives
    restarts), so the repeats cost nothing for them; upstreams are described
    from their latest ``/v1/models``, which changes when they come and go.
    """
    warned: set[str] = set()
    while True:
        for backend, task in zip(backends, starting):
            if task.done():
                await describe_backend(backend, catalog, warned)
        pending = [t for t in starting if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=interval_s, return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(interval_s)


async def detect_node(daemon: Daemon) -> None:
    """The node descriptor with its accelerators (imports llama_cpp / mlx: in a worker thread)."""
    from .mesh.capabilities import detect_accelerators, node_descriptor

    accelerators = await asyncio.to_thread(detect_accelerators)
    daemon.node_facts = await asyncio.to_thread(node_descriptor, accelerators)
    log.info("node hardware", extra=fields(cpu=daemon.node_facts.get("cpu_model") or "unknown",
                                           accelerators=",".join(a.get("name") or a["type"] for a in accelerators)
                                           or "none"))


RECEIPTS_DIR = "receipts"


def open_gate(config: DaemonConfig, key: NodeKey) -> AccessGate:
    """API keys, quotas and receipts; an API beyond loopback without a usable key stops start-up."""
    from .auth import KeyFileError, KeyStore
    from .telemetry import ReceiptLogCorrupt, ReceiptWriter

    try:
        keys = KeyStore.open(config.state_dir)
    except KeyFileError as exc:
        raise StartupError(f"the API key file is broken: {exc}") from None
    listen, auth = config.api.listen, config.auth
    usable = [k for k in keys.list(include_revoked=False) if not k.expired(time.time())]
    if not listen.is_loopback and not auth.insecure_no_auth and not usable:
        raise StartupError(
            f"the API listens on {listen}, beyond loopback, and no API key exists: create one with "
            "`meshctl keys create --name NAME` (or pass --insecure-no-auth to serve without keys)")
    if auth.insecure_no_auth:
        log.warning("API keys are off (--insecure-no-auth): anyone who reaches the API can use it",
                    extra=fields(listen=str(listen)))
    writer = None
    if config.receipts.enabled:
        try:
            writer = ReceiptWriter(config.state_dir / RECEIPTS_DIR, max_file_bytes=config.receipts.max_file_bytes)
        except (OSError, ReceiptLogCorrupt) as exc:
            raise StartupError(f"cannot open the receipt log: {exc}") from None
    return AccessGate(auth, keys, key, receipts=writer)


async def flush_receipts(gate: AccessGate, interval_s: float) -> None:
    """Batches receipts to disk (fsync'd off the event loop); a failed write is retried next time."""
    writer = gate.receipts
    while writer is not None:
        await asyncio.sleep(interval_s)
        try:
            await writer.aflush()
        except OSError as exc:
            log.error("cannot write receipts; they stay queued", extra=fields(error=str(exc)))


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
        self.node_facts: dict | None = None  # node descriptor with accelerators, once detected
        self.kv: Any = None  # meshd.kvnode.KvNode when [kvcache] is enabled and a llama.cpp model is served
        self.split: Any = None  # meshd.split.node.SplitNode: this node as layer-split worker and host
        self._drain_task: asyncio.Task | None = None

    def _model_specs(self) -> list:
        specs = list(self.config.models)
        other_backends = self.config.upstreams or self.config.vllm or self.config.mlx
        if self.config.default_model and not specs and not other_backends:
            try:
                specs.append(bundled_model_spec())
            except MeshdError as exc:
                raise StartupError(exc.message) from None
        return specs

    def _capabilities(self, catalog: ModelCatalog) -> dict:
        """What peers learn about this node in its signed capability announcements.

        ``identity`` is the model's descriptor (modelid.ModelDescriptor.to_dict,
        None fields unknown; None as a whole until described), ``sha256`` its
        file sha256 when known.
        """
        features = {b.name: b.capabilities().names() for b in self.backends}
        models = [
            {"id": info.id, "aliases": list(info.aliases), "state": info.state, "backend": backend.name,
             "context_length": info.context_length, "sha256": (info.details or {}).get("sha256"),
             "identity": (info.details or {}).get("identity"), "capabilities": features[backend.name]}
            for backend, info in catalog.models()
        ]
        if self.kv is not None:
            for model, (backend, _) in zip(models, catalog.models()):
                if backend is self.kv.backend:
                    # Cached conversations (newest first, capped): docs/kvcache.md "Prefix cache".
                    model["kv_prefixes"] = self.kv.announce(model["sha256"])
        load = self._load()
        payload = {"backends": sorted({b.name for b in self.backends}), "models": models,
                   "health": {b.name: b.health().to_dict() for b in self.backends},
                   "load": {"in_flight": load.in_flight, "queued": load.queued,
                            # one decimal: the announcement is re-signed only when something changed
                            "tokens_per_s": round(load.tokens_per_s, 1),
                            "served_for_peers": self.dispatcher.mux.served if self.dispatcher else 0}}
        if self.split is not None:
            payload["split"] = self.split.capability()
        if self.node_facts is not None:
            payload["node"] = self.node_facts  # replaces the mesh's own, which lacks accelerators
        return payload

    def _load(self) -> BackendLoad:
        loads = [b.load() for b in self.backends]
        return BackendLoad(sum(x.in_flight for x in loads), sum(x.queued for x in loads),
                           sum(x.tokens_per_s for x in loads))

    def _signalled(self, name: str) -> None:
        # A second SIGTERM during a drain (or SIGINT) stops at once: the operator insists.
        if name == "SIGTERM" and self.kv is not None and self.config.kvcache.drain_on_sigterm \
                and self._drain_task is None and not self.stopping.is_set():
            asyncio.ensure_future(self.drain(name))  # stops the daemon once drained
        else:
            self.request_stop(name)

    async def drain(self, reason: str = "meshctl drain") -> dict:
        """Stop admitting requests, finish in-flight ones, hand cached conversations to peers, then stop.

        Idempotent: a second call (meshctl twice, or SIGTERM during a drain)
        waits for the same drain and gets the same report.
        """
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain(reason))
        return await asyncio.shield(self._drain_task)

    async def _drain(self, reason: str) -> dict:
        log.info("draining", extra=fields(reason=reason))
        if self.api is not None:
            self.api.accepting = False  # /v1/* answers 503 shutting_down from now on
        if self.dispatcher is not None:
            self.dispatcher.mux.accepting = False  # and so do requests peers forward here
        # In-flight generations store their conversation when they finish, so
        # the caches are handed over only once the backends are idle.
        deadline = time.monotonic() + self.config.shutdown_grace_s
        while time.monotonic() < deadline:
            load = self._load()
            if load.in_flight + load.queued == 0:
                break
            await asyncio.sleep(0.05)
        result: dict = {"moved": [], "failed": [], "kvcache": self.kv is not None}
        if self.kv is not None and self.mesh is not None:
            try:
                report = await self.kv.drain(self.mesh)
            except Exception as exc:  # noqa: BLE001 - whatever happens, a drain ends with the daemon stopping
                log.exception("drain failed; stopping anyway")
                result["failed"] = [{"prefix_sha256": "*", "error": f"drain failed: {exc}"}]
            else:
                result["moved"] = [{"peer": p, "prefix_sha256": h, "tokens": n} for p, h, n in report.moved]
                result["failed"] = [{"prefix_sha256": h, "error": e} for h, e in report.failed]
        log.info("drained", extra=fields(moved=len(result["moved"]), failed=len(result["failed"])))
        # A moment later, so the admin response carrying this report leaves first.
        asyncio.get_running_loop().call_later(0.2, self.request_stop, f"drained ({reason})")
        return result

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
        facts_cache = await asyncio.to_thread(FileFactsCache.in_state_dir, config.state_dir)
        from .split.node import SplitNode

        self.split = SplitNode(config.split, config.state_dir, name)
        split_specs = [s for s in specs if s.split != "off"]
        specs = [s for s in specs if s.split == "off"]
        if split_specs:
            from .split.backend import SplitBackend

            self.backends.append(SplitBackend(split_specs, config.serving, self.split.plan_for,
                                              config.state_dir / "split", facts_cache))
        if specs:
            llama = LlamaCppBackend(specs, config.serving, facts_cache, config.kvcache)
            self.backends.append(llama)
            if llama.prefix_cache is not None:
                from .kvnode import KvNode

                self.kv = KvNode(config.kvcache, llama)
        self.backends += build_other_backends(config, facts_cache)
        catalog = ModelCatalog(self.backends)
        metrics = ApiMetrics(self._load)
        node = NodeFacts(node_id=str(key.node_id), started=int(time.time()))
        gate = open_gate(config, key)
        mux = RequestMux(catalog, gate)
        router = Router(config.routing, catalog, None, config.serving.max_queue)
        self.dispatcher = Dispatcher(router, mux, None, str(key.node_id), gate)
        self.api = ApiServer(config.api, catalog, metrics, node, config.shutdown_grace_s, self.dispatcher, gate)
        self.admin = AdminServer(
            AdminConfig(config.state_dir / SOCKET_NAME, config.admin.group), key.node_id, name, self.trust,
            self.trust_changed, lambda: self._api_url(),
        )

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled, sig.name)
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
            from .transport import InvalidTransportSettings

            try:
                self.mesh = MeshService(config.mesh, LocalNode(key, name, bound_port, new_boot_id()), self.trust,
                                        tls, capabilities=lambda: self._capabilities(catalog))
            except InvalidTransportSettings as exc:
                raise StartupError(str(exc)) from None
            self.admin.mesh = self.mesh
            self.admin.dispatcher = self.dispatcher
            self.admin.drain = self.drain
            self.admin.split = self.split
            self.admin.split_specs = {name: s for s in split_specs for name in (s.id, *s.aliases)}
            # Tensor channels (split tunnels, peers trusted with `tensor`) and cache
            # channels (peers trusted with `cache`) first, then requests.
            requests = self.kv.handler(mux) if self.kv is not None else mux
            self.mesh.request_handler = self.split.handler(requests)
            self.split.mesh = self.mesh
            if self.kv is not None:
                self.kv.mesh = self.mesh
                self.dispatcher.cache_planner = self.kv.plan
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
            self.split.start()  # probes in the background; split models wait for it before planning
            url = self._api_url()
            log.info("api listening", extra=fields(url=url, models=",".join(s.id for s in (*specs, *split_specs))
                                                   or "-"))
            starting = [asyncio.create_task(b.start()) for b in self.backends]
            # Background work that readiness does not wait for: trust file edits,
            # receipt batches, model identity (hashing model files) and accelerators.
            background = [asyncio.create_task(self._watch_trust(self.trust)),
                          asyncio.create_task(flush_receipts(gate, config.receipts.flush_interval_s)),
                          asyncio.create_task(describe_models(self.backends, starting, catalog)),
                          asyncio.create_task(detect_node(self))]
            all_started = asyncio.ensure_future(asyncio.gather(*starting))
            all_started.add_done_callback(lambda f: f.cancelled() or f.exception())  # raised below, or at stop
            stop_wait = asyncio.create_task(self.stopping.wait())
            await asyncio.wait([all_started, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            if all_started.done() and not self.stopping.is_set():
                all_started.result()
                self.notifier.notify("READY=1")
                log.info("ready", extra=fields(url=url))
            await stop_wait
            self.notifier.notify("STOPPING=1")
            for task in background:
                task.cancel()
            await self._shutdown(starting)
            if gate.receipts is not None:
                try:
                    gate.receipts.close()
                except OSError as exc:
                    log.error("receipts not written at shutdown", extra=fields(error=str(exc),
                                                                              lost=gate.receipts.pending))
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
        if self.split is not None:
            self.split.close()


__all__ = ["Daemon", "StartupError", "claim_state_dir"]

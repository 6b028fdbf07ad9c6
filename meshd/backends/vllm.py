"""vLLM: meshd launches and supervises ``vllm serve MODEL`` and talks to it as an upstream.

A vLLM server you run yourself needs none of this: it is an ``[[upstreams]]``
entry with ``dialect = "vllm"`` (``vllm_upstream`` builds one). This module is
for the other case: meshd starts the server on a free loopback port, waits
until it answers, restarts it with backoff if it dies, captures its output in
the daemon log and stops it (and its workers) on shutdown.

Without vLLM installed, or without a GPU, the backend refuses to exist:
constructing it raises ``BackendUnavailable`` with the reason, so a config
that asks for it is rejected at start.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import BackendUnavailable, ServiceUnavailable
from ..modelid import ModelDescriptor
from .base import (
    BackendCapabilities,
    BackendHealth,
    BackendLoad,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    health_of,
)
from .supervisor import ChildReady, ProcessSupervisor, SupervisorConfig, SupervisorEvent
from .upstream import UpstreamBackend, UpstreamConfig

log = logging.getLogger(__name__)

# Placeholders: {model} {host} {port} {served_name}
DEFAULT_COMMAND: tuple[str, ...] = (
    "vllm", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--served-model-name", "{served_name}",
)


@dataclass(frozen=True)
class VllmConfig:
    """One ``vllm serve`` child and the model it serves."""

    model: str  # what `vllm serve` loads: a Hugging Face repo id or a local path
    id: str | None = None  # local model id; default: served_name
    served_name: str | None = None  # --served-model-name; default: id, else model
    aliases: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free loopback port, picked when the backend is built
    extra_args: tuple[str, ...] = ()  # appended, e.g. ("--max-model-len", "8192")
    command: tuple[str, ...] = DEFAULT_COMMAND
    env: Mapping[str, str] | None = None  # the child's whole environment; None inherits meshd's
    require_gpu: bool = True  # false only for a CPU build of vLLM
    ready_path: str = "/v1/models"
    ready_timeout_s: float = 900.0  # model download + load + CUDA graph capture
    timeout_s: float = 300.0
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 120.0
    stop_timeout_s: float = 30.0
    max_in_flight: int = 64  # vLLM batches; let it
    max_queue: int = 256
    retry_after_s: int = 5

    @property
    def local_id(self) -> str:
        return self.id or self.served_name or self.model

    @property
    def upstream_name(self) -> str:
        return self.served_name or self.id or self.model


def detect_gpus(dev_dir: Path = Path("/dev")) -> list[str]:
    """GPU device nodes vLLM could use: NVIDIA (nvidiaN), AMD ROCm (kfd), WSL (dxg)."""
    found = sorted(p.name for p in dev_dir.glob("nvidia[0-9]*"))
    found += [name for name in ("kfd", "dxg") if (dev_dir / name).exists()]
    return found


def preflight(config: VllmConfig, *, path: str | None = None, dev_dir: Path = Path("/dev")) -> list[str]:
    """Refuse a vLLM backend that cannot run here; returns the GPUs found.

    ``path`` is the PATH to search for the command (None: this process's).
    """
    executable = config.command[0] if config.command else ""
    if not executable or shutil.which(executable, path=path) is None:
        raise BackendUnavailable(
            f"vLLM is not installed: `{executable}` is not on PATH. Install it where a GPU is "
            "(pip install 'meshd[vllm]'), or run `vllm serve` yourself and add it as an "
            "[[upstreams]] entry with dialect = \"vllm\"",
            code="vllm_not_installed",
        )
    gpus = detect_gpus(dev_dir)
    if config.require_gpu and not gpus:
        raise BackendUnavailable(
            f"vLLM needs a GPU and this host has none (no {dev_dir}/nvidia*, {dev_dir}/kfd or "
            f"{dev_dir}/dxg). Serve '{config.model}' with the llama.cpp backend instead, or set "
            "require_gpu = false for a CPU build of vLLM",
            code="no_gpu",
        )
    return gpus


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def vllm_upstream(name: str, base_url: str, models: Mapping[str, str], api_key: str | None = None,
                  **settings: object) -> UpstreamConfig:
    """An ``UpstreamConfig`` for a vLLM server someone else runs (the vLLM preset)."""
    defaults: dict[str, object] = {"dialect": "vllm", "timeout_s": 300.0, "max_in_flight": 64, "max_queue": 256}
    return UpstreamConfig(name=name, base_url=base_url, model_map=dict(models), api_key=api_key,
                          **{**defaults, **settings})  # type: ignore[arg-type]


class VllmBackend:
    """A supervised ``vllm serve`` child, reached through the upstream adapter."""

    def __init__(
        self,
        config: VllmConfig,
        *,
        path: str | None = None,
        dev_dir: Path = Path("/dev"),
        on_event: Callable[[SupervisorEvent], None] | None = None,
    ) -> None:
        self.gpus = preflight(config, path=path, dev_dir=dev_dir)
        self.config = config
        self._on_event = on_event
        self._refreshing: set[asyncio.Task[None]] = set()
        self.name = f"vllm:{config.local_id}"
        self.port = config.port or free_port(config.host)
        host = f"[{config.host}]" if ":" in config.host else config.host
        values = {"model": config.model, "host": config.host, "port": str(self.port), "served_name": config.upstream_name}
        argv = tuple(part.format(**values) for part in config.command) + tuple(config.extra_args)
        self.base_url = f"http://{host}:{self.port}"
        self.supervisor = ProcessSupervisor(
            SupervisorConfig(
                name=self.name,
                argv=argv,
                ready_url=self.base_url + config.ready_path,
                env=config.env,
                ready_timeout_s=config.ready_timeout_s,
                backoff_initial_s=config.backoff_initial_s,
                backoff_max_s=config.backoff_max_s,
                stop_timeout_s=config.stop_timeout_s,
            ),
            on_event=self._supervisor_event,
        )
        self.upstream = UpstreamBackend(
            UpstreamConfig(
                name=config.local_id,
                base_url=self.base_url + "/v1",
                model_map={config.local_id: config.upstream_name},
                dialect="vllm",
                timeout_s=config.timeout_s,
                connect_timeout_s=5.0,
                refresh_s=0,  # the supervisor watches health; no polling needed
                max_in_flight=config.max_in_flight,
                max_queue=config.max_queue,
                retry_after_s=config.retry_after_s,
            ),
            kind="vllm",
        )

    def _supervisor_event(self, event: SupervisorEvent) -> None:
        if isinstance(event, ChildReady) and self.upstream.started:
            # A restarted server: forget the failures seen while it was down.
            task = asyncio.create_task(self.upstream.refresh())
            self._refreshing.add(task)
            task.add_done_callback(self._refreshing.discard)
        if self._on_event is not None:
            self._on_event(event)

    async def start(self) -> None:
        """Launch the child and wait until it serves; raises BackendError if it never does."""
        await self.supervisor.start()
        await self.upstream.start()

    async def close(self) -> None:
        for task in self._refreshing:
            task.cancel()
        await asyncio.gather(*self._refreshing, return_exceptions=True)
        await self.upstream.close()
        await self.supervisor.stop()

    def models(self) -> list[ModelInfo]:
        infos = []
        for info in self.upstream.models():
            state, error = info.state, info.error
            if self.supervisor.state == "failed":
                state, error = "failed", "the vLLM process failed; see the daemon log"
            elif not self.supervisor.ready:
                state, error = "loading", None
            infos.append(ModelInfo(
                id=info.id, aliases=self.config.aliases, owned_by=self.name, context_length=info.context_length,
                state=state, error=error, details={**info.details, "pid": self.supervisor.pid},
            ))
        return infos

    def capabilities(self) -> BackendCapabilities:
        return self.upstream.capabilities()

    def health(self) -> BackendHealth:
        if self.supervisor.state == "backoff":
            return BackendHealth("down", f"the vLLM process exited; restart {self.supervisor.restarts + 1} is scheduled")
        return health_of(self.models())  # loading while the child starts, failed if it cannot

    async def descriptors(self) -> list[ModelDescriptor]:
        return [replace(d, aliases=self.config.aliases) for d in await self.upstream.descriptors()]

    def load(self) -> BackendLoad:
        return self.upstream.load()

    def _check_ready(self, model: str) -> None:
        if model != self.config.local_id:
            return  # the upstream raises ModelNotFound
        if not self.supervisor.ready:
            raise ServiceUnavailable(
                f"The model '{model}' is not ready: its vLLM process is {self.supervisor.state}",
                code="model_loading", retry_after=self.config.retry_after_s,
            )

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self._check_ready(request.model)
        return self.upstream.generate(request)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        self._check_ready(request.model)
        return await self.upstream.embed(request)


__all__ = [
    "DEFAULT_COMMAND",
    "VllmBackend",
    "VllmConfig",
    "detect_gpus",
    "free_port",
    "preflight",
    "vllm_upstream",
]

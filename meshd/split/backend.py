"""Split models as a backend: llama.cpp contexts in child processes, layers on peers.

The same slots, admission and streaming as ``LlamaCppBackend`` (it is one);
only the engine differs: ``SplitEngine`` runs the llama context in a child
process (llama.cpp aborts the process when an RPC connection fails, and meshd
must survive that) and asks ``plan_for`` where the layers go, at load and
again after a loss. A model loads in the background: until a plan exists
(peers connect, trust changes) it stays ``loading`` and says what it waits for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..backends.base import BackendCapabilities, ModelInfo
from ..backends.llama_cpp import LlamaCppBackend
from ..config import ModelSpec, ServingConfig
from ..errors import MeshdError
from ..modelid import FileFactsCache

log = logging.getLogger(__name__)

__all__ = ["SplitBackend"]

RETRY_S = 2.0

# (spec, lost) -> HostPlan; runs on the slot's thread, blocks until the event loop answered.
PlanFor = Callable[[ModelSpec, bool], Any]


class SplitBackend(LlamaCppBackend):
    name = "llama.cpp-split"

    def __init__(self, specs: Sequence[ModelSpec], serving: ServingConfig, plan_for: PlanFor, log_dir: Path,
                 facts_cache: FileFactsCache | None = None) -> None:
        self._plan_for = plan_for
        self._log_dir = log_dir
        self._loaders: list[asyncio.Task] = []
        super().__init__(specs, serving, facts_cache, None)

    def _make_engine(self, spec: ModelSpec) -> Any:
        from .engine import SplitEngine

        return SplitEngine(spec.path, spec.n_ctx, self._serving.n_threads,
                           lambda lost: self._plan_for(spec, lost), self._log_dir / f"host-{spec.id}.log")

    def capabilities(self) -> BackendCapabilities:
        # Embeddings would need a second context, placed again; not offered for split models.
        return BackendCapabilities(embeddings=False, json_object=True, json_schema=True, resume=True)

    async def start(self) -> None:
        """Returns at once: each model loads in the background, retrying until a plan exists."""
        self._log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._loaders = [asyncio.create_task(self._load_until_ready(slot), name=f"split-load-{slot.spec.id}")
                         for slot in self._slots.values()]

    async def _load_until_ready(self, slot: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(slot.executor, slot.engine.load)
            except MeshdError as exc:
                if slot.error != exc.message:
                    log.warning("split model not loaded yet", extra={"fields": {"model": slot.spec.id,
                                                                                "reason": exc.message}})
                slot.error = exc.message  # /v1/models and meshctl say what it waits for
                await asyncio.sleep(RETRY_S)
                continue
            slot.state, slot.error = "ready", None
            log.info("split model ready", extra={"fields": {
                "model": slot.spec.id, "plan": slot.engine.plan.summary if slot.engine.plan else "",
                "devices": ",".join(f"{d.get('device')}={d.get('model_buffer_mib')}MiB"
                                    for d in slot.engine.devices)}})
            return

    async def close(self) -> None:
        for task in self._loaders:
            task.cancel()
        await asyncio.gather(*self._loaders, return_exceptions=True)
        await super().close()

    def models(self) -> list[ModelInfo]:
        infos = super().models()
        out = []
        for info, slot in zip(infos, self._slots.values()):
            engine = slot.engine
            details = dict(info.details)
            details["split"] = {"mode": slot.spec.split,
                                "plan": engine.plan.summary if engine.plan is not None else None,
                                "devices": list(engine.devices), "restarts": engine.restarts}
            out.append(ModelInfo(id=info.id, aliases=info.aliases, owned_by=info.owned_by,
                                 context_length=info.context_length, embedding_length=info.embedding_length,
                                 state=info.state, error=info.error, details=details))
        return out

"""The daemon's layer-split wiring: worker, tunnels, planning and what peers are told.

``meshd/split/`` holds the mechanisms; this module connects them to the mesh
so ``daemon.py`` stays a composition root:

- ``handler(next)``: tensor channels (tunnels) first, every other event on;
- ``capability()``: the ``split`` entry of the signed capability announcement
  (worker or not, memory it may use for layers, measured speed);
- ``host_plan(spec, lost)``: for the split backend's engine thread: plan the
  model's layers over this node and connected peers, open a loopback listener
  per worker peer, and return the endpoints llama.cpp should use. After a loss
  (``lost``) the peers whose tunnels broke in the last ``FAILED_FOR_S`` are
  left out;
- ``explain(model)``: ``meshctl plan``: the plan in use and a fresh one, with reasons.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from ..config import ModelSpec, SplitConfig
from ..errors import ServiceUnavailable
from ..logs import fields
from .planner import LOCAL, NodeOffer, NoPlan, SplitPlan, plan_layers
from .resources import free_memory_bytes, measure_speed_gbs
from .shape import ModelShape, model_shape
from .tunnel import Tunnels
from .worker import RpcWorker

log = logging.getLogger(__name__)

__all__ = ["FAILED_FOR_S", "SplitNode"]

FAILED_FOR_S = 30.0  # a peer whose tunnel broke is left out of re-plans this long
MiB = 1 << 20


class SplitNode:
    def __init__(self, config: SplitConfig, state_dir: Path, name: str) -> None:
        self.config = config
        self.name = name
        self.state_dir = state_dir
        self.rpc_missing: str | None = None  # why this build cannot run llama.cpp RPC (checked at start)
        self.worker = RpcWorker(config, state_dir) if config.worker else None
        self.tunnels = Tunnels(self.worker.connect if self.worker else None,
                               self.worker.release if self.worker else None, self._tunnel_lost)
        self.mesh: Any = None  # MeshService, set once it exists
        self.loop: asyncio.AbstractEventLoop | None = None
        self._probe: asyncio.Future | None = None
        self.probed = asyncio.Event()  # RPC support checked and speed measured: planning may start
        self.speed_gbs = 0.0
        self.plans: dict[str, SplitPlan] = {}
        self.shapes: dict[str, ModelShape] = {}
        self._failed: dict[str, float] = {}  # peer -> when its tunnel broke
        self._listeners: dict[tuple[str, str], Any] = {}  # (peer, model) -> asyncio Server on 127.0.0.1

    def start(self) -> None:
        """Check RPC support and measure speed in the background: start-up does not wait for them."""
        self.loop = asyncio.get_running_loop()
        self._probe = asyncio.ensure_future(self._probe_node())

    async def _probe_node(self) -> None:
        from .rpclib import rpc_support

        try:
            self.rpc_missing = await asyncio.to_thread(rpc_support)  # imports llama_cpp: off the loop
            if self.rpc_missing is not None and self.worker is not None:
                self.worker = None
                self.tunnels.stop_serving()
            self.speed_gbs = self.config.speed_gbs or await asyncio.to_thread(measure_speed_gbs)
        finally:
            self.probed.set()  # a failed probe leaves the defaults (speed 1.0 when planning), never a hang
        log.info("split ready", extra=fields(worker=self.worker is not None, speed_gbs=round(self.speed_gbs, 1),
                                             memory_mib=self.memory_bytes() // MiB,
                                             rpc=self.rpc_missing or "available"))

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        self.tunnels.close()
        for server in self._listeners.values():
            server.close()
        self._listeners.clear()
        if self.worker is not None:
            self.worker.close()

    def handler(self, nxt: Any) -> Any:
        def handle(link: Any, event: Any) -> None:
            if not self.tunnels.handle(link, event):
                nxt(link, event)

        return handle

    # --- what peers learn -----------------------------------------------------------

    def memory_bytes(self) -> int:
        """Model memory this node may use for split layers: the budget, or what is free."""
        if self.config.memory_budget_mb > 0:
            return self.config.memory_budget_mb * MiB
        return free_memory_bytes()

    def capability(self) -> dict[str, Any]:
        # Rounded: the announcement is re-signed and re-sent only when it changes.
        # Not a worker until RPC support is checked: no host plans on us before.
        return {"worker": self.worker is not None and self.probed.is_set(),
                "memory_bytes": self.memory_bytes() // (16 * MiB) * 16 * MiB,
                "speed_gbs": round(self.speed_gbs, 1),
                **({"unavailable": self.rpc_missing} if self.rpc_missing else {})}

    def status(self) -> dict[str, Any]:
        return {**self.capability(), "tunnels": self.tunnels.open_count,
                "worker_process": self.worker.status() if self.worker else None,
                "plans": {model: plan.to_dict() for model, plan in self.plans.items()}}

    # --- planning ---------------------------------------------------------------------

    def offers(self, exclude: set[str] = frozenset()) -> tuple[NodeOffer, list[NodeOffer]]:
        from identity import NodeId

        local = NodeOffer(LOCAL, self.name or "this node", self.memory_bytes(), self.speed_gbs or 1.0)
        peers: list[NodeOffer] = []
        mesh = self.mesh
        if mesh is None:
            return local, peers
        for node_id, link in list(mesh.active.items()):
            peer = str(node_id)
            record = mesh.table.get(node_id)
            split = record.split if record is not None else {}
            if peer in exclude or not split.get("worker") or not mesh.trust.allows(NodeId.parse(peer), "tensor"):
                continue
            if link.session is None or not link.session.established:
                continue
            try:
                peers.append(NodeOffer(peer, record.name or peer[:15], int(split.get("memory_bytes", 0)),
                                       float(split.get("speed_gbs", 0.0)), float(record.rtt_ms or 0.0)))
            except (TypeError, ValueError):
                continue  # peer data: malformed entries are ignored
        return local, peers

    async def _shape(self, spec: ModelSpec) -> ModelShape:
        if spec.id not in self.shapes:
            self.shapes[spec.id] = await asyncio.to_thread(model_shape, spec.path)
        return self.shapes[spec.id]

    def _recently_failed(self) -> set[str]:
        now = time.monotonic()
        return {peer for peer, when in self._failed.items() if now - when < FAILED_FOR_S}

    def _tunnel_lost(self, peer: str, why: str) -> None:
        self._failed[peer] = time.monotonic()
        log.warning("split tunnel lost", extra=fields(peer=peer, code=why))

    async def plan(self, spec: ModelSpec, exclude: set[str] = frozenset(), after_loss: bool = False) -> SplitPlan:
        shape = await self._shape(spec)
        local, peers = self.offers(exclude)
        try:
            return plan_layers(shape, spec.n_ctx, local, peers, spec.split)
        except NoPlan:
            if not after_loss or spec.split != "always":
                raise
            # After a loss, serving on alone (if it fits) beats failing the request in flight.
            return plan_layers(shape, spec.n_ctx, local, peers, "auto")

    async def host_plan(self, spec: ModelSpec, lost: bool) -> Any:
        """Where ``spec``'s layers go now, as llama.cpp endpoints; waits up to plan_wait_s for peers."""
        from .engine import HostPlan

        await self.probed.wait()
        if lost:
            await asyncio.sleep(0.5)  # let the broken tunnels report before choosing again
        deadline = time.monotonic() + self.config.plan_wait_s
        while True:
            exclude = self._recently_failed() if lost else set()
            try:
                plan = await self.plan(spec, exclude, after_loss=lost)
                break
            except NoPlan as exc:
                if time.monotonic() >= deadline:
                    raise ServiceUnavailable(f"cannot place the layers of {spec.id!r}: {exc}",
                                             code="split_unavailable") from None
                await asyncio.sleep(1.0)
        endpoints = []
        for placement in plan.workers:
            endpoints.append(f"127.0.0.1:{await self._listener(placement.node, spec.id)}")
        self.plans[spec.id] = plan
        log.info("split plan", extra=fields(model=spec.id, plan=plan.summary(), after_loss=lost))
        return HostPlan(endpoints=tuple(endpoints), n_gpu_layers=plan.n_gpu_layers,
                        tensor_split=plan.tensor_split, summary=plan.summary(), head_on_host=plan.head_on_host)

    async def _listener(self, peer: str, model: str) -> int:
        from identity import NodeId

        server = self._listeners.get((peer, model))
        if server is None:
            node_id = NodeId.parse(peer)
            server = await self.tunnels.listen(lambda: self.mesh.active.get(node_id), model)
            self._listeners[peer, model] = server
        return int(server.sockets[0].getsockname()[1])

    def plan_for(self, spec: ModelSpec, lost: bool) -> Any:
        """``host_plan`` for a worker thread: blocks it until the event loop has answered."""
        assert self.loop is not None
        future = asyncio.run_coroutine_threadsafe(self.host_plan(spec, lost), self.loop)
        return future.result(timeout=self.config.plan_wait_s + 60)

    async def explain(self, spec: ModelSpec) -> dict[str, Any]:
        """For ``meshctl plan``: the plan in use, what would be chosen now, and the offers behind it."""
        await self.probed.wait()
        shape = await self._shape(spec)
        local, peers = self.offers()
        out: dict[str, Any] = {"model": spec.id, "mode": spec.split, "shape": shape.to_dict(), "n_ctx": spec.n_ctx,
                               "offers": [o.__dict__ for o in (local, *peers)],
                               "current": self.plans[spec.id].to_dict() if spec.id in self.plans else None}
        try:
            out["now"] = plan_layers(shape, spec.n_ctx, local, peers, spec.split).to_dict()
        except NoPlan as exc:
            out["now"] = None
            out["error"] = str(exc)
        return out

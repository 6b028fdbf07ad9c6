"""The layer planner (pure): which node runs how many of a model's layers, and why.

Inputs are what nodes advertise (memory they may use for layers, a measured
speed) and the model's shape. The host runs the llama context, so it keeps
the token embeddings and the *first* layers; workers take the rest, in device
order. The output head goes to the host when the host has room left for it
after its layers (its ~200 KB of logits per token then never cross the
tunnel, only a small hidden state does), else to the last worker, where
llama.cpp offloads it first. Layers go to nodes in proportion to speed (a token passes
through every layer in turn, so a slow node holding many layers slows every
token), never beyond a node's memory; peers are added fastest first and only
as many as needed, because every extra node adds a network hop per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .shape import ModelShape

LOCAL = "local"


class NoPlan(Exception):
    """No placement fits; the message says what is missing."""


@dataclass(frozen=True)
class NodeOffer:
    node: str  # LOCAL or a peer's node id
    name: str
    memory_bytes: int  # what the node may hold for this model's layers
    speed: float  # measured, relative (GB/s of matrix-vector throughput)
    rtt_ms: float = 0.0


@dataclass(frozen=True)
class Placement:
    node: str
    name: str
    layers: int
    bytes: int


@dataclass(frozen=True)
class SplitPlan:
    placements: tuple[Placement, ...]  # the host first, then workers in device order
    reasons: tuple[str, ...] = field(default=())
    head_on_host: bool = False  # split, with the output head's weights kept on the host

    @property
    def workers(self) -> tuple[Placement, ...]:
        return tuple(p for p in self.placements[1:] if p.layers > 0)

    @property
    def remote_layers(self) -> int:
        return sum(p.layers for p in self.workers)

    @property
    def n_gpu_layers(self) -> int:
        """llama.cpp's count of offloaded layers: the workers' layers and the output head.

        The head counts even when it stays home: llama.cpp offloads the output layer first, so
        one less would take a repeating layer from the workers; the host child pins the head's
        weights to the CPU instead (``head_on_host``)."""
        return self.remote_layers + 1 if self.remote_layers else 0

    @property
    def tensor_split(self) -> tuple[float, ...] | None:
        """Proportions among the workers of the ``n_gpu_layers``; the head counts with the last one,
        so every worker gets exactly its layer count (llama.cpp cuts at cumulative fractions)."""
        workers = self.workers
        if len(workers) < 2:
            return None
        return (*(float(p.layers) for p in workers[:-1]), float(workers[-1].layers + 1))

    def summary(self) -> str:
        return ", ".join(f"{p.name} {p.layers} layers" for p in self.placements if p.layers > 0)

    def to_dict(self) -> dict:
        return {"placements": [{"node": p.node, "name": p.name, "layers": p.layers, "bytes": p.bytes}
                               for p in self.placements],
                "remote_layers": self.remote_layers, "head": "last worker" if self.remote_layers and not self.head_on_host else "host",
                "reasons": list(self.reasons)}


def plan_layers(shape: ModelShape, n_ctx: int, local: NodeOffer, peers: list[NodeOffer], mode: str) -> SplitPlan:
    """Place ``shape``'s layers; ``mode`` is "auto" (split only if it does not fit) or "always"."""
    cost = shape.layer_cost(n_ctx)
    reasons: list[str] = []
    host_room = local.memory_bytes - shape.other_bytes
    if host_room < 0:
        raise NoPlan(f"this node's budget ({_mib(local.memory_bytes)}) cannot hold the model's embeddings "
                     f"and output ({_mib(shape.other_bytes)})")
    capacity = {local.node: min(shape.n_layer, max(0, host_room - shape.output_bytes) // cost)}
    if mode == "auto" and capacity[local.node] >= shape.n_layer:
        reasons.append(f"fits here: {_mib(shape.total_bytes(n_ctx))} within {_mib(local.memory_bytes)}")
        return SplitPlan((Placement(local.node, local.name, shape.n_layer, shape.total_bytes(n_ctx)),), tuple(reasons))
    def usable(p: NodeOffer) -> bool:
        return p.memory_bytes - shape.output_bytes >= cost and p.speed > 0

    ranked = sorted(filter(usable, peers), key=lambda p: (-p.speed, p.rtt_ms, p.node))
    for p in peers:
        if not usable(p):
            reasons.append(f"{p.name}: cannot take a layer ({_mib(p.memory_bytes)} offered; a layer needs "
                           f"{_mib(cost)} and the output head {_mib(shape.output_bytes)})")
    chosen: list[NodeOffer] = []
    # Split, the host keeps only the token embeddings: it has room for more layers.
    capacity[local.node] = min(shape.n_layer, host_room // cost)
    for peer in ranked:
        if chosen and sum(capacity.values()) >= shape.n_layer:
            break
        chosen.append(peer)
        # Any worker may end up last, holding the output head: reserve room for it on each.
        capacity[peer.node] = min(shape.n_layer, max(0, peer.memory_bytes - shape.output_bytes) // cost)
    if not chosen:
        raise NoPlan("no connected peer trusted with tensor offers a worker with room for a layer")
    if sum(capacity.values()) < shape.n_layer:
        short = (shape.n_layer - sum(capacity.values())) * cost
        raise NoPlan(f"the model needs {_mib(short)} more than this node and "
                     f"{len(chosen)} peer(s) can hold; add a worker or raise split.memory_budget_mb")
    nodes = [local, *chosen]
    counts = _water_fill(shape.n_layer, [n.speed for n in nodes], [capacity[n.node] for n in nodes])
    for node, count in zip(nodes, counts):
        why = "capped by memory" if count == capacity[node.node] and count < shape.n_layer else "by speed"
        reasons.append(f"{node.name}: {count} layers ({why}; {node.speed:.1f} GB/s, {_mib(node.memory_bytes)} room)")
    last = max((i for i, c in enumerate(counts) if c > 0 and i > 0), default=0)
    # The head stays home if the host's layers leave room for it: a token's logits then never
    # cross the tunnel (SmolLM2: 2.3 KB back per token instead of ~196 KB, docs/split.md).
    head_home = last > 0 and host_room - counts[0] * cost >= shape.output_bytes
    head_at = 0 if head_home else last
    reasons.append("output head: on this node (room left after its layers)" if head_home
                   else f"output head: on {nodes[last].name} (no room left here)")
    placements = [Placement(n.node, n.name, c, c * cost + (shape.other_bytes if i == 0 else 0)
                            + (shape.output_bytes if i == head_at else 0))
                  for i, (n, c) in enumerate(zip(nodes, counts))]
    return SplitPlan(tuple(placements), tuple(reasons), head_on_host=head_home)


def _water_fill(total: int, speeds: list[float], caps: list[int]) -> list[int]:
    """Integer shares of ``total`` proportional to ``speeds``, none above its cap."""
    counts = [0] * len(speeds)
    open_ = [i for i in range(len(speeds)) if caps[i] > 0]
    left = total
    while left > 0 and open_:
        weight = sum(speeds[i] for i in open_) or float(len(open_))
        shares = {i: left * (speeds[i] or 1.0) / weight for i in open_}
        capped = [i for i in open_ if counts[i] + shares[i] >= caps[i]]
        if capped:  # give capped nodes their cap, then share what is left among the others
            for i in capped:
                left -= caps[i] - counts[i]
                counts[i] = caps[i]
            open_ = [i for i in open_ if i not in capped]
            continue
        floors = {i: int(shares[i]) for i in open_}
        for i in open_:
            counts[i] += floors[i]
        left -= sum(floors.values())
        # Largest remainders first; the host (index 0) wins ties: it saves a hop.
        for i in sorted(open_, key=lambda i: (-(shares[i] - floors[i]), i))[:left]:
            counts[i] += 1
        left = 0
    return counts


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


__all__ = ["LOCAL", "NoPlan", "NodeOffer", "Placement", "SplitPlan", "plan_layers"]

"""The layer planner: memory caps, speed shares, fewest peers, clear refusals."""

from __future__ import annotations

import pytest

from meshd.split.planner import LOCAL, NodeOffer, NoPlan, plan_layers
from meshd.split.shape import ModelShape, model_shape

MiB = 1 << 20
SHAPE = ModelShape(n_layer=30, layer_bytes=10 * MiB, other_bytes=40 * MiB)


def local(mib: int, speed: float = 10.0) -> NodeOffer:
    return NodeOffer(LOCAL, "here", mib * MiB, speed)


def peer(name: str, mib: int, speed: float = 10.0, rtt: float = 0.5) -> NodeOffer:
    return NodeOffer(f"id-{name}", name, mib * MiB, speed, rtt)


def test_auto_keeps_a_model_that_fits_local() -> None:
    plan = plan_layers(SHAPE, 0, local(1000), [peer("b", 1000)], "auto")
    assert [(p.node, p.layers) for p in plan.placements] == [(LOCAL, 30)]
    assert plan.remote_layers == 0 and not plan.workers
    assert "fits here" in plan.reasons[0]


def test_auto_splits_what_does_not_fit_and_caps_the_host_by_memory() -> None:
    # Host room: 200 - 40 = 160 MiB -> 16 layers; equal speeds would give 15/15, so speed decides.
    plan = plan_layers(SHAPE, 0, local(200), [peer("b", 1000)], "auto")
    assert [p.layers for p in plan.placements] == [15, 15]
    plan = plan_layers(SHAPE, 0, local(140), [peer("b", 1000)], "auto")  # room for 10 layers only
    assert [p.layers for p in plan.placements] == [10, 20]
    assert "capped by memory" in next(r for r in plan.reasons if r.startswith("here:"))
    assert plan.placements[0].bytes == 10 * 10 * MiB + 40 * MiB


def test_faster_nodes_get_more_layers() -> None:
    plan = plan_layers(SHAPE, 0, local(1000, speed=10), [peer("b", 1000, speed=20)], "always")
    assert [p.layers for p in plan.placements] == [10, 20]
    assert plan.tensor_split is None  # one worker: all remote layers on it


def test_always_uses_the_fastest_peer_only_when_one_suffices() -> None:
    plan = plan_layers(SHAPE, 0, local(1000), [peer("slow", 1000, 5), peer("fast", 1000, 10)], "always")
    assert [p.name for p in plan.workers] == ["fast"]


def test_more_peers_are_added_until_the_model_fits() -> None:
    plan = plan_layers(SHAPE, 0, local(100), [peer("b", 100), peer("c", 100), peer("d", 100)], "auto")
    assert sum(p.layers for p in plan.placements) == 30
    assert all(p.layers * 10 * MiB <= 100 * MiB for p in plan.workers)
    assert [p.name for p in plan.workers] == ["b", "c", "d"]
    assert plan.tensor_split == (*(float(p.layers) for p in plan.workers[:-1]), plan.workers[-1].layers + 1.0)


def test_the_output_head_stays_home_when_the_host_has_room() -> None:
    shape = ModelShape(n_layer=30, layer_bytes=10 * MiB, other_bytes=40 * MiB, output_bytes=40 * MiB)
    # 300 + 40 + 40 MiB does not fit 360; split, the host keeps only the embeddings: room for 32 layers,
    # of which speed gives it 15, leaving 170 MiB: enough for the head.
    plan = plan_layers(shape, 0, local(360), [peer("b", 45), peer("c", 1000)], "auto")
    assert [p.name for p in plan.workers] == ["c"]  # b cannot hold a layer besides the head
    host, worker = plan.placements
    assert plan.head_on_host
    assert host.bytes == host.layers * 10 * MiB + 40 * MiB + 40 * MiB and worker.bytes == worker.layers * 10 * MiB
    assert plan.n_gpu_layers == worker.layers + 1  # llama.cpp's count still includes the head (planner.py)
    assert "output head: on this node" in plan.reasons[-1]
    assert plan.to_dict()["head"] == "host"


def test_the_output_head_goes_with_the_last_worker_when_the_host_is_full() -> None:
    shape = ModelShape(n_layer=30, layer_bytes=10 * MiB, other_bytes=40 * MiB, output_bytes=40 * MiB)
    plan = plan_layers(shape, 0, local(140), [peer("c", 1000)], "auto")  # host room: exactly 10 layers
    host, worker = plan.placements
    assert (host.layers, plan.head_on_host) == (10, False)
    assert worker.bytes == worker.layers * 10 * MiB + 40 * MiB and host.bytes == 10 * 10 * MiB + 40 * MiB
    assert plan.n_gpu_layers == worker.layers + 1
    assert plan.reasons[-1] == "output head: on c (no room left here)"
    three = plan_layers(shape, 0, local(100), [peer("b", 180), peer("c", 180)], "auto")
    assert not three.head_on_host
    assert three.tensor_split == (float(three.workers[0].layers), float(three.workers[1].layers + 1))
    assert three.placements[-1].bytes == three.workers[1].layers * 10 * MiB + 40 * MiB


def test_kv_cache_counts_toward_a_layer() -> None:
    shape = ModelShape(n_layer=30, layer_bytes=10 * MiB, other_bytes=40 * MiB, kv_bytes_per_token=1024)
    assert shape.layer_cost(10240) == 20 * MiB
    plan = plan_layers(shape, 10240, local(240), [peer("b", 1000)], "auto")  # 200 MiB room -> 10 layers
    assert plan.placements[0].layers == 10


def test_refusals_say_what_is_missing() -> None:
    with pytest.raises(NoPlan, match="no connected peer"):
        plan_layers(SHAPE, 0, local(100), [], "auto")
    with pytest.raises(NoPlan, match="more than this node"):
        plan_layers(SHAPE, 0, local(100), [peer("b", 100)], "auto")
    with pytest.raises(NoPlan, match="embeddings"):
        plan_layers(SHAPE, 0, local(10), [peer("b", 1000)], "auto")
    plan = plan_layers(SHAPE, 0, local(1000), [peer("tiny", 5), peer("b", 1000)], "always")
    assert any("tiny: cannot take a layer" in r for r in plan.reasons)


def test_shape_of_the_real_gguf(model_path) -> None:
    shape = model_shape(model_path)
    assert shape.n_layer == 30
    assert 0 < shape.layer_bytes * shape.n_layer < model_path.stat().st_size
    assert shape.other_bytes > shape.layer_bytes  # SmolLM2's tied embedding table is its largest tensor
    assert shape.output_bytes >= shape.other_bytes  # tied: the head is a copy of that table
    assert shape.kv_bytes_per_token == 2 * 2 * 192  # 3 KV heads x 64 dims, K and V, f16

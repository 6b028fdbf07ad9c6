"""The per-node prefix cache: LRU by bytes, longest common prefix, and the llama engine using it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meshd.kvcache import CacheIdentity, bundle_from_state, prefix_sha256, state_from_bundle
from meshd.kvcache.bundle import truncate
from meshd.kvcache.engine_hook import LlamaPrefixHook
from meshd.kvcache.prefix import PrefixCache
from test_kvcache_bundle import base_descriptor, make_state  # tests/ is on sys.path (rootdir conftest)

PER_TOKEN = 3 * 2 * 2 * 64 * 2  # bytes per token of the synthetic caches: layers x K,V x heads x dim x f16


def bundle(tokens: list[int], seed: int = 0, sha: str = "ab" * 32):
    import dataclasses

    base = dataclasses.replace(base_descriptor(len(tokens)), token_ids=tuple(tokens),
                               prefix_sha256=prefix_sha256(tokens), model_sha256=sha)
    return bundle_from_state(make_state(len(tokens), True, seed), base)


def test_truncate_keeps_exactly_the_prefix() -> None:
    full = bundle(list(range(100, 140)))
    short = truncate(full, 25)
    assert short.descriptor.token_ids == tuple(range(100, 125))
    assert short.descriptor.wire_bytes == 25 * PER_TOKEN
    for before, after in zip(state_from_bundle(full).layers, state_from_bundle(short).layers):
        k_full = np.frombuffer(before.k, np.float16).reshape(40, -1)
        v_full = np.frombuffer(before.v, np.float16).reshape(-1, 40)
        assert np.array_equal(np.frombuffer(after.k, np.float16).reshape(25, -1), k_full[:25])
        assert np.array_equal(np.frombuffer(after.v, np.float16).reshape(-1, 25), v_full[:, :25])


def test_lookup_finds_the_longest_common_prefix_and_truncates() -> None:
    cache = PrefixCache(1 << 30, min_tokens=4)
    cache.put(bundle(list(range(50))))
    cache.put(bundle([7] * 30))
    prompt = list(range(20)) + [999, 1000]
    hit = cache.lookup("ab" * 32, prompt)
    assert hit is not None and hit.shared_tokens == 20 and hit.entry_tokens == 50
    assert hit.bundle.descriptor.token_ids == tuple(range(20))
    assert cache.lookup("ab" * 32, list(range(3)) + [5]) is None  # 3 shared < min_tokens
    assert cache.lookup("cd" * 32, prompt) is None  # other weights never match
    capped = cache.lookup("ab" * 32, list(range(50)), max_tokens=49)
    assert capped is not None and capped.shared_tokens == 49
    assert (cache.stats.hits, cache.stats.misses) == (2, 2)


def test_lru_eviction_by_bytes() -> None:
    cache = PrefixCache(100 * PER_TOKEN, min_tokens=4)
    a, b, c = bundle([1] * 40), bundle([2] * 40), bundle([3] * 40)
    assert cache.put(a) and cache.put(b)
    assert cache.lookup("ab" * 32, [1] * 41) is not None  # a is now most recent
    assert cache.put(c)  # 120 tokens > 100: evicts b, the least recently used
    held = {x.token_count for x in cache.announcements()}
    assert len(cache) == 2 and cache.nbytes == 80 * PER_TOKEN and held == {40}
    assert cache.lookup("ab" * 32, [2] * 41) is None and cache.stats.evicted == 1
    assert not cache.put(bundle([4] * 101))  # larger than the whole budget
    assert cache.stats.refused == 1


def test_a_longer_turn_supersedes_its_own_prefix() -> None:
    cache = PrefixCache(1 << 30, min_tokens=4)
    cache.put(bundle(list(range(30))))
    cache.put(bundle(list(range(45))))
    assert len(cache) == 1 and cache.stats.superseded == 1
    announced = cache.announcements()[0]
    assert announced.token_count == 45 and announced.prefix_sha256 == prefix_sha256(range(45))
    assert announced.to_dict()["nbytes"] == 45 * PER_TOKEN
    assert cache.get("ab" * 32, announced.prefix_sha256) is not None
    assert [b.descriptor.n_tokens for b in cache.pop_all()] == [45] and len(cache) == 0


def test_announcements_are_most_recent_first_and_thread_safe() -> None:
    cache = PrefixCache(1 << 30, min_tokens=4)
    bundles = [bundle([i] * 10, seed=i) for i in range(8)]

    def worker(items: list) -> None:
        for item in items:
            cache.put(item)
            cache.announcements()

    threads = [threading.Thread(target=worker, args=(bundles[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 8 and cache.nbytes == 80 * PER_TOKEN
    cache.lookup("ab" * 32, [3] * 11)
    assert cache.announcements()[0].prefix_sha256 == prefix_sha256([3] * 10)


# --- the llama engine with a prefix cache ------------------------------------------------------


def _request(text: str, max_tokens: int = 24) -> Any:
    from meshd.backends.base import GenerationRequest, SamplingParams

    return GenerationRequest(model="m", params=SamplingParams(max_tokens=max_tokens, temperature=0.0, top_k=1, seed=1),
                             prompt=text)


def _run(engine: Any, text: str) -> tuple[list[int], Any]:
    out: list[int] = []
    finished = engine.generate(_request(text), lambda delta: out.extend(delta.token_ids), threading.Event())
    return out, finished


@pytest.fixture(scope="module")
def engines(model_path: Path):
    from meshd.backends.llama_engine import LlamaEngine

    identity = CacheIdentity.for_file("smollm2", model_path)
    events: list[Any] = []
    hook = LlamaPrefixHook(PrefixCache(256 << 20), lambda: identity, on_event=events.append)
    cached, plain = LlamaEngine(model_path, 2048, kv_hook=hook), LlamaEngine(model_path, 2048)
    cached.load()
    plain.load()
    yield cached, plain, hook, events
    cached.close()
    plain.close()


def test_engine_reuses_the_previous_turn(engines) -> None:
    cached, plain, hook, events = engines
    first = (Path(__file__).parent.parent / "docs" / "native.md").read_text()[:2500]
    tokens_1, _ = _run(cached, first)
    assert hook.last_restored == 0 and len(hook.cache) == 1
    announced = hook.announcements()[0]
    assert announced.model_sha256 == hook.identity().sha256
    second = first + " Summary of the above in one sentence:"
    llama = cached._llama
    sizes: list[int] = []
    original = llama.eval
    llama.eval = lambda toks: (sizes.append(len(toks)), original(toks))[1]
    try:
        tokens_2, finished = _run(cached, second)
    finally:
        del llama.eval
    prompt_2 = cached.prompt_tokens(_request(second))[0]
    assert hook.last_restored >= announced.token_count - 40  # the first prompt, less any re-tokenized tail
    assert sizes[0] == len(prompt_2) - hook.last_restored < 60  # only the new suffix was prefilled
    assert finished.prompt_tokens == len(prompt_2)
    reference, _ = _run(plain, second)
    assert tokens_2 == reference  # non-flash CPU attention: suffix-only prefill gives the same greedy text
    assert hook.cache.stats.superseded >= 1 or len(hook.cache) == 2
    assert [type(e).__name__ for e in events] == ["PrefixStored", "PrefixRestored", "PrefixStored"]
    assert events[1].tokens == hook.last_restored and events[1].prompt_tokens == len(prompt_2)


def test_engine_serves_by_full_prefill_when_the_cached_prefix_is_rejected(engines) -> None:
    import dataclasses

    from meshd.kvcache import KVBundle

    cached, plain, hook, events = engines
    text = "A rejected cache must never change the answer. " * 8
    prompt = cached.prompt_tokens(_request(text))[0]
    llama = cached._llama
    llama.reset()
    llama.eval(prompt)
    from meshd.kvcache import export_sequence

    good = export_sequence(llama, hook.identity())
    # The right weights, but a state from another llama.cpp build: found, refused, not loaded.
    foreign = KVBundle(dataclasses.replace(good.descriptor, state_preamble=b"\x01" * 8), good.tensors)
    hook.cache.put(foreign)
    before = len(events)
    tokens, finished = _run(cached, text + " Again:")
    assert hook.last_restored == 0
    assert [type(e).__name__ for e in events[before:]][:1] == ["CacheRejected"]
    assert events[before].code == "cache_descriptor_mismatch"
    assert tokens == _run(plain, text + " Again:")[0]

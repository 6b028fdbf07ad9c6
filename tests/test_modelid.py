"""Model identity descriptors: GGUF facts, the hash cache, the wire form, sameness."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.modelid import (
    CACHE_FILE_NAME,
    DescriptorError,
    FileFactsCache,
    ModelDescriptor,
    describe_gguf,
    describe_gguf_async,
    describe_upstream,
)

gguf = pytest.importorskip("gguf")


def write_gguf(path: Path, *, tokens: list[str], seed: int = 0, file_type: int | None = None,
               chat_template: str | None = None, dtype: type = np.float16) -> Path:
    """A tiny but well-formed llama GGUF: metadata, a tokenizer and two tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("Tiny Test")
    writer.add_basename("tiny")
    writer.add_size_label("1K")
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(0)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    rng = np.random.default_rng(seed)
    writer.add_tensor("token_embd.weight", rng.standard_normal((len(tokens), 8)).astype(dtype))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


TOKENS = ["<s>", "a", "b", "ab", "c", "hello"]


# --- the bundled model, checked against its own metadata ------------------------------


@pytest.fixture(scope="module")
def bundled_facts(model_path: Path) -> dict:
    """Read independently of meshd.modelid, straight from gguf."""
    reader = gguf.GGUFReader(str(model_path))

    def value(key: str):
        return reader.fields[key].contents()

    return {
        "architecture": value("general.architecture"),
        "basename": value("general.basename"),
        "context_length": value("llama.context_length"),
        "embedding_length": value("llama.embedding_length"),
        "size_label": value("general.size_label"),
        "file_type": value("general.file_type"),
        "tensor_elements": [int(t.n_elements) for t in reader.tensors],
    }


async def test_bundled_descriptor_matches_gguf_metadata(model_path: Path, bundled_facts: dict, tmp_path: Path) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    descriptor = await describe_gguf_async(model_path, model_id="smol", aliases=("smollm2",),
                                           cache=FileFactsCache.in_state_dir(tmp_path))
    elapsed = time.perf_counter() - started
    task.cancel()
    # The event loop kept running while the file was read and hashed.
    assert ticks >= 0.3 * elapsed / 0.01

    assert descriptor.id == "smol" and descriptor.aliases == ("smollm2",)
    assert descriptor.format == "gguf" and descriptor.backend == "llama.cpp"
    assert descriptor.architecture == bundled_facts["architecture"] == "llama"
    assert descriptor.family == bundled_facts["basename"]
    assert descriptor.context_length == bundled_facts["context_length"]
    assert descriptor.embedding_length == bundled_facts["embedding_length"]
    assert descriptor.size_label == bundled_facts["size_label"]
    assert descriptor.parameter_count == sum(bundled_facts["tensor_elements"])
    # The model calls itself "135M"; the count from shapes agrees to within rounding.
    assert abs(descriptor.parameter_count - 135e6) / 135e6 < 0.02
    assert bundled_facts["file_type"] == gguf.LlamaFileType.MOSTLY_Q4_1
    assert descriptor.quantization == "Q4_1" and "Q4_1" in model_path.name
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert descriptor.file_sha256 == digest and descriptor.file_size == model_path.stat().st_size
    assert descriptor.tokenizer_hash is not None and descriptor.tokenizer_hash.startswith("gguf-tok-v1:")


# --- the cache -----------------------------------------------------------------------


def test_cache_hit_avoids_rehashing(tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "m.gguf", tokens=TOKENS)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    first_cache = FileFactsCache.in_state_dir(state)
    first = describe_gguf(model, model_id="m", cache=first_cache)
    assert first_cache.hashes_computed == 1
    assert first.file_sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    cache_file = state / CACHE_FILE_NAME
    assert oct(cache_file.stat().st_mode & 0o777) == "0o600"

    # A new process (a new cache object) trusts the file on disk for the same size and mtime ...
    second_cache = FileFactsCache.in_state_dir(state)
    assert describe_gguf(model, model_id="m", cache=second_cache) == first
    assert second_cache.hashes_computed == 0

    # ... to the point of believing a planted value: proof that nothing was re-read.
    data = json.loads(cache_file.read_text())
    (entry,) = data["files"].values()
    entry["sha256"] = "0" * 64
    entry["gguf"]["architecture"] = "planted"
    cache_file.write_text(json.dumps(data))
    planted = describe_gguf(model, model_id="m", cache=FileFactsCache.in_state_dir(state))
    assert planted.file_sha256 == "0" * 64 and planted.architecture == "planted"


def test_changed_mtime_or_size_rehashes(tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "m.gguf", tokens=TOKENS)
    cache = FileFactsCache(tmp_path / "cache.json")
    before = describe_gguf(model, model_id="m", cache=cache)
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = describe_gguf(model, model_id="m", cache=cache)
    assert cache.hashes_computed == 2 and again == before  # same bytes, hashed anew
    write_gguf(model, tokens=TOKENS, seed=1)  # new weights, same size
    changed = describe_gguf(model, model_id="m", cache=FileFactsCache(tmp_path / "cache.json"))
    assert changed.file_sha256 == hashlib.sha256(model.read_bytes()).hexdigest() != before.file_sha256


def test_unreadable_cache_starts_afresh(tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "m.gguf", tokens=TOKENS)
    (tmp_path / "cache.json").write_text("{not json")
    cache = FileFactsCache(tmp_path / "cache.json")
    assert describe_gguf(model, model_id="m", cache=cache).file_sha256 is not None
    assert cache.hashes_computed == 1
    assert json.loads((tmp_path / "cache.json").read_text())["version"] == 1


# --- what the hashes and facts track --------------------------------------------------


def test_tokenizer_hash_tracks_the_tokenizer_only(tmp_path: Path) -> None:
    base = describe_gguf(write_gguf(tmp_path / "a.gguf", tokens=TOKENS, seed=0), model_id="a")
    reweighted = describe_gguf(write_gguf(tmp_path / "b.gguf", tokens=TOKENS, seed=1), model_id="b")
    templated = describe_gguf(write_gguf(tmp_path / "c.gguf", tokens=TOKENS, chat_template="{{ x }}"), model_id="c")
    retokened = describe_gguf(write_gguf(tmp_path / "d.gguf", tokens=[*TOKENS[:-1], "world"]), model_id="d")
    assert base.tokenizer_hash == reweighted.tokenizer_hash == templated.tokenizer_hash
    assert retokened.tokenizer_hash != base.tokenizer_hash
    assert base.file_sha256 != reweighted.file_sha256
    assert not base.same_model(reweighted)
    assert base.same_model(describe_gguf(tmp_path / "a.gguf", model_id="other-name"))


def test_quantization_from_file_type_or_dominant_tensor_type(tmp_path: Path) -> None:
    untyped = describe_gguf(write_gguf(tmp_path / "f16.gguf", tokens=TOKENS), model_id="x")
    assert untyped.quantization == "F16"  # 48 F16 elements outweigh 8 F32 ones
    typed = describe_gguf(write_gguf(tmp_path / "typed.gguf", tokens=TOKENS, file_type=int(gguf.LlamaFileType.MOSTLY_Q8_0)),
                          model_id="x")
    assert typed.quantization == "Q8_0"
    assert untyped.parameter_count == len(TOKENS) * 8 + 8
    assert (untyped.architecture, untyped.family, untyped.context_length) == ("llama", "tiny", 128)


# --- the wire form -------------------------------------------------------------------


_names = st.text(min_size=1, max_size=20)
_maybe_text = st.none() | st.text(max_size=30)
_maybe_int = st.none() | st.integers(0, 2**53)
descriptors = st.builds(
    ModelDescriptor, id=_names, aliases=st.lists(_names, max_size=3).map(tuple), backend=_maybe_text,
    format=_maybe_text, name=_maybe_text, family=_maybe_text, architecture=_maybe_text,
    parameter_count=_maybe_int, size_label=_maybe_text, quantization=_maybe_text, context_length=_maybe_int,
    embedding_length=_maybe_int, tokenizer_hash=_maybe_text, file_sha256=st.none() | st.text("0123456789abcdef", min_size=64, max_size=64),
    file_size=_maybe_int, upstream_model=_maybe_text,
)


@given(descriptors)
@settings(max_examples=200, deadline=None)
def test_descriptor_survives_msgpack(descriptor: ModelDescriptor) -> None:
    wire = msgpack.packb(descriptor.to_dict())
    assert ModelDescriptor.from_dict(msgpack.unpackb(wire)) == descriptor


def test_from_dict_checks_shapes_and_ignores_unknown_keys() -> None:
    assert ModelDescriptor.from_dict({"id": "m", "from_the_future": [1, 2]}) == ModelDescriptor(id="m")
    for bad in ({}, {"id": ""}, {"id": "m", "parameter_count": -1}, {"id": "m", "parameter_count": "7B"},
                {"id": "m", "parameter_count": True}, {"id": "m", "aliases": "x"}, {"id": "m", "family": 3}):
        with pytest.raises(DescriptorError):
            ModelDescriptor.from_dict(bad)
    with pytest.raises(DescriptorError):
        ModelDescriptor.from_dict(["id", "m"])  # type: ignore[arg-type]


@given(descriptors, descriptors)
@settings(max_examples=200, deadline=None)
def test_same_model_rules(a: ModelDescriptor, b: ModelDescriptor) -> None:
    result = a.same_model(b)
    assert result == b.same_model(a)  # symmetric
    if a.file_sha256 and b.file_sha256:
        assert result == (a.file_sha256 == b.file_sha256)
    elif result:
        # Without both hashes, only a full match of known identity fields counts.
        for key in ("architecture", "parameter_count", "quantization", "tokenizer_hash"):
            assert getattr(a, key) is not None and getattr(a, key) == getattr(b, key)
    assert a.same_model(a) == (a.file_sha256 is not None or None not in (
        a.architecture, a.parameter_count, a.quantization, a.tokenizer_hash))


# --- upstream listings ---------------------------------------------------------------


def test_describe_upstream_uses_only_what_the_server_says() -> None:
    bare = describe_upstream({"id": "smol", "object": "model", "owned_by": "me"}, model_id="s", upstream_model="smol")
    assert (bare.parameter_count, bare.context_length, bare.quantization, bare.family) == (None, None, None, None)
    vllm = describe_upstream({"id": "Qwen/Qwen2.5-7B", "max_model_len": 32768, "root": "Qwen/Qwen2.5-7B"},
                             model_id="q", upstream_model="Qwen/Qwen2.5-7B", backend="vllm")
    assert vllm.context_length == 32768 and vllm.parameter_count is None
    llama_server = describe_upstream(
        {"id": "m.gguf", "meta": {"n_params": 134515008, "n_ctx_train": 8192, "n_embd": 576, "size": 98362432}},
        model_id="m", upstream_model="m.gguf")
    assert (llama_server.parameter_count, llama_server.context_length, llama_server.embedding_length) == (
        134515008, 8192, 576)
    ollama = describe_upstream({"id": "llama3.1:8b"}, model_id="l", upstream_model="llama3.1:8b", ollama={
        "name": "llama3.1:8b", "digest": "abc", "details": {"format": "gguf", "family": "llama",
                                                            "parameter_size": "8.0B", "quantization_level": "Q4_K_M"}})
    assert (ollama.family, ollama.size_label, ollama.quantization, ollama.format) == ("llama", "8.0B", "Q4_K_M", "gguf")
    assert ollama.parameter_count is None and ollama.file_sha256 is None  # "8.0B" is rounded; digest is not a file hash

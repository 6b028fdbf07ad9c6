"""KV-cache export/import between two real llama.cpp contexts (the bundled SmolLM2)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshd.kvcache import (
    BundleAssembler,
    CacheChecksumMismatch,
    CacheDescriptorMismatch,
    CacheIdentity,
    CacheModelMismatch,
    KVBundle,
    export_sequence,
    import_sequence,
    pack,
    prefix_sha256,
)

log = logging.getLogger(__name__)

N_CTX = 2048
CONTINUATION = 32


@pytest.fixture(scope="module")
def llama_cpp(model_path: Path) -> Any:
    import llama_cpp

    return llama_cpp


@pytest.fixture(scope="module")
def identity(model_path: Path) -> CacheIdentity:
    return CacheIdentity.for_file("smollm2", model_path)


def new_llama(llama_cpp: Any, model_path: Path, **kwargs: Any) -> Any:
    return llama_cpp.Llama(str(model_path), n_ctx=N_CTX, verbose=False, **kwargs)


def greedy(llama: Any, prompt: list[int], count: int = CONTINUATION) -> list[int]:
    out: list[int] = []
    tokens = llama.generate(prompt, temp=0.0, top_k=1)
    try:
        for token in tokens:
            out.append(token)
            if len(out) >= count:
                break
    finally:
        tokens.close()
    return out


def count_evals(llama: Any) -> list[int]:
    """Record the size of every decode the instance runs."""
    sizes: list[int] = []
    original = llama.eval

    def eval_(tokens: Any) -> None:
        sizes.append(len(tokens))
        original(tokens)

    llama.eval = eval_
    return sizes


@pytest.fixture(scope="module")
def source(llama_cpp: Any, model_path: Path, identity: CacheIdentity) -> Iterator[dict[str, Any]]:
    """Node A: a long prompt (over one 512-token batch) prefilled, its caches, its own continuation."""
    a = new_llama(llama_cpp, model_path)
    text = (Path(__file__).parent.parent / "docs" / "native.md").read_text()
    prompt = a.tokenize(text.encode())[:600]
    a.eval(prompt)
    raw = export_sequence(a, identity)
    q8 = export_sequence(a, identity, wire="q8_0")
    a.reset()
    reference = greedy(a, prompt)  # what A alone produces: a fresh batched prefill, then greedy
    yield {"llama": a, "prompt": prompt, "raw": raw, "q8": q8, "reference": reference}
    a.close()


def ship(bundle: KVBundle, chunk: int = 1 << 20) -> KVBundle:
    """Through the wire format: envelopes as bytes, reassembled and verified."""
    assembler = BundleAssembler()
    result = None
    for envelope in pack(bundle, transfer_id=42, chunk_size=chunk):
        result = assembler.add(envelope.to_bytes()) or result
    assert result is not None
    return result


def test_descriptor_describes_the_cache(source: dict[str, Any], identity: CacheIdentity) -> None:
    d = source["raw"].descriptor
    assert d.token_ids == tuple(source["prompt"]) and d.prefix_sha256 == prefix_sha256(source["prompt"])
    assert d.model_sha256 == identity.sha256 and len(d.model_sha256) == 64
    assert (d.n_layer, d.n_head_kv, d.head_dim_k, d.head_dim_v) == (30, 3, 64, 64)
    assert (d.k_dtype, d.v_dtype, d.v_trans, d.wire) == ("f16", "f16", True, "raw")
    assert d.wire_bytes == 600 * 30 * 2 * 3 * 64 * 2  # tokens x layers x (K,V) x heads x dim x f16
    assert source["q8"].descriptor.wire_bytes == d.wire_bytes * 34 // 64


def test_imported_cache_continues_identically_without_reprefill(
    source: dict[str, Any], llama_cpp: Any, model_path: Path, identity: CacheIdentity
) -> None:
    b = new_llama(llama_cpp, model_path)
    try:
        loaded = import_sequence(b, ship(source["raw"], chunk=1 << 18), identity)
        assert loaded == len(source["prompt"]) and b.n_tokens == loaded
        # Bit-exact: B's cache re-exported has the same descriptor, per-tensor CRC32C included.
        assert export_sequence(b, identity).descriptor == source["raw"].descriptor
        evals = count_evals(b)
        continuation = greedy(b, source["prompt"])
        assert continuation == source["reference"]
        # Only the last prompt token is decoded again (for its logits, which no
        # llama.cpp state carries); then one decode per generated token.
        assert evals[0] == 1 and sum(evals) == CONTINUATION
    finally:
        b.close()


def test_q8_0_wire_import_and_greedy_agreement(
    source: dict[str, Any], llama_cpp: Any, model_path: Path, identity: CacheIdentity
) -> None:
    b = new_llama(llama_cpp, model_path)
    try:
        import_sequence(b, ship(source["q8"]), identity)
        evals = count_evals(b)
        continuation = greedy(b, source["prompt"])
        agree = next((i for i, (x, y) in enumerate(zip(continuation, source["reference"])) if x != y), CONTINUATION)
        log.info("q8_0 wire: greedy agrees for %d of %d tokens", agree, CONTINUATION)
        assert evals[0] == 1
        # Lossy on purpose; measured on SmolLM2-135M (docs/kvcache.md). The first
        # token must survive 8-bit K/V or the option is useless.
        assert agree >= 1
    finally:
        b.close()


def test_corrupted_envelope_is_rejected_and_nothing_loaded(
    source: dict[str, Any], llama_cpp: Any, model_path: Path, identity: CacheIdentity
) -> None:
    b = new_llama(llama_cpp, model_path)
    try:
        own = b.tokenize(b"An unrelated conversation that B already holds.")
        b.eval(own)
        envelopes = [bytearray(e.to_bytes()) for e in pack(source["raw"], transfer_id=7)]
        envelopes[len(envelopes) // 2][-100] ^= 0x10
        assembler = BundleAssembler()
        with pytest.raises(CacheChecksumMismatch):
            for envelope in envelopes:
                assembler.add(bytes(envelope))
        assert b.n_tokens == len(own)
        assert export_sequence(b, identity).descriptor.token_ids == tuple(own)
    finally:
        b.close()


def test_wrong_model_identity_is_rejected_before_loading(
    source: dict[str, Any], llama_cpp: Any, model_path: Path, identity: CacheIdentity
) -> None:
    b = new_llama(llama_cpp, model_path)
    try:
        own = b.tokenize(b"B's own context.")
        b.eval(own)
        other = CacheIdentity("smollm2", "0" * 64)
        with pytest.raises(CacheModelMismatch):
            import_sequence(b, source["raw"], other)
        assert export_sequence(b, identity).descriptor.token_ids == tuple(own)
        # Another llama.cpp build's state (its preamble differs): refused, B untouched too.
        raw = source["raw"]
        foreign = KVBundle(dataclasses.replace(raw.descriptor, state_preamble=b"\x00" * 8), raw.tensors)
        with pytest.raises(CacheDescriptorMismatch, match="preamble"):
            import_sequence(b, foreign, identity)
        assert b.n_tokens == len(own)
        assert export_sequence(b, identity).descriptor.token_ids == tuple(own)
    finally:
        b.close()


@pytest.mark.parametrize("kwargs", [{"flash_attn": True}, {"type_k": 0}], ids=["v-not-transposed", "f32-keys"])
def test_receiver_with_another_cache_layout_is_rejected(
    source: dict[str, Any], llama_cpp: Any, model_path: Path, identity: CacheIdentity, kwargs: dict
) -> None:
    b = new_llama(llama_cpp, model_path, **kwargs)
    try:
        with pytest.raises(CacheDescriptorMismatch):
            import_sequence(b, source["raw"], identity)
        assert b.n_tokens == 0
    finally:
        b.close()


def test_a_flash_attention_cache_moves_between_flash_attention_contexts(
    llama_cpp: Any, model_path: Path, identity: CacheIdentity
) -> None:
    """With flash attention V is row-major (v_trans=False); the transfer is still exact.

    llama.cpp's CPU flash attention is not batch-invariant: decoding the last
    prompt token alone gives other bits than decoding it inside the prompt
    batch, so on this model the continuation can differ from a full batched
    prefill (it does at token 2 for this prompt). The reference is therefore
    the same evaluation pattern on A: all but the last token batched, then the
    last one alone, which the imported cache must reproduce exactly.
    """
    a = new_llama(llama_cpp, model_path, flash_attn=True)
    b = new_llama(llama_cpp, model_path, flash_attn=True)
    try:
        prompt = a.tokenize(b"Once upon a time, in a small village by the sea, " * 6)
        a.eval(prompt)
        bundle = export_sequence(a, identity, wire="raw")
        assert bundle.descriptor.v_trans is False
        assert bundle.descriptor.tensors[-1].shape == (len(prompt), 3, 64)
        a.reset()
        a.eval(prompt[:-1])
        reference = greedy(a, prompt, 8)
        import_sequence(b, ship(bundle), identity)
        assert export_sequence(b, identity).descriptor == bundle.descriptor  # bit-exact K/V
        assert greedy(b, prompt, 8) == reference
    finally:
        a.close()
        b.close()

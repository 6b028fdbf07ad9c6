"""The MLX backend, for real, on MLX's Linux CPU build (``pip install 'mlx[cpu]' mlx-lm``).

The model is made here: a byte-level BPE tokenizer trained on three sentences
and a two-layer llama with random weights (scaled up so greedy decoding
wanders instead of repeating one token). Its text is gibberish, but every
token is checked against mlx-lm's own generation loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core", reason="MLX is not installed (pip install 'mlx[cpu]' mlx-lm)")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")

from meshd.backends.base import (  # noqa: E402 - after the skip checks on purpose
    ChatMessage,
    EmbeddingRequest,
    GenerationFinished,
    GenerationRequest,
    SamplingParams,
    TextGenerated,
)
from meshd.backends.mlx import MlxBackend, MlxConfig, is_apple_silicon, mlx_availability  # noqa: E402
from meshd.errors import (  # noqa: E402
    BackendUnavailable,
    ContextLengthExceeded,
    ModelNotFound,
    QueueFull,
    UnsupportedParameter,
)
from meshd.modelid import describe_hf_dir  # noqa: E402


def make_tiny_model(out: Path) -> None:
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models import llama
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny model",
              "numbers 1 2 3 4 5 6 7 8 9 10"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(out)
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
              "vocab_size": tokenizer.get_vocab_size(), "max_position_embeddings": 256,
              "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1}
    (out / "config.json").write_text(json.dumps(config))
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    params = tree_map(lambda p: p * 3 if p.ndim == 2 else p, model.parameters())
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(params)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mlx") / "tiny-llama"
    make_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    from mlx_lm import load

    return load(str(model_dir))


@pytest.fixture
async def backend(model_dir: Path) -> AsyncIterator[MlxBackend]:
    b = MlxBackend(MlxConfig(model=str(model_dir), allow_cpu=True))
    await b.start()
    yield b
    await b.close()


def reference_tokens(reference, prompt_tokens: list[int], max_tokens: int) -> list[int]:
    """mlx-lm's own greedy loop, stopping at EOS like any server would."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = reference
    out = []
    for token, _ in generate_step(mx.array(prompt_tokens), model, max_tokens=max_tokens,
                                  sampler=make_sampler(temp=0.0)):
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
    return out


async def run(stream) -> tuple[list[TextGenerated], GenerationFinished]:
    deltas = []
    async for event in stream:
        if isinstance(event, TextGenerated):
            deltas.append(event)
        else:
            return deltas, event
    raise AssertionError("no GenerationFinished")


GREEDY = SamplingParams(max_tokens=30, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)


def test_unavailable_off_apple_silicon_without_allow_cpu(model_dir: Path) -> None:
    if is_apple_silicon():
        pytest.skip("this is Apple Silicon: MLX is available without allow_cpu")
    with pytest.raises(BackendUnavailable, match="Apple Silicon.*allow_cpu") as info:
        MlxBackend(MlxConfig(model=str(model_dir)))
    assert info.value.code == "mlx_unavailable"
    usable, why = mlx_availability(allow_cpu=True)
    assert usable and "CPU" in why


async def test_construction_does_not_run_mlx_on_the_event_loop(model_dir: Path, monkeypatch) -> None:
    import threading

    from meshd.backends import mlx as mlx_module

    real = mlx_module.mlx_cpu_problem
    threads: list[str] = []

    def spy() -> str | None:
        threads.append(threading.current_thread().name)
        return real()

    monkeypatch.setattr(mlx_module, "mlx_cpu_problem", spy)
    b = MlxBackend(MlxConfig(model=str(model_dir), allow_cpu=True))
    assert threads == []  # the constructor only looked at the platform and the packages
    await b.start()
    try:
        assert b.models()[0].state == "ready"
        assert threads and threads[0] != threading.main_thread().name
    finally:
        await b.close()


async def test_protocol_capabilities_health_descriptors_and_rate(backend: MlxBackend, model_dir: Path) -> None:
    from meshd.backends.base import Backend

    assert isinstance(backend, Backend)
    caps = backend.capabilities()
    assert caps.resume and caps.embeddings and not caps.json_object
    assert backend.health().status == "ok"
    assert backend.load().tokens_per_s == 0
    request = GenerationRequest(model="tiny-llama", params=GREEDY, prompt="the quick")
    deltas, finished = await run(backend.generate(request))
    assert backend.load().tokens_per_s == pytest.approx(finished.completion_tokens / 60.0)
    (descriptor,) = await backend.descriptors()
    assert descriptor == describe_hf_dir(model_dir, model_id="tiny-llama")


async def test_greedy_tokens_match_mlx_lm(backend: MlxBackend, reference) -> None:
    _, tokenizer = reference
    request = GenerationRequest(model="tiny-llama", params=GREEDY, prompt="the quick")
    deltas, finished = await run(backend.generate(request))
    prompt = list(tokenizer.encode("the quick"))
    expected = reference_tokens(reference, prompt, 30)
    got = [t for d in deltas for t in d.token_ids]
    assert got == expected
    assert finished.prompt_tokens == len(prompt) and finished.completion_tokens == len(expected)
    assert finished.finish_reason == ("length" if len(expected) == 30 else "stop")
    assert "".join(d.text for d in deltas) == tokenizer.decode(expected)
    assert backend.load().in_flight == 0


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_tokens=30, temperature=1.0, seed=5)],
                         ids=["greedy", "seeded"])
async def test_resume_continues_exactly(backend: MlxBackend, reference, params: SamplingParams) -> None:
    _, tokenizer = reference
    whole, finished = await run(backend.generate(GenerationRequest(model="tiny-llama", params=params,
                                                                   prompt="the quick")))
    tokens = [t for d in whole for t in d.token_ids]
    assert len(tokens) > 8
    head = tokens[:6]
    resumed = GenerationRequest(model="tiny-llama", params=params, prompt="the quick",
                                resume_token_ids=tuple(head), resume_text=tokenizer.decode(head))
    rest, again = await run(backend.generate(resumed))
    assert [t for d in rest for t in d.token_ids] == tokens[6:]
    assert again.completion_tokens == finished.completion_tokens
    assert tokenizer.decode(head) + "".join(d.text for d in rest) == "".join(d.text for d in whole)


async def test_chat_goes_through_the_template(backend: MlxBackend, reference) -> None:
    _, tokenizer = reference
    messages = (ChatMessage("user", "hello world"),)
    request = GenerationRequest(model="tiny-llama", params=GREEDY, messages=messages)
    deltas, finished = await run(backend.generate(request))
    prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}],
                                                add_generation_prompt=True))
    assert finished.prompt_tokens == len(prompt)
    assert [t for d in deltas for t in d.token_ids] == reference_tokens(reference, prompt, 30)


async def test_stop_sequence_cuts_the_text(backend: MlxBackend, reference) -> None:
    _, tokenizer = reference
    full = tokenizer.decode(reference_tokens(reference, list(tokenizer.encode("the quick")), 30))
    # Any two printable ASCII characters from the middle of the output make a stop sequence.
    start = next(i for i in range(3, len(full) - 1) if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    stop = full[start:start + 2]
    params = SamplingParams(max_tokens=30, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, stop=(stop,))
    deltas, finished = await run(backend.generate(GenerationRequest(model="tiny-llama", params=params,
                                                                    prompt="the quick")))
    assert "".join(d.text for d in deltas) == full[:full.index(stop)]
    assert finished.finish_reason == "stop"


async def test_closing_the_stream_cancels(backend: MlxBackend) -> None:
    long = GenerationRequest(model="tiny-llama", prompt="the quick",
                             params=SamplingParams(max_tokens=200, temperature=1.0, seed=1))
    stream = backend.generate(long)
    await anext(stream)
    await stream.aclose()
    assert (backend.load().in_flight, backend.load().queued) == (0, 0)
    short = GenerationRequest(model="tiny-llama", prompt="hello", params=GREEDY)
    deltas, finished = await run(backend.generate(short))
    assert finished.finish_reason in ("stop", "length")
    # The engine itself stops within a token of the flag being set.
    flag = threading.Event()
    greedy_long = GenerationRequest(model="tiny-llama", prompt="the quick",
                                    params=SamplingParams(max_tokens=200, temperature=0.0, top_k=0, min_p=0.0))
    result = await asyncio.get_running_loop().run_in_executor(
        backend._executor, backend.engine.generate, greedy_long, lambda event: flag.set(), flag)
    assert result.finish_reason == "cancelled" and result.completion_tokens <= 2


async def test_admission_and_errors(backend: MlxBackend) -> None:
    with pytest.raises(ModelNotFound):
        backend.generate(GenerationRequest(model="nope", params=GREEDY, prompt="x"))
    json_mode = SamplingParams(response_format={"type": "json_object"})
    with pytest.raises(UnsupportedParameter):
        backend.generate(GenerationRequest(model="tiny-llama", params=json_mode, prompt="x"))
    too_long = GenerationRequest(model="tiny-llama", params=GREEDY, prompt="the quick brown fox " * 100)
    with pytest.raises(ContextLengthExceeded):
        await run(backend.generate(too_long))
    small = MlxBackend(MlxConfig(model=backend.config.model, allow_cpu=True, max_queue=0))
    await small.start()
    try:
        first = small.generate(GenerationRequest(model="tiny-llama", params=GREEDY, prompt="x"))
        with pytest.raises(QueueFull):
            small.generate(GenerationRequest(model="tiny-llama", params=GREEDY, prompt="x"))
        await first.aclose()
        assert small.load().queued == 0
    finally:
        await small.close()


async def test_embeddings_are_unit_mean_hidden_states(backend: MlxBackend, reference) -> None:
    model, tokenizer = reference
    result = await backend.embed(EmbeddingRequest(model="tiny-llama", inputs=("hello world", "the lazy dog")))
    assert len(result.vectors) == 2 and all(len(v) == 64 for v in result.vectors)
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-5) for v in result.vectors)
    assert result.vectors[0] != result.vectors[1]
    # The last hidden states, taken independently with numpy, averaged over tokens.
    import numpy as np

    tokens = list(tokenizer.encode("hello world"))
    hidden = np.array(model.model(mx.array([tokens]))[0].astype(mx.float32))
    mean = hidden.mean(axis=0)
    assert np.allclose(np.array(result.vectors[0]), mean / np.linalg.norm(mean), atol=1e-5)
    assert result.prompt_tokens == len(tokens) + len(tokenizer.encode("the lazy dog"))


def test_descriptor_of_the_model_directory(model_dir: Path, reference) -> None:
    from mlx.utils import tree_flatten

    model, _ = reference
    descriptor = describe_hf_dir(model_dir, model_id="tiny-llama")
    assert descriptor.architecture == "llama" and descriptor.format == "safetensors"
    assert descriptor.parameter_count == sum(v.size for _, v in tree_flatten(model.parameters()))
    assert descriptor.context_length == 256 and descriptor.embedding_length == 64
    assert descriptor.quantization == "F32"
    weights = (model_dir / "model.safetensors").read_bytes()
    assert descriptor.file_sha256 == hashlib.sha256(weights).hexdigest()
    tokenizer_sha = hashlib.sha256((model_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert descriptor.tokenizer_hash == f"hf-tok-v1:{tokenizer_sha}"
    assert descriptor.family is None  # config.json does not say; nothing is guessed

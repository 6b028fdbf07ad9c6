"""The OpenAI surface of one real node, driven by the official `openai` client."""

from __future__ import annotations

import base64
import json
import struct
import urllib.request

import openai
import pytest

MODEL_ALIAS = "smollm2"
HELLO = [{"role": "user", "content": "Name three colours."}]


def test_models_list_and_retrieve(openai_client, model_path):
    models = openai_client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [model_path.stem]
    by_alias = openai_client.models.retrieve(MODEL_ALIAS)
    assert by_alias.id == model_path.stem
    assert openai_client.models.retrieve(model_path.stem).id == model_path.stem


def test_unknown_model_is_404(openai_client):
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("no-such-model")


def test_chat_non_streaming(openai_client):
    reply = openai_client.chat.completions.create(
        model=MODEL_ALIAS, messages=HELLO, max_tokens=12, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12
    assert reply.usage.prompt_tokens > len(HELLO[0]["content"].split())
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streaming_with_usage_matches_non_streaming(openai_client):
    kwargs = dict(model=MODEL_ALIAS, messages=HELLO, max_tokens=24, temperature=0)
    whole = openai_client.chat.completions.create(**kwargs)
    chunks = list(openai_client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant"]  # the role is announced once
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_streaming_without_usage_has_no_usage_chunk(openai_client):
    chunks = list(openai_client.chat.completions.create(
        model=MODEL_ALIAS, messages=HELLO, max_tokens=4, temperature=0, stream=True))
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_sequences_and_max_completion_tokens(openai_client):
    base = openai_client.chat.completions.create(
        model=MODEL_ALIAS, messages=HELLO, max_completion_tokens=30, temperature=0)
    text = base.choices[0].message.content
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    cut = openai_client.chat.completions.create(
        model=MODEL_ALIAS, messages=HELLO, max_completion_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    streamed = openai_client.chat.completions.create(
        model=MODEL_ALIAS, messages=HELLO, max_completion_tokens=30, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.index(stop)]


def test_seed_makes_sampling_repeatable(openai_client):
    kwargs = dict(model=MODEL_ALIAS, messages=HELLO, max_tokens=16, temperature=1.0, top_p=1.0, seed=1234)
    first = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    second = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == second


def test_json_object_response_format(openai_client):
    reply = openai_client.chat.completions.create(
        model=MODEL_ALIAS,
        messages=[{"role": "user", "content": "Give a JSON object with a key name."}],
        response_format={"type": "json_object"}, max_tokens=48, temperature=0)
    content = reply.choices[0].message.content
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut by max_tokens: still the start of a JSON object
        assert content.lstrip().startswith("{")


def test_completions_plain_and_streaming(openai_client):
    kwargs = dict(model=MODEL_ALIAS, prompt="The capital of France is", max_tokens=8, temperature=0)
    whole = openai_client.completions.create(**kwargs)
    assert whole.object == "text_completion"
    assert whole.usage.completion_tokens <= 8
    parts = list(openai_client.completions.create(**kwargs, stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_embeddings_dimension_matches_gguf(openai_client, model_path):
    from gguf import GGUFReader

    reader = GGUFReader(str(model_path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    n_embd = int(reader.fields[f"{arch}.embedding_length"].parts[-1][0])
    single = openai_client.embeddings.create(model=MODEL_ALIAS, input="hello world")
    assert len(single.data) == 1 and len(single.data[0].embedding) == n_embd
    batch = openai_client.embeddings.create(model=MODEL_ALIAS, input=["a cat", "a dog", "quantum physics"])
    assert [d.index for d in batch.data] == [0, 1, 2]
    vectors = [d.embedding for d in batch.data]
    assert all(len(v) == n_embd for v in vectors)
    norm = sum(x * x for x in vectors[0]) ** 0.5
    assert abs(norm - 1.0) < 1e-4
    assert vectors[0] != vectors[2]
    assert batch.usage.prompt_tokens > 0


def test_embeddings_base64_equals_float(openai_client, shared_daemon):
    as_float = openai_client.embeddings.create(model=MODEL_ALIAS, input="hello", encoding_format="float")
    body = json.dumps({"model": MODEL_ALIAS, "input": "hello", "encoding_format": "base64"}).encode()
    req = urllib.request.Request(shared_daemon.base_url + "/v1/embeddings", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        raw = json.loads(resp.read())["data"][0]["embedding"]
    decoded = base64.b64decode(raw)
    floats = struct.unpack(f"<{len(decoded) // 4}f", decoded)
    assert floats == pytest.approx(as_float.data[0].embedding, abs=1e-6)


def test_response_headers_say_where_it_was_served(openai_client):
    raw = openai_client.chat.completions.with_raw_response.create(
        model=MODEL_ALIAS, messages=HELLO, max_tokens=1)
    assert raw.headers["x-meshd-route"] == "local"
    assert raw.headers["x-meshd-node"]

"""At temperature 0, meshd's text equals llama-cpp-python's own for the same request."""

from __future__ import annotations

import pytest

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
]
SETTINGS = dict(temperature=0.0, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.0, max_tokens=40)


@pytest.fixture(scope="module")
def direct(model_path):
    import llama_cpp

    llama = llama_cpp.Llama(str(model_path), n_ctx=4096, verbose=False)
    yield llama
    llama.close()


@pytest.mark.parametrize("messages", PROMPTS)
def test_chat_text_equals_direct_call(openai_client, direct, messages):
    direct.reset()  # a fresh evaluation, as meshd does for every request
    expected = direct.create_chat_completion(messages=messages, **SETTINGS)["choices"][0]["message"]["content"]
    got = openai_client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, top_p=0.95, max_tokens=40,
        extra_body={"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0},
    ).choices[0].message.content
    assert got == expected
    streamed = openai_client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, top_p=0.95, max_tokens=40, stream=True,
        extra_body={"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0},
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected


def test_completion_text_equals_direct_call(openai_client, direct):
    prompt = "Once upon a time, in a small village,"
    direct.reset()
    expected = direct.create_completion(prompt, **SETTINGS)["choices"][0]["text"]
    got = openai_client.completions.create(model="smollm2", prompt=prompt, temperature=0, top_p=0.95,
                                           max_tokens=40,
                                           extra_body={"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0})
    assert got.choices[0].text == expected

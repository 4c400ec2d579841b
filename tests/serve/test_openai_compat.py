"""OpenAI compatibility, with the official ``openai`` client where it can express the case and raw httpx where it
cannot: content parts, null assistant content, ``stream_options.include_usage``, ``GET /v1/models/{id}``, a chat
without ``max_tokens``, a list of prompts, the error ``code`` shape, the ``Bearer`` scheme, ``HEAD /health``, strict
types; and a chat whose template would be huge is refused before tokenizing."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.conftest import MAX_TOKENS, PROMPTS, make_engine, serve

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _chat(client, messages, **extra):
    return client.chat.completions.create(model="lora-r4", messages=messages, temperature=0, **extra)


def test_content_as_text_parts_equals_the_string(client):
    text = _chat(client, [{"role": "user", "content": "the cat sat on"}], max_tokens=MAX_TOKENS)
    parts = [{"type": "text", "text": "the cat "}, {"type": "text", "text": "sat on"}]
    got = _chat(client, [{"role": "user", "content": parts}], max_tokens=MAX_TOKENS)
    assert got.choices[0].message.content == text.choices[0].message.content
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    with pytest.raises(openai.BadRequestError, match="text parts only"):
        _chat(client, [{"role": "user", "content": image}], max_tokens=MAX_TOKENS)


def test_assistant_content_may_be_null_but_not_a_users(client):
    chat = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "two"},
    ]
    assert _chat(client, chat, max_tokens=MAX_TOKENS).choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="messages.0.content is null"):
        _chat(client, [{"role": "user", "content": None}], max_tokens=MAX_TOKENS)


def test_stream_include_usage_ends_with_a_usage_chunk(client):
    chunks = list(
        _chat(client, [{"role": "user", "content": "the cat"}], max_tokens=MAX_TOKENS, stream=True,
              stream_options={"include_usage": True})
    )  # fmt: skip
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert 1 <= last.usage.completion_tokens <= MAX_TOKENS
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(_chat(client, [{"role": "user", "content": "the cat"}], max_tokens=MAX_TOKENS, stream=True))
    assert all(c.choices for c in plain)  # no usage chunk unless asked


def test_models_retrieve_and_unknown_model_code(client):
    card = client.models.retrieve("lora-r4")
    assert card.id == "lora-r4" and card.object == "model"
    assert client.models.retrieve("base").id == "base"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"


def test_chat_without_max_tokens_uses_the_remaining_context(server, client):
    long = " ".join(["cat"] * 40)  # 40+ prompt tokens of a 64-token context: the old default of 256 did not fit
    got = _chat(client, [{"role": "user", "content": long}])
    context = server.engine.context_len
    assert got.usage.prompt_tokens > 40
    assert got.usage.prompt_tokens + got.usage.completion_tokens <= context


def test_prompt_list_gives_one_choice_per_prompt(client, serve_env):
    out = client.completions.create(model="nora-silu-r4", prompt=PROMPTS[:3], max_tokens=MAX_TOKENS, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [serve_env.expected[("nora-silu-r4", p)] for p in PROMPTS[:3]]
    one = client.completions.create(model="nora-silu-r4", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert out.usage.prompt_tokens > one.usage.prompt_tokens
    stream = client.completions.create(
        model="nora-silu-r4", prompt=PROMPTS[:2], max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [serve_env.expected[("nora-silu-r4", p)] for p in PROMPTS[:2]]


def test_error_code_is_a_string_or_null(server):
    for body, status in [
        ({"model": "nope", "prompt": "the cat"}, 404),
        ({"model": "base", "prompt": "the cat", "temperature": -1}, 400),
        ({"model": "base", "prompt": []}, 400),
    ]:
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
        assert r.status_code == status, r.text
        code = r.json()["error"]["code"]
        assert code is None or isinstance(code, str), code


@pytest.mark.parametrize(
    "field, value", [("max_tokens", True), ("stream", "yes"), ("max_tokens", 2.5), ("seed", "7"), ("n", True)]
)
def test_strict_types(server, field, value):
    body = {"model": "base", "prompt": "the cat", field: value}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text


def test_head_health(server):
    r = httpx.head(f"{server.url}/health", timeout=10)
    assert r.status_code == 200


def test_bearer_scheme_in_any_case(serve_env):
    srv = serve(make_engine(serve_env, api_key="s3cret"))
    try:
        for scheme in ("Bearer", "bearer", "BEARER"):
            r = httpx.get(f"{srv.url}/v1/models", headers={"Authorization": f"{scheme} s3cret"}, timeout=10)
            assert r.status_code == 200, (scheme, r.text)
        r = httpx.get(f"{srv.url}/v1/models", headers={"Authorization": "Basic s3cret"}, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="s3cret", max_retries=0)
        assert {m.id for m in client.models.list()} >= {"base", "lora-r4"}
    finally:
        srv.stop()


def test_a_huge_chat_is_refused_before_templating_or_tokenizing(server, monkeypatch):
    calls = []
    monkeypatch.setattr(server.engine, "encode", lambda *a, **k: calls.append(a) or [1])
    url = f"{server.url}/v1/chat/completions"
    empty = {"model": "base", "messages": [{"role": "user", "content": ""}] * 30_000}  # ~900 KB, no characters
    r = httpx.post(url, json=empty, timeout=30)
    assert r.status_code == 400 and "messages has" in r.json()["error"]["message"], r.text
    # few enough messages to pass the count, but the template's own text is over the limit
    limit = 32 * server.engine.max_prompt_tokens
    templated = {"model": "base", "messages": [{"role": "user", "content": "a"}] * (limit // 20)}
    r = httpx.post(url, json=templated, timeout=30)
    assert r.status_code == 400 and "--max-prompt-chars" in r.json()["error"]["message"], r.text
    assert calls == []  # nothing was tokenized

"""``nora serve`` over real HTTP on loopback: outputs equal offline greedy generation, batching, bad input."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import torch

from nora_peft.prompt import format_chat
from tests.serve.conftest import (
    ADAPTER_SPECS,
    MAX_TOKENS,
    PROMPTS,
    make_engine,
    save_adapter,
    serve,
)
from tests.tiny_models import tiny_causal_lm


def complete(url: str, model: str, prompt, **extra) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def sse_texts(response: httpx.Response, chat: bool) -> tuple[str, list[dict]]:
    chunks = []
    lines = [line for line in response.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunks.append(json.loads(line[len("data: ") :]))
    if chat:
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
    return text, chunks


def test_models_lists_base_and_adapters(server):
    data = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert {m["id"] for m in data} == {"base", *ADAPTER_SPECS}


@pytest.mark.parametrize("model", ["base", "nora-silu-r4", "nora-id-r3", "lora-r4", "rslora-r2"])
def test_single_completion_equals_offline_peft_generate(server, serve_env, model):
    for prompt in PROMPTS[:2]:
        r = complete(server.url, model, prompt)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == model
        assert body["choices"][0]["text"] == serve_env.expected[(model, prompt)]
        assert body["usage"]["completion_tokens"] <= MAX_TOKENS


def test_adapters_really_differ(serve_env):
    outputs = {serve_env.expected[(m, PROMPTS[1])] for m in ["base", *ADAPTER_SPECS]}
    assert len(outputs) >= 6  # the equality tests above are not vacuous


def test_streaming_completion_and_chat(server, serve_env):
    prompt = PROMPTS[0]
    r = complete(server.url, "nora-relu-r8", prompt, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    text, chunks = sse_texts(r, chat=False)
    assert text == serve_env.expected[("nora-relu-r8", prompt)]
    assert len(chunks) >= 2 and chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the dog ran"}]
    body = {"model": "lora-r8", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    full = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert full.status_code == 200, full.text
    content = full.json()["choices"][0]["message"]["content"]
    assert full.json()["object"] == "chat.completion"
    chat_prompt = format_chat(serve_env.tokenizer, messages)  # the chat path is the completion path on this prompt
    assert content == complete(server.url, "lora-r8", chat_prompt).json()["choices"][0]["text"]
    streamed = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60)
    text, chunks = sse_texts(streamed, chat=True)
    assert text == content and chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"


async def _fire(url: str, jobs: list[tuple[str, str]], concurrency: int) -> list[httpx.Response | Exception]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(model: str, prompt: str):
            async with sem:
                body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
                try:
                    return await client.post(f"{url}/v1/completions", json=body)
                except Exception as e:  # counted as an error below
                    return e

        return await asyncio.gather(*(one(m, p) for m, p in jobs))


def _check_all(results, jobs, expected) -> int:
    errors = 0
    for (model, prompt), r in zip(jobs, results):
        if isinstance(r, Exception) or r.status_code != 200:
            errors += 1
            continue
        assert r.json()["choices"][0]["text"] == expected[(model, prompt)], (model, prompt)
    return errors


def test_concurrent_mixed_adapter_requests_are_batched(server, serve_env):
    before = server.engine.snapshot_metrics()
    names = ["base", *list(ADAPTER_SPECS)[:3]]  # 4 distinct: fits the pool, so they share one batch
    jobs = [(names[i % 4], PROMPTS[i % len(PROMPTS)]) for i in range(12)]
    results = asyncio.run(_fire(server.url, jobs, concurrency=12))
    assert _check_all(results, jobs, serve_env.expected) == 0
    after = server.engine.snapshot_metrics()
    assert after["max_batch_size_seen"] > 1
    assert after["batches_total"] - before["batches_total"] < len(jobs)  # fewer forward waves than requests


def test_load_200_requests_over_8_adapters(server, serve_env):
    """Bounded load: 200 requests, 8 adapters (pool of 4 -> LRU eviction/reload), 24 in flight, 0 errors."""
    models = list(ADAPTER_SPECS)
    jobs = [(models[i % 8], PROMPTS[(i // 8) % len(PROMPTS)]) for i in range(200)]
    start = time.monotonic()
    results = asyncio.run(_fire(server.url, jobs, concurrency=24))
    assert _check_all(results, jobs, serve_env.expected) == 0
    metrics = httpx.get(f"{server.url}/metrics?format=json").json()
    assert metrics["max_batch_size_seen"] > 1 and metrics["adapter_evictions"] > 0
    assert metrics["adapters_in_memory"] <= 4
    assert time.monotonic() - start < 60


def test_bad_input_gets_clear_errors_and_server_survives(server, serve_env):
    url = server.url

    def err(r: httpx.Response, status: int, *needles: str) -> None:
        assert r.status_code == status, (r.status_code, r.text)
        message = r.json()["error"]["message"]
        for needle in needles:
            assert needle in message, message

    err(complete(url, "no-such-adapter", "the cat"), 404, "no-such-adapter", "does not exist")
    err(complete(url, "../nora-silu-r4", "the cat"), 400, "model", "not a path")
    err(complete(url, "/etc/passwd", "the cat"), 400, "model")
    headers = {"Content-Type": "application/json"}
    bad_json = httpx.post(f"{url}/v1/completions", content=b'{"model": "base", "prompt": ', headers=headers)
    err(bad_json, 400, "not valid JSON")
    err(httpx.post(f"{url}/v1/completions", content=b"[1, 2]", headers=headers), 400, "JSON object")
    err(httpx.post(f"{url}/v1/completions", content=b"model=base"), 400, "JSON object")
    err(httpx.post(f"{url}/v1/completions", json={"model": "base"}, timeout=30), 400, "prompt")
    err(complete(url, "base", "the cat", max_tokens="lots"), 400, "max_tokens")
    err(complete(url, "base", "the cat", temperature=-1), 400, "temperature")
    err(complete(url, "base", " ".join(["cat"] * 80)), 400, "prompt", "81 tokens", "limit of 63")
    err(complete(url, "base", "the cat", max_tokens=200), 400, "max_tokens")
    chat = {"model": "base", "messages": [{"role": "wizard", "content": "hi"}]}
    err(httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30), 400, "messages.0.role")
    load = f"{url}/v1/load_lora_adapter"
    err(httpx.post(load, json={"lora_name": "../x", "lora_path": "nora-silu-r4"}), 400, "lora_name")
    err(httpx.post(load, json={"lora_name": "x", "lora_path": "/etc"}), 403, "outside --adapters-dir")
    err(httpx.post(load, json={"lora_name": "x", "lora_path": "missing"}), 400, "adapter_config.json")
    err(httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "never-loaded"}), 404, "never-loaded")
    # an adapter trained on a wider model does not fit this base: 400 naming the layer and shapes
    wide = tiny_causal_lm("llama", dtype=torch.float64)
    wide.config.hidden_size = 48
    from transformers import AutoModelForCausalLM

    wide = AutoModelForCausalLM.from_config(wide.config).to(torch.float64)
    save_adapter(wide, ADAPTER_SPECS["nora-silu-r4"], serve_env.adapters_dir / "wide", seed=7)
    err(httpx.post(load, json={"lora_name": "wide", "lora_path": "wide"}), 400, "does not fit", "q_proj")
    shutil.rmtree(serve_env.adapters_dir / "wide")
    # the server still answers correctly
    r = complete(url, "nora-gelu-r2", PROMPTS[2])
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == serve_env.expected[("nora-gelu-r2", PROMPTS[2])]


def test_hot_load_and_unload(server, serve_env):
    src = serve_env.adapters_dir / "nora-tanh-r6"
    shutil.copytree(src, serve_env.adapters_dir / "extra" / "hot")
    try:
        r = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": "extra/hot"})
        assert r.status_code == 200, r.text
        assert "hot" in {m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
        got = complete(server.url, "hot", PROMPTS[3]).json()["choices"][0]["text"]
        assert got == serve_env.expected[("nora-tanh-r6", PROMPTS[3])]
        assert httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "hot"}).status_code == 200
        assert complete(server.url, "hot", PROMPTS[3]).status_code == 404
    finally:
        shutil.rmtree(serve_env.adapters_dir / "extra")


def test_api_key(serve_env):
    srv = serve(make_engine(serve_env, api_key="s3cret"))
    try:
        assert complete(srv.url, "base", "the cat").status_code == 401
        assert httpx.get(f"{srv.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.post(
            f"{srv.url}/v1/completions",
            json={"model": "lora-r4", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0},
            headers={"Authorization": "Bearer s3cret"},
        )
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == serve_env.expected[("lora-r4", PROMPTS[0])]
    finally:
        srv.stop()


def test_openai_client(server, serve_env):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    out = client.completions.create(model="nora-silu-r4", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0)
    assert out.choices[0].text == serve_env.expected[("nora-silu-r4", PROMPTS[1])]


def test_nora_serve_command(serve_env):
    """The real command in a subprocess: start, answer, stop."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "nora_peft.cli", "serve", "--base", str(serve_env.base_dir)]
    cmd += ["--adapters-dir", str(serve_env.adapters_dir), "--port", str(port), "--dtype", "float64"]
    cmd += ["--max-adapters", "2", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        r = complete(url, "lora-r8", PROMPTS[1])
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == serve_env.expected[("lora-r8", PROMPTS[1])]
    finally:
        proc.terminate()
        proc.wait(timeout=20)

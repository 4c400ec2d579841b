"""Hostile requests and hostile adapters against a real ``nora serve`` on loopback (issue 10: one test per finding).

One server for the module: user key + admin key, small limits (body 256 KiB, request timeout 1 s, header/body read
timeouts 1 s), a pool of 2 slots. Bounded: a few hundred requests, a few seconds of waiting in all. The last test
checks that the server still answers every adapter exactly like offline peft generation and that its memory stayed
bounded.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from nora_peft.serve import GenRequest
from tests.adapter_files import edit_config, edit_tensors
from tests.serve.conftest import MAX_TOKENS, PROMPTS, make_engine, serve

USER, ADMIN = "user-key", "admin-key"
U = {"Authorization": f"Bearer {USER}"}
A = {"Authorization": f"Bearer {ADMIN}"}
GOOD = ["nora-silu-r4", "lora-r4", "nora-relu-r8", "rslora-r2", "nora-gelu-r2"]
LIMITS = dict(max_body_bytes=256 * 1024, request_timeout_s=1.0, header_timeout_s=1.0, body_timeout_s=1.0)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


class Hostile:
    """The server under attack and helpers to talk to it."""

    def __init__(self, env, root: Path) -> None:
        self.env, self.root = env, root
        self.dir = root / "adapters"
        for name in GOOD:
            shutil.copytree(env.adapters_dir / name, self.dir / name)
        shutil.copytree(env.adapters_dir / "nora-silu-r4", self.dir / "bad-scaling")  # finding 2: skipped at start
        edit_config(self.dir / "bad-scaling", scaling="bogus")
        self.engine = make_engine(
            env, adapters_dir=str(self.dir), max_adapters=2, max_queue=8, api_key=USER, admin_key=ADMIN, **LIMITS
        )
        self.server = serve(self.engine)
        self.url = self.server.url
        self.messages: list[str] = []  # every error message seen, checked for paths at the end

    def post(self, path: str, body, headers=U, **kwargs) -> httpx.Response:
        r = httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=30, **kwargs)
        self.note(r)
        return r

    def note(self, r: httpx.Response) -> None:
        assert r.status_code < 500 or r.status_code == 503, (r.status_code, r.text)  # never a 500 for a client
        if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
            self.messages.append(r.json()["error"]["message"])

    def complete(self, model: str, prompt, **extra) -> httpx.Response:
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
        return self.post("/v1/completions", body)

    def load(self, name: str, path: str, headers=A) -> httpx.Response:
        return self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, headers)

    def incoming(self, name: str, source: str = "nora-silu-r4") -> Path:
        """A copy of a good adapter under the adapters dir, to be spoiled by the test."""
        folder = self.dir / "incoming" / name
        shutil.copytree(self.env.adapters_dir / source, folder)
        return folder

    def expect_ok(self, model: str, prompt: str = PROMPTS[0]) -> None:
        r = self.complete(model, prompt)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == self.env.expected[(model.removeprefix("copy-"), prompt)]


def err(r: httpx.Response, status: int, *needles: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    message = r.json()["error"]["message"]
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture(scope="module")
def hostile(serve_env, tmp_path_factory, caplog_module):
    h = Hostile(serve_env, tmp_path_factory.mktemp("hostile"))
    h.startup_log = caplog_module
    h.expect_ok("nora-silu-r4")  # warm up before the first memory reading
    h.rss_start = rss_bytes()
    yield h
    h.server.stop()


@pytest.fixture(scope="module")
def caplog_module():
    """Log records of the server's start-up (module scope: the fixture server starts once)."""
    import logging

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.ERROR)
    logger = logging.getLogger("nora_peft.serve")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


# -- hostile adapters -------------------------------------------------------------------------------------------
def test_f02_bad_adapter_at_startup_is_skipped_and_logged(hostile):
    names = {m["id"] for m in httpx.get(f"{hostile.url}/v1/models", headers=U).json()["data"]}
    assert names == {"base", *GOOD}
    assert any("bad-scaling" in r.getMessage() and "scaling" in r.getMessage() for r in hostile.startup_log)


def test_f01_bogus_activation_is_refused_at_load_and_nothing_breaks(hostile):
    edit_config(hostile.incoming("act"), activation="bogus")
    err(hostile.load("act", "incoming/act"), 400, "activation must be one of")
    for name in GOOD[:3]:
        hostile.expect_ok(name)


def test_f04_targets_must_be_the_bases_own_linear_layers(hostile):
    def retarget(t):
        for k in list(t):
            t[k.replace("q_proj.", "q_proj.base.")] = t.pop(k)

    edit_tensors(hostile.incoming("inner"), retarget)
    err(hostile.load("inner", "incoming/inner"), 400, "q_proj.base", "no such layer")
    shutil.copytree(hostile.env.adapters_dir / "nora-relu-r8", hostile.dir / "incoming" / "copy-nora-relu-r8")
    assert hostile.load("copy-nora-relu-r8", "incoming/copy-nora-relu-r8").status_code == 200
    hostile.expect_ok("copy-nora-relu-r8")  # q_proj adapters still load and serve


def test_f06_rank_limit_and_padding_released(hostile):
    big = hostile.incoming("big")
    edit_config(big, r=64)
    edit_tensors(
        big,
        lambda t: t.update(
            {k: torch.randn(64, v.shape[1]) if "up" in k else torch.randn(v.shape[0], 64) for k, v in t.items()}
        ),
    )
    err(hostile.load("big", "incoming/big"), 400, "rank 64", "over the limit")
    before = hostile.engine.pool.stacks.nbytes()
    ok = hostile.incoming("r32")  # r = 32 = min(d, k) of q_proj: allowed, and its padding goes when it goes
    edit_config(ok, r=32, target_modules=["q_proj"])
    edit_tensors(ok, lambda t: [t.pop(k) for k in [k for k in t if "q_proj" not in k]])
    edit_tensors(ok, lambda t: t.update({k: torch.randn(32, 32, dtype=v.dtype) / 32 for k, v in t.items()}))
    assert hostile.load("r32", "incoming/r32").status_code == 200
    assert hostile.engine.pool.stacks.nbytes() > before
    assert hostile.post("/v1/unload_lora_adapter", {"lora_name": "r32"}, A).status_code == 200
    assert hostile.engine.pool.stacks.r_max <= 8 and hostile.engine.pool.stacks.nbytes() <= before


@pytest.mark.parametrize(
    ("name", "spoil", "needle"),
    [
        ("cfg-list", lambda f: (f / "adapter_config.json").write_text("[1, 2]"), "JSON object"),  # f14
        ("alpha-str", lambda f: edit_config(f, alpha="8"), "alpha must be a finite number"),  # f14
        ("rank0", lambda f: edit_tensors(f, lambda t: t.update({k: v[:0] for k, v in t.items()})), "r >= 1"),
        ("zero-d", lambda f: edit_tensors(f, lambda t: t.update({k: v[0, 0].clone() for k, v in t.items()})), "2-D"),
        ("pickle", lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"), "never pickle"),  # 16
        (
            "int32",
            lambda f: edit_tensors(f, lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()})),
            "floating",
        ),
        ("nan", lambda f: edit_tensors(f, lambda t: t.update({k: v.fill_(float("nan")) for k, v in t.items()})), "NaN"),
        ("alpha-huge", lambda f: edit_config(f, alpha=1e30), "scaling"),  # f17
    ],
)
def test_f14_f16_f17_bad_adapter_files_are_400_at_load(hostile, name, spoil, needle):
    spoil(hostile.incoming(name))
    message = err(hostile.load(name, f"incoming/{name}"), 400, needle)
    assert "Traceback" not in message and name not in hostile.engine.model_names()


def test_f07_roles_and_no_silent_overwrite(hostile):
    shutil.copytree(hostile.env.adapters_dir / "lora-r8", hostile.dir / "incoming" / "mine")
    err(hostile.load("mine", "incoming/mine", headers=U), 403, "admin key")
    err(hostile.load("mine", "incoming/mine", headers={}), 401, "admin key")
    assert hostile.load("mine", "incoming/mine").status_code == 200
    err(hostile.load("mine", "nora-silu-r4"), 409, "already loaded", "unload it first")
    err(hostile.post("/v1/unload_lora_adapter", {"lora_name": "mine"}, U), 403, "admin key")
    r = hostile.complete("mine", PROMPTS[1])  # still the first weights
    assert r.json()["choices"][0]["text"] == hostile.env.expected[("lora-r8", PROMPTS[1])]
    assert hostile.post("/v1/unload_lora_adapter", {"lora_name": "mine"}, A).status_code == 200


def test_f08_health_open_everything_else_behind_the_key(hostile):
    assert httpx.get(f"{hostile.url}/health").status_code == 200
    for path in ("/metrics", "/docs", "/openapi.json", "/v1/models"):
        assert httpx.get(f"{hostile.url}{path}").status_code == 401, path
        assert httpx.get(f"{hostile.url}{path}", headers=U).status_code == 200, path
    prometheus = httpx.get(f"{hostile.url}/metrics", headers=U).text
    assert "nora_rejections_total" in prometheus


def test_f09_names_are_full_matched(hostile):
    err(hostile.load("ok\n", "nora-silu-r4"), 400, "lora_name")
    err(hostile.complete("nora-silu-r4\n", "the cat"), 400, "model")
    assert "ok\n" not in hostile.engine.model_names()


def test_f18_no_server_paths_in_messages(hostile):
    err(hostile.load("x", str(hostile.root / "elsewhere")), 403, "outside --adapters-dir")
    err(hostile.load("x", "incoming/nothing-here"), 400)
    err(hostile.load("x", "incoming/a\x00b"), 400, "NUL")  # f14: NUL in lora_path
    for message in hostile.messages:
        assert str(hostile.root) not in message and "/tmp" not in message, message


# -- hostile requests -------------------------------------------------------------------------------------------
def test_f03_bad_admission_is_400_and_batched_neighbours_are_fine(hostile):
    vocab = hostile.engine.model.get_input_embeddings().num_embeddings
    bad = [
        ({"prompt": [1, 5, vocab]}, "outside the vocabulary"),
        ({"prompt": [1, -1, 5]}, "outside the vocabulary"),
        ({"prompt": "the cat", "seed": 2**64}, "seed"),
        ({"prompt": "the cat", "temperature": 1e-40}, "temperature"),
    ]
    jobs = [("good", GOOD[i % 2], PROMPTS[i % 4]) for i in range(6)] + [("bad", i, None) for i in range(len(bad))]

    async def fire():
        async with httpx.AsyncClient(timeout=30, headers=U) as client:

            async def one(kind, model_or_index, prompt):
                if kind == "good":
                    body = {"model": model_or_index, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
                else:
                    body = {"model": GOOD[0], "max_tokens": MAX_TOKENS, **bad[model_or_index][0]}
                return await client.post(f"{hostile.url}/v1/completions", json=body)

            return await asyncio.gather(*(one(*job) for job in jobs))

    for (kind, what, prompt), r in zip(jobs, asyncio.run(fire())):
        if kind == "good":
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == hostile.env.expected[(what, prompt)]
        else:
            err(r, 400, bad[what][1])


def test_f03_a_row_that_fails_inside_a_batch_fails_alone(hostile):
    """Past admission (engine level): a sampling blow-up and an out-of-vocabulary id fail only their own rows."""
    engine, results, done = hostile.engine, {}, threading.Event()
    ids = engine.encode(PROMPTS[0])

    def request(key, **kw):
        def on_event(kind, payload):
            if kind != "delta":
                results[key] = (kind, payload)
                if len(results) == 6:
                    done.set()

        return GenRequest(prompt_ids=kw.pop("ids", ids), adapter=kw.pop("adapter", None), on_event=on_event, **kw)

    with engine.lock:  # queue them all first, so they share a batch
        for i in range(4):
            engine.submit(request(i, max_tokens=MAX_TOKENS, adapter=GOOD[i % 2]))
        engine.submit(request("nan", max_tokens=MAX_TOKENS, temperature=1e-40, seed=1))
        engine.submit(request("vocab", max_tokens=MAX_TOKENS, ids=[1, 10**6]))
    assert done.wait(30)
    for i in range(4):
        kind, payload = results[i]
        assert kind == "done" and payload["text"] == hostile.env.expected[(GOOD[i % 2], PROMPTS[0])]
    assert results["nan"][0] == "error" and results["vocab"][0] == "error"


def test_f05_body_limit_prompt_length_and_tokenizing_off_the_loop(hostile, monkeypatch):
    # a 50 MB body is refused from its Content-Length, before it is read
    with socket.create_connection(("127.0.0.1", hostile.server.port), timeout=10) as s:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {USER}\r\n"
        s.sendall((head + "Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n").encode() + b"{")
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 413"), reply
    big = "cat " * (80 * 1024)  # 320 KB: over the 256 KiB limit
    err(hostile.complete("base", big), 413, "larger than the limit")
    calls = []
    monkeypatch.setattr(hostile.engine, "encode", lambda p: calls.append(p) or [1])
    long = "cat " * (32 * hostile.engine.max_prompt_tokens)  # under the body limit, over the prompt limit
    err(hostile.complete("base", long), 400, "characters", "--max-prompt-chars")
    assert calls == []  # refused before tokenizing

    def slow_encode(prompt):
        time.sleep(1.5)
        return [1, 5]

    monkeypatch.setattr(hostile.engine, "encode", slow_encode)
    worker = threading.Thread(target=hostile.complete, args=("base", "the cat"))
    worker.start()
    time.sleep(0.2)
    start = time.monotonic()
    assert httpx.get(f"{hostile.url}/health", timeout=5).status_code == 200
    assert time.monotonic() - start < 0.5  # the event loop is not blocked by tokenizing
    worker.join(10)


def test_f10_nonstreaming_client_that_leaves_is_cancelled(hostile):
    before = hostile.engine.snapshot_metrics()
    outcomes: list[str] = []
    body = {"model": "base", "prompt": "the cat", "max_tokens": 40}
    with hostile.engine.lock:  # nothing runs: the requests wait, then their clients give up
        threads = [threading.Thread(target=_give_up, args=(hostile.url, body, outcomes)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        time.sleep(0.2)
    assert outcomes == ["gave up"] * 4
    _wait_idle(hostile.engine)
    after = hostile.engine.snapshot_metrics()
    assert after["requests_cancelled"] - before["requests_cancelled"] == 4
    assert after["tokens_generated"] == before["tokens_generated"]


def _give_up(url: str, body: dict, outcomes: list[str]) -> None:
    try:
        r = httpx.post(f"{url}/v1/completions", json=body, headers=U, timeout=0.3)
        outcomes.append(f"answered {r.status_code}")
    except httpx.ReadTimeout:
        outcomes.append("gave up")


def _wait_idle(engine, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while (engine.scheduler.queue_depth() or engine.scheduler.running_rows()) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)


def test_f11_stop_strings_are_bounded(hostile):
    r = hostile.complete("base", "the cat", stop=["x"] * 300_000)
    assert r.status_code in (400, 413)
    err(hostile.complete("base", "the cat", stop=["x"] * 17), 400, "stop has 17 strings")
    err(hostile.complete("base", "the cat", stop=["x" * 257]), 400, "1 to 256")
    assert hostile.complete("base", "the cat", stop=["dog", "mat"]).status_code == 200


def test_f12_f13_queue_timeout_holds_while_queued_with_retry_after(hostile):
    results: dict[str, tuple[float, httpx.Response]] = {}

    def send(key: str, stream: bool = False) -> None:
        start = time.monotonic()
        body = {"model": "base", "prompt": "the cat", "max_tokens": MAX_TOKENS, "stream": stream}
        r = httpx.post(f"{hostile.url}/v1/completions", json=body, headers=U, timeout=10)
        results[key] = (time.monotonic() - start, r)

    before = hostile.engine.snapshot_metrics()["rejections"]
    with hostile.engine.lock:  # a long generation holds the batch: nothing is admitted for 2.5 s
        threads = [threading.Thread(target=send, args=(f"q{i}", i == 0)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        full = httpx.post(f"{hostile.url}/v1/completions", json={"model": "base", "prompt": "a"}, headers=U)
        for t in threads:
            t.join(2.2)
        time.sleep(max(0.0, 2.5 - 0.3 - 2.2))
    assert full.status_code == 503 and full.headers["Retry-After"] == str(hostile.engine.config.retry_after_s)
    assert "queue full" in full.json()["error"]["message"]
    assert set(results) == {f"q{i}" for i in range(8)}
    for elapsed, r in results.values():  # answered at the timeout, while still queued (streaming too: no 200)
        assert r.status_code == 503 and r.headers["Retry-After"] == str(hostile.engine.config.retry_after_s), r.text
        assert elapsed < 2.0
    _wait_idle(hostile.engine)
    after = hostile.engine.snapshot_metrics()["rejections"]
    assert after.get("queue_full", 0) > before.get("queue_full", 0)
    assert after.get("timeout", 0) >= before.get("timeout", 0) + 8


def test_f14_lone_surrogate_is_400_and_the_connection_stays_usable(hostile):
    conn = http.client.HTTPConnection("127.0.0.1", hostile.server.port, timeout=10)
    headers = {**U, "Content-Type": "application/json"}
    conn.request("POST", "/v1/completions", body=b'{"model": "base", "prompt": "the \\ud800 cat"}', headers=headers)
    first = conn.getresponse()
    body = json.loads(first.read())
    assert first.status == 400 and "surrogate" in body["error"]["message"], body
    assert (first.getheader("connection") or "").lower() != "close"
    sock = conn.sock
    good = json.dumps({"model": "base", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0})
    conn.request("POST", "/v1/completions", body=good, headers=headers)
    second = conn.getresponse()
    assert conn.sock is sock and second.status == 200  # same connection
    assert json.loads(second.read())["choices"][0]["text"] == hostile.env.expected[("base", PROMPTS[0])]
    conn.close()
    chat = b'{"model": "base", "messages": [{"role": "user", "content": "\\ud800"}]}'
    r = httpx.post(
        f"{hostile.url}/v1/chat/completions", content=chat, headers={**U, "Content-Type": "application/json"}
    )
    err(r, 400, "surrogate")


@pytest.mark.parametrize("option", [{"logprobs": 2}, {"best_of": 3}, {"echo": True}, {"tools": [{"type": "function"}]}])
def test_f15_unsupported_options_are_refused(hostile, option):
    name = next(iter(option))
    err(hostile.complete("base", "the cat", **option), 400, f"'{name}' is not supported")
    assert hostile.complete("base", "the cat", logprobs=None, presence_penalty=0).status_code == 200


def test_f19_slow_headers_and_bodies_are_cut_off(hostile):
    socks = []
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", hostile.server.port), timeout=5)
        if i % 2:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        else:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")  # nor the body
        socks.append(s)
    time.sleep(LIMITS["header_timeout_s"] + 0.5)
    assert sum(_closed_by_server(s) for s in socks) == 20
    assert httpx.get(f"{hostile.url}/health").status_code == 200


# -- and afterwards -----------------------------------------------------------------------------------------------
def test_zz_still_correct_and_memory_bounded(hostile):
    for name in ["base", *GOOD]:
        for prompt in PROMPTS[:2]:
            hostile.expect_ok(name, prompt)
    growth = rss_bytes() - hostile.rss_start
    assert growth < 300 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB"


def _closed_by_server(s: socket.socket) -> bool:
    """True when the server closed the connection (whatever it sent first); False if it still waits for us."""
    s.settimeout(2)
    try:
        while s.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        s.close()

"""Engine behaviour without HTTP: bounded queue (503), queue timeouts, LRU pool, the single-request path."""

from __future__ import annotations

import threading
import time

import pytest

from nora_peft.serve import AdapterError, GenRequest
from tests.serve.conftest import MAX_TOKENS, PROMPTS, make_engine


def _request(engine, adapter, done: list, finished: threading.Event, n_expected: int) -> GenRequest:
    def on_event(kind, payload):
        if kind != "delta":
            done.append((kind, payload))
            if len(done) >= n_expected:
                finished.set()

    return GenRequest(prompt_ids=engine.encode(PROMPTS[0]), adapter=adapter, max_tokens=MAX_TOKENS, on_event=on_event)


def test_full_queue_is_503_and_stale_requests_time_out(serve_env):
    engine = make_engine(serve_env, max_queue=1, max_batch_size=1, request_timeout_s=0.2, batch_wait_ms=0.0)
    done, finished = [], threading.Event()
    with engine.lock:  # the batching loop blocks on the lock: requests pile up in the 1-slot queue
        engine.submit(_request(engine, "lora-r4", done, finished, n_expected=99))
        for _ in range(500):  # bounded wait until the loop has taken it (and is now blocked on the lock)
            if engine.queue.qsize() == 0:
                break
            time.sleep(0.01)
        engine.submit(_request(engine, "lora-r4", done, finished, n_expected=99))  # waits in the queue
        with pytest.raises(AdapterError) as err:
            engine.submit(_request(engine, "lora-r4", done, finished, n_expected=99))
        assert err.value.status == 503 and "queue full" in str(err.value)
        time.sleep(0.3)  # the queued request is now older than request_timeout_s
    accepted = 2
    deadline = time.monotonic() + 30
    while len(done) < accepted and time.monotonic() < deadline:
        time.sleep(0.02)
    engine.stop()
    assert [k for k, _ in done] == ["done", "error"]  # every accepted request got an answer
    status, message = done[1][1]
    assert status == 503 and "waited" in message


def test_single_request_path_and_lru(serve_env):
    engine = make_engine(serve_env, max_adapters=2)
    try:
        for name in ["nora-silu-r4", "lora-r8", "nora-gelu-r2", "nora-silu-r4"]:
            got = engine.generate(PROMPTS[1], adapter=name, max_tokens=MAX_TOKENS, temperature=0.0)
            assert got["text"] == serve_env.expected[(name, PROMPTS[1])]
            assert len(engine.pool.slots) <= 2
        assert engine.pool.evictions >= 2 and list(engine.pool.slots)[-1] == "nora-silu-r4"  # most recent last
        assert (
            engine.generate(PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0.0)["text"]
            == serve_env.expected[("base", PROMPTS[2])]
        )
        sampled = [engine.generate(PROMPTS[0], "lora-r4", max_tokens=MAX_TOKENS, temperature=1.0, seed=3) for _ in "ab"]
        assert sampled[0]["text"] == sampled[1]["text"]  # same seed, same sample
    finally:
        engine.stop()

"""Engine behaviour without HTTP: bounded queue (503), queue timeouts, LRU pool, the single-request path."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from nora_peft.serve import AdapterError, GenRequest
from tests.serve.conftest import ADAPTER_SPECS, MAX_TOKENS, PROMPTS, make_engine


def _request(engine, adapter, done: list, finished: threading.Event, n_expected: int) -> GenRequest:
    def on_event(kind, payload):
        if kind != "delta":
            done.append((kind, payload))
            if len(done) >= n_expected:
                finished.set()

    return GenRequest(prompt_ids=engine.encode(PROMPTS[0]), adapter=adapter, max_tokens=MAX_TOKENS, on_event=on_event)


def test_full_queue_is_503_and_stale_requests_time_out(serve_env):
    engine = make_engine(serve_env, max_queue=2, max_batch_size=1, request_timeout_s=0.2, batch_wait_ms=0.0)
    done, finished = [], threading.Event()
    try:
        with engine.lock:  # the scheduler blocks on the lock: requests pile up in the 2-place queue
            for _ in range(2):
                engine.submit(_request(engine, "lora-r4", done, finished, n_expected=99))
            with pytest.raises(AdapterError) as err:
                engine.submit(_request(engine, "lora-r4", done, finished, n_expected=99))
            assert err.value.status == 503 and "queue full" in str(err.value)
            assert engine.snapshot_metrics()["queue_depth"] == 2
            time.sleep(0.3)  # the queued requests are now older than request_timeout_s
        deadline = time.monotonic() + 30
        while len(done) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [k for k, _ in done] == ["error", "error"]  # every accepted request got an answer
        status, message = done[0][1]
        assert status == 503 and "waited" in message
        got = engine.generate(PROMPTS[0], "lora-r4", max_tokens=MAX_TOKENS, temperature=0.0)  # fresh ones still run
        assert got["finish_reason"] in ("stop", "length")
        assert engine.snapshot_metrics()["rejections"] == {"queue_full": 1, "timeout": 2}
    finally:
        engine.stop()


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


def test_ignore_eos_generates_max_tokens_past_an_eos(serve_env):
    """vLLM's ``ignore_eos``: an EOS no longer ends the request; the tokens are those of the ordinary generation."""
    engine = make_engine(serve_env)
    try:
        plain = engine.generate(PROMPTS[0], "lora-r4", max_tokens=MAX_TOKENS, temperature=0.0)
        first = engine.tokenizer(plain["text"], add_special_tokens=False)["input_ids"][0]
        engine.scheduler.eos_ids.add(first)  # the model's first greedy token now counts as an EOS
        stopped = engine.generate(PROMPTS[0], "lora-r4", max_tokens=MAX_TOKENS, temperature=0.0)
        assert stopped["finish_reason"] == "stop" and stopped["text"] == ""
        kept = engine.generate(PROMPTS[0], "lora-r4", max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        assert kept["finish_reason"] == "length" and kept["text"] == plain["text"]
    finally:
        engine.stop()


def test_step_lock_counts_waiters_and_is_reentrant():
    from nora_peft.serve.scheduler import StepLock

    lock, got = StepLock(), threading.Event()
    assert not lock.contended
    with lock, lock:  # re-entrant
        waiter = threading.Thread(target=lambda: (lock.acquire(), got.set(), lock.release()))
        waiter.start()
        deadline = time.monotonic() + 10
        while not lock.contended and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lock.contended and not got.is_set()
    waiter.join(10)
    assert got.is_set() and not lock.contended


def test_a_thread_waiting_for_the_lock_gets_it_between_decode_steps(serve_env):
    """The scheduler yields only when someone waits, but then it does: the lock is taken mid-generation."""
    engine = make_engine(serve_env)
    try:
        done = threading.Event()
        req = GenRequest(prompt_ids=engine.encode(PROMPTS[0]), adapter="lora-r4", max_tokens=50, ignore_eos=True,
                         on_event=lambda kind, _: done.set() if kind in ("done", "error") else None)  # fmt: skip
        engine.submit(req)
        while not req.generated:
            time.sleep(0.005)
        with engine.lock:
            assert req.finished is None and 0 < len(req.generated) < 50  # taken while the row still decodes
        assert done.wait(120) and req.finished == "length"
    finally:
        engine.stop()


def test_float32_batched_greedy_equals_each_request_alone(serve_env):
    """docs/serving.md's promise: in float32 a greedy output does not depend on its batch neighbours (the rows of a
    batch, their adapters and lengths), so it equals the same request served alone."""
    base32 = copy.deepcopy(serve_env.base).to(torch.float32)
    engine = make_engine(serve_env, base=base32, max_adapters=8, max_batch_size=16, batch_wait_ms=0.0)
    jobs = [(None if m == "base" else m, p) for m in ["base", *ADAPTER_SPECS] for p in PROMPTS]
    options = dict(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    try:
        alone = [engine.generate(p, adapter=m, **options)["text"] for m, p in jobs]
        done: dict[int, str] = {}
        finished = threading.Event()

        def listener(i: int):
            def on_event(kind, payload):
                if kind != "delta":
                    done[i] = payload["text"] if kind == "done" else f"error {payload}"
                    if len(done) == len(jobs):
                        finished.set()

            return on_event

        with engine.lock:  # every request is queued before the first step: they run in shared batches
            for i, (m, p) in enumerate(jobs):
                engine.submit(GenRequest(prompt_ids=engine.encode(p), adapter=m, on_event=listener(i), **options))
        assert finished.wait(120)
        assert [done[i] for i in range(len(jobs))] == alone
        assert engine.snapshot_metrics()["max_batch_size_seen"] == 16
    finally:
        engine.stop()


def test_unloading_through_the_engine_forgets_the_host_memory_copy(serve_env):
    """The admin unload route goes through the pool's own unload: an adapter evicted into host memory is dropped at
    once (it used to stay there until some later eviction swept it) and its name is a 404 afterwards."""
    engine = make_engine(serve_env, max_adapters=1, max_cpu_adapters=4)
    try:
        held = next(iter(engine.pool.host))  # start-up read every adapter; the ones without a slot wait in host memory
        engine.unload_adapter(held)
        assert held not in engine.pool.host and held not in engine.registry
        with pytest.raises(AdapterError) as err:
            engine.unload_adapter(held)
        assert err.value.status == 404 and err.value.param == "lora_name"
    finally:
        engine.stop()

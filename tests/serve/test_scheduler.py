"""Continuous batching: greedy output equals offline ``PeftModel.generate`` whatever joins or leaves around a request.

Most tests drive the scheduler by hand (``step()`` in the test thread, the background loop never started), so the
arrival of each request between steps is exact and the interleaving is the one the test names.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from nora_peft.serve import GenRequest
from tests.serve.conftest import offline_greedy

LONG = "the cat sat on the mat and the dog ran to the big red house one two three"
CASES = [  # (adapter, prompt, max_tokens)
    ("nora-silu-r4", LONG, 14),
    ("lora-r8", "one two", 4),
    (None, "a big red dog ran to the house", 9),
    ("nora-relu-r8", "blue mat", 11),
    ("rslora-r2", "the cat sat on", 3),
    ("nora-gelu-r2", LONG, 7),
    ("nora-silu-r4", "six seven", 8),
    ("nora-relu-r8", "blue mat", 30),  # outlives a long prefill
]


@pytest.fixture(scope="module")
def references(serve_env) -> dict[tuple, str]:
    out = {}
    for adapter, prompt, n in CASES:
        folder = None if adapter is None else serve_env.adapters_dir / adapter
        out[(adapter, prompt, n)] = offline_greedy(serve_env.base, serve_env.tokenizer, folder, prompt, n)
    return out


@dataclass
class Client:
    """Collects one request's events."""

    deltas: list[str] = field(default_factory=list)
    done: dict | None = None
    error: tuple | None = None
    raise_on_delta: bool = False

    def __call__(self, kind: str, payload) -> None:
        if kind == "delta":
            if self.raise_on_delta:
                raise RuntimeError("the client's stream broke")
            self.deltas.append(payload)
        elif kind == "done":
            self.done = payload
        else:
            self.error = payload

    @property
    def finished(self) -> bool:
        return self.done is not None or self.error is not None


def _by_hand(engine) -> None:
    engine.scheduler.start = lambda: None  # the test calls step() itself


def _submit(engine, adapter, prompt, max_tokens, client=None, **kw) -> tuple[GenRequest, Client]:
    client = client or Client()
    req = GenRequest(engine.encode(prompt), adapter, max_tokens=max_tokens, on_event=client, **kw)
    engine.submit(req)
    return req, client


def _run(engine, arrivals: dict[int, list[int]], steps: int = 400) -> tuple[dict[int, Client], list[int]]:
    """Submit ``CASES[i]`` for ``i in arrivals[step]`` before that step; returns clients and rows per step."""
    clients, rows = {}, []
    for step in range(steps):
        for i in arrivals.get(step, []):
            clients[i] = _submit(engine, *CASES[i])[1]
        engine.scheduler.step()
        rows.append(len(engine.scheduler.batch.rows))
        if step > max(arrivals) and all(c.finished for c in clients.values()):
            break
    return clients, rows


@pytest.mark.parametrize("policy", ["continuous", "wave"])
def test_staggered_arrivals_equal_offline_generation(serve_env, references, policy):
    from tests.serve.conftest import make_engine

    engine = make_engine(serve_env, max_adapters=4, max_batch_size=3, prefill_chunk=3, scheduler=policy)
    _by_hand(engine)
    arrivals = {
        0: [0],
        2: [1],
        3: [2, 3],
        6: [4],
        9: [5, 6],
        12: [7],
    }  # more than 3 rows and 4 adapters want in at times
    clients, rows = _run(engine, arrivals)
    for i, client in clients.items():
        assert client.error is None, client.error
        assert client.done["text"] == references[CASES[i]], CASES[i]
        assert "".join(client.deltas) == client.done["text"]  # the stream adds up to the answer
    assert max(rows) == 3  # the batch filled up
    metrics = engine.snapshot_metrics()
    assert metrics["requests_total"] == len(CASES) and metrics["requests_failed"] == 0
    if policy == "continuous":  # rows joined a running batch: the batch size changed without draining first
        assert any(0 < a < b for a, b in zip(rows, rows[1:]))
    else:  # a wave starts only when the previous one is done
        assert all(not (0 < a < b) for a, b in zip(rows, rows[1:]))


def test_long_prompt_prefill_is_chunked_and_does_not_stall_running_rows(serve_env, references):
    from tests.serve.conftest import make_engine

    engine = make_engine(serve_env, max_batch_size=4, prefill_chunk=2)
    _by_hand(engine)
    running, client = _submit(engine, *CASES[7])
    while running.first_token_at is None:  # BOS "blue mat": two chunks, then it decodes
        engine.scheduler.step()
    long_req, long_client = _submit(engine, *CASES[0])
    counts = []
    while engine.scheduler.group is not None or long_req.first_token_at is None:
        engine.scheduler.step()
        counts.append(len(running.generated))
    chunks = -(-len(long_req.prompt_ids) // 2)
    assert len(counts) == chunks  # the long prompt took one chunk per step ...
    assert counts == list(range(counts[0], counts[0] + chunks))  # ... and the running row got a token every step
    while not (client.finished and long_client.finished):
        engine.scheduler.step()
    assert client.done["text"] == references[CASES[7]] and long_client.done["text"] == references[CASES[0]]


def test_one_rows_errors_fail_only_that_row(serve_env, references):
    from tests.serve.conftest import make_engine

    engine = make_engine(serve_env, max_batch_size=4)
    _by_hand(engine)
    good = [_submit(engine, *CASES[i]) for i in (1, 3)]
    broken_stream = _submit(engine, *CASES[2], client=Client(raise_on_delta=True))[1]
    bad_token = Client()  # a token id outside the vocabulary: the group's prefill fails, retried one row at a time
    engine.submit(GenRequest([1, 10**6], None, max_tokens=3, on_event=bad_token))
    for _ in range(100):
        engine.scheduler.step()
        if all(c.finished for c in [*(c for _, c in good), broken_stream, bad_token]):
            break
    for (_, client), i in zip(good, (1, 3)):
        assert client.error is None and client.done["text"] == references[CASES[i]]
    assert broken_stream.error[0] == 500 and "stream" in broken_stream.error[1]
    assert bad_token.error[0] == 500 and "prompt" in bad_token.error[1]
    assert engine.snapshot_metrics()["requests_failed"] == 2


def test_cancel_and_unload_leave_the_others_running(serve_env, references):
    from tests.serve.conftest import make_engine

    engine = make_engine(serve_env, max_batch_size=4)
    _by_hand(engine)
    keep = _submit(engine, *CASES[0])[1]
    cancelled, _ = _submit(engine, *CASES[3])
    doomed = _submit(engine, "lora-r4", "one two", 10)[1]
    for _ in range(3):
        engine.scheduler.step()
    assert len(engine.scheduler.batch.rows) == 3
    cancelled.cancelled = True
    engine.scheduler.step()
    assert cancelled.finished == "cancelled" and len(engine.scheduler.batch.rows) == 2
    engine.unload_adapter("lora-r4")
    assert doomed.error[0] == 404 and "unloaded" in doomed.error[1]
    assert "lora-r4" not in engine.pool.slots
    while not keep.finished:
        engine.scheduler.step()
    assert keep.done["text"] == references[CASES[0]]
    assert engine.scheduler.batch.rows == [] and engine.scheduler.batch.cache is None


def test_threaded_staggered_arrivals(serve_env, references):
    """The real background loop, requests arriving at random-ish moments from several threads."""
    from tests.serve.conftest import make_engine

    engine = make_engine(serve_env, max_batch_size=4, prefill_chunk=4, batch_wait_ms=1.0)
    results: dict[int, dict] = {}

    def client(i: int) -> None:
        time.sleep(0.004 * i)
        adapter, prompt, n = CASES[i % len(CASES)]
        results[i] = engine.generate(prompt, adapter, max_tokens=n, temperature=0.0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(14)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        engine.stop()
    for i, got in results.items():
        assert got["text"] == references[CASES[i % len(CASES)]]
    assert len(results) == 14 and engine.snapshot_metrics()["max_batch_size_seen"] > 1


def test_prometheus_text(serve_env):
    from tests.serve.conftest import make_engine

    engine = make_engine(serve_env)
    try:
        engine.generate("one two", "lora-r4", max_tokens=3, temperature=0.0)
    finally:
        engine.stop()
    text = engine.prometheus_metrics()
    for needle in (
        "# TYPE nora_time_to_first_token_seconds histogram",
        'nora_time_to_first_token_seconds_bucket{model="lora-r4",le="+Inf"} 1',
        'nora_time_to_first_token_seconds_count{model="lora-r4"} 1',
        "# TYPE nora_inter_token_latency_seconds histogram",
        'nora_e2e_request_latency_seconds_count{model="lora-r4"} 1',
        'nora_requests_total{model="lora-r4",finish_reason="length"} 1',
        "nora_generation_tokens_total 3",
        "nora_queue_depth 0",
        "nora_running_rows 0",
        "nora_adapter_loads_total",
        "nora_adapter_evictions_total 0",
        "# TYPE nora_batch_size histogram",
    ):
        assert needle in text, needle
    buckets = [line for line in text.splitlines() if line.startswith("nora_inter_token_latency_seconds_bucket")]
    counts = [int(line.rsplit(" ", 1)[1]) for line in buckets]
    assert counts == sorted(counts) and counts[-1] == 2  # cumulative; 3 tokens -> 2 gaps

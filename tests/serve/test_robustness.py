"""What a hostile or unlucky client could do to the scheduler and the pool: each case ends cleanly and once.

A failed request gets one error event and is gone (never requeued); a tiny ``top_p`` keeps the top token; adapter
files are read off the step loop (a slow read stalls no running row), only as regular files, only inside
``--adapters-dir``, and refused when their values overflow the compute dtype.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field

import torch

from nora_peft.serve import GenRequest
from nora_peft.serve.scheduler import _sample_one
from tests.serve.conftest import MAX_TOKENS, make_engine


@dataclass
class Events:
    """Every event one request received, in order."""

    deltas: list[str] = field(default_factory=list)
    done: list[dict] = field(default_factory=list)
    errors: list[tuple] = field(default_factory=list)

    def __call__(self, kind: str, payload) -> None:
        {"delta": self.deltas, "done": self.done, "error": self.errors}[kind].append(payload)

    @property
    def finished(self) -> bool:
        return bool(self.done or self.errors)


def _by_hand(engine) -> None:
    engine.scheduler.start = lambda: None  # the test calls step() itself


def _submit(engine, adapter: str | None, prompt: str = "one two", max_tokens: int = 4, **kw) -> Events:
    events = Events()
    engine.submit(GenRequest(engine.encode(prompt), adapter, max_tokens=max_tokens, on_event=events, **kw))
    return events


def _step_until(engine, done, timeout: float = 30.0) -> None:
    """Step by hand until ``done()`` (adapter reads run in the background, so this may take a few steps)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the requests did not finish"
        engine.scheduler.step()
        time.sleep(0.001)


# -- 1. a failed request fails once ----------------------------------------------------------------------------
def test_queued_requests_of_an_unloaded_adapter_fail_once(serve_env):
    engine = make_engine(serve_env, max_batch_size=4)
    _by_hand(engine)
    queued = [_submit(engine, "lora-r4") for _ in range(3)]
    engine.unload_adapter("lora-r4")
    for _ in range(20):  # before the fix every step failed them again (millions of events a minute)
        engine.scheduler.step()
    assert [len(e.errors) for e in queued] == [1, 1, 1]
    assert all(e.errors[0][0] == 404 and "unloaded" in e.errors[0][1] for e in queued)
    assert not engine.scheduler.waiting
    assert engine.snapshot_metrics()["requests_failed"] == 3


def test_requests_whose_adapter_cannot_be_read_fail_once(serve_env, tmp_path):
    adapters = tmp_path / "adapters"
    for name in ("lora-r4", "nora-silu-r4"):
        shutil.copytree(serve_env.adapters_dir / name, adapters / name)
    engine = make_engine(serve_env, adapters_dir=str(adapters), max_adapters=1)
    engine.pool.max_cpu_adapters = 0  # nothing kept in host memory: the evicted adapter must be read again
    _by_hand(engine)
    for name in ("lora-r4", "nora-silu-r4"):  # the second evicts the first
        first = _submit(engine, name)
        _step_until(engine, lambda e=first: e.finished)
        assert first.done, first.errors
    shutil.rmtree(adapters / "lora-r4")
    doomed = [_submit(engine, "lora-r4") for _ in range(5)]
    _step_until(engine, lambda: all(e.finished for e in doomed))
    for _ in range(20):
        engine.scheduler.step()
    assert [len(e.errors) for e in doomed] == [1] * 5 and not any(e.done for e in doomed)
    assert all(e.errors[0][0] == 400 and "lora-r4" in e.errors[0][1] for e in doomed)
    assert str(tmp_path) not in doomed[0].errors[0][1]
    assert not engine.scheduler.waiting
    assert engine.snapshot_metrics()["requests_failed"] == 5


# -- 8. a tiny top_p keeps the top token ------------------------------------------------------------------------
def test_tiny_top_p_samples_the_top_token():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for row in logits:
        for seed in range(5):
            req = GenRequest([1], None, temperature=1.0, top_p=1e-300)
            assert _sample_one(row, req, torch.Generator().manual_seed(seed)) == int(row.argmax())


def test_tiny_top_p_request_equals_greedy(serve_env):
    engine = make_engine(serve_env)
    _by_hand(engine)
    events = _submit(engine, None, "one two", MAX_TOKENS, temperature=1.0, top_p=1e-300, seed=3)
    _step_until(engine, lambda: events.finished)
    assert not events.errors, events.errors
    assert events.done[0]["text"] == serve_env.expected[("base", "one two")]

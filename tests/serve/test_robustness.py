"""What a hostile or unlucky client could do to the scheduler and the pool: each case ends cleanly and once.

A failed request gets one error event and is gone (never requeued); a tiny ``top_p`` keeps the top token; adapter
files are read off the step loop (a slow read stalls no running row), only as regular files, only inside
``--adapters-dir``, and refused when their values overflow the compute dtype.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from nora_peft.serve import Engine, GenRequest, ServeConfig
from nora_peft.serve.scheduler import _sample_one
from tests.adapter_files import edit_tensors
from tests.serve.conftest import MAX_TOKENS, make_engine, serve
from tests.test_checkpoint import finishes_within, nested_safetensors


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


def _no_host_memory(engine) -> None:
    """Adapters without a slot are not kept in host memory: each reload reads its folder."""
    engine.pool.max_cpu_adapters = 0
    engine.pool.host.clear()


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
    _no_host_memory(engine)  # the evicted adapter must be read again
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


# -- 3. adapter files are read off the step loop -----------------------------------------------------------------
def _wait(events: list[Events], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not all(e.finished for e in events):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def gated_reads(monkeypatch):
    """``read_checkpoint`` in the pool waits for ``gate`` (a slow disk) once the test sets ``lock`` (the engine's step
    lock), noting whether the reading thread held it."""
    from nora_peft.serve import pool as pool_module

    gate, started, held = threading.Event(), threading.Event(), []
    real = pool_module.read_checkpoint

    def slow_read(*args, **kwargs):
        if gated_reads.lock is None:  # not armed yet: the engine's start-up reads
            return real(*args, **kwargs)
        held.append(gated_reads.lock._lock._is_owned())  # RLock: does this thread hold the step lock?
        started.set()
        gate.wait(60)
        return real(*args, **kwargs)

    gated_reads = SimpleNamespace(gate=gate, started=started, held=held, lock=None)
    monkeypatch.setattr(pool_module, "read_checkpoint", slow_read)
    yield gated_reads
    gate.set()


def test_a_slow_adapter_read_stalls_no_running_row(serve_env, gated_reads):
    engine = make_engine(serve_env, max_adapters=1, batch_wait_ms=0)
    _no_host_memory(engine)  # the evicted adapters are read again from their folders
    gated_reads.lock = engine.lock
    steps, step = [], engine.scheduler.step
    engine.scheduler.step = lambda: (steps.append(1), step())
    engine.start()
    try:
        evicted = _submit(engine, "lora-r8", "one two", MAX_TOKENS)
        assert gated_reads.started.wait(10)
        time.sleep(0.5)
        assert len(steps) < 150, len(steps)  # waiting for a read, the idle loop looks every 5 ms: it does not spin
        base = _submit(engine, None, "one two", MAX_TOKENS)
        assert _wait([base], 10), "the base request waited for another adapter's read"  # before: it hung
        assert base.done[0]["text"] == serve_env.expected[("base", "one two")]
        assert not evicted.finished
        gated_reads.gate.set()
        assert _wait([evicted], 10)
        assert evicted.done[0]["text"] == serve_env.expected[("lora-r8", "one two")]
        assert gated_reads.held == [False]  # read in a reader thread, never with the step lock
    finally:
        gated_reads.gate.set()
        engine.stop()


def test_a_read_past_its_deadline_fails_its_requests_once_with_504(serve_env, gated_reads):
    engine = make_engine(serve_env, max_adapters=1, batch_wait_ms=0)
    _no_host_memory(engine)
    engine.pool.read_timeout_s = 0.3
    gated_reads.lock = engine.lock
    engine.start()
    try:
        stuck = [_submit(engine, "lora-r8") for _ in range(3)]
        assert _wait(stuck, 10)
        assert [len(e.errors) for e in stuck] == [1, 1, 1] and all(e.errors[0][0] == 504 for e in stuck)
        assert "took over 0.3s" in stuck[0].errors[0][1]
        fine = _submit(engine, None, "one two", MAX_TOKENS)
        assert _wait([fine], 10) and fine.done[0]["text"] == serve_env.expected[("base", "one two")]
    finally:
        gated_reads.gate.set()
        engine.stop()


def test_a_fifo_in_place_of_a_weights_file_fails_its_requests_promptly(serve_env, tmp_path):
    adapters = tmp_path / "adapters"
    for name in ("lora-r4", "lora-r8"):
        shutil.copytree(serve_env.adapters_dir / name, adapters / name)
    engine = make_engine(serve_env, adapters_dir=str(adapters), max_adapters=1, batch_wait_ms=0)
    _no_host_memory(engine)
    (adapters / "lora-r8" / "adapter_model.safetensors").unlink()
    os.mkfifo(adapters / "lora-r8" / "adapter_model.safetensors")
    engine.start()
    try:
        doomed = _submit(engine, "lora-r8")
        base = _submit(engine, None, "one two", MAX_TOKENS)
        assert _wait([doomed, base], 10), "a FIFO froze generation"  # before: open() waited for a writer
        assert doomed.errors[0][0] == 400 and "not a regular file" in doomed.errors[0][1]
        assert base.done[0]["text"] == serve_env.expected[("base", "one two")]
    finally:
        engine.scheduler._stop.set()  # no join: before the fix the loop is stuck for good
        if not engine.lock.contended and engine.lock.acquire(timeout=1):
            engine.lock.release()
            engine.stop()


# -- 2, 3, 6, 7. hostile adapter folders: a logged skip at start-up (never a hang), a 400 at load ---------------
def _nested_config(folder: Path) -> None:
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)


def _nested_header(folder: Path) -> None:
    nested_safetensors(folder / "adapter_model.safetensors")


def _link_out(folder: Path) -> None:
    """The config becomes a link to a file outside the adapters dir, with a field a message could echo."""
    secret = folder.parent.parent / "secret.json"
    config = json.loads((folder / "adapter_config.json").read_text())
    secret.write_text(json.dumps({**config, "peft_type": SECRET}))
    (folder / "adapter_config.json").unlink()
    os.symlink(secret, folder / "adapter_config.json")


def _huge_fp64(folder: Path) -> None:
    def change(tensors):
        for k, v in tensors.items():
            if "lora_A" in k:
                tensors[k] = v.to(torch.float64)
                tensors[k][0, 0] = 1e300  # finite in float64, inf in the float32 model

    edit_tensors(folder, change)


def _fifo(folder: Path, file: str = "adapter_model.safetensors") -> None:
    (folder / file).unlink()
    os.mkfifo(folder / file)


SECRET = "TOPSECRET-7f3a"
HOSTILE = {  # name -> (spoil, what the message says)
    "nested-config": (_nested_config, "nested too deeply"),
    "nested-header": (_nested_header, "nested too deeply"),
    "link-out": (_link_out, "a link to a file outside"),
    "huge-fp64": (_huge_fp64, "too large for float32"),
    "fifo": (_fifo, "not a regular file"),
    "fifo-config": (lambda f: _fifo(f, "adapter_config.json"), "not a regular file"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_adapter_is_skipped_at_startup_and_400_at_load(serve_env, tmp_path, caplog, name):
    spoil, needle = HOSTILE[name]
    adapters = tmp_path / "adapters"
    shutil.copytree(serve_env.adapters_dir / "lora-r4", adapters / "good")
    shutil.copytree(serve_env.adapters_dir / "lora-r4", adapters / name)
    spoil(adapters / name)
    with caplog.at_level(logging.ERROR, logger="nora_peft.serve"):
        engine = finishes_within(
            20,
            Engine,
            copy.deepcopy(serve_env.base).float(),
            serve_env.tokenizer,
            ServeConfig(adapters_dir=str(adapters)),
        )
    assert set(engine.registry) == {"good"}
    logged = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert logged and needle in logged[0], caplog.text
    server = serve(engine)
    try:
        body = {"lora_name": "again", "lora_path": name}
        r = httpx.post(f"{server.url}/v1/load_lora_adapter", json=body, timeout=30)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert needle in message and str(tmp_path) not in message and SECRET not in message
        body = {"model": "good", "prompt": "one two", "max_tokens": 2, "temperature": 0}
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).status_code == 200
    finally:
        server.stop()

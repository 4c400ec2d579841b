"""Iteration-level scheduling (vLLM / TGI style continuous batching) over one base model with many adapters.

Every iteration of the loop (:meth:`Scheduler.step`):

1. **Admit.** Waiting requests join a *prefill group* as soon as the running batch has room (``max_batch_size``
   rows) and their adapter can get a pool slot (adapters of running rows are pinned, never evicted). A request
   whose adapter is being read (the pool reads files in its own threads, never in a step) waits in the queue
   while the others go on.
2. **Prefill, one chunk.** The group's prompts (left-padded together) advance into the group's own KV cache by
   ``prefill_chunk // rows`` positions (a token budget per iteration, like vLLM's chunked prefill). A long prompt
   therefore costs the running rows one chunk of delay per iteration, not its whole prefill. When the group's
   prompts are done, each row samples its first token and the group's cache is merged into the running batch's
   cache (left-padded to a common length).
3. **Decode, one token** for every running row: one forward for the batch, each row with its own adapter (the
   :class:`~nora_peft.serve.layers.StepMapping`, rebuilt only when rows join or leave), its own sampling parameters and
   its own stop conditions. Finished and cancelled rows leave at once; their KV rows are dropped
   (``DynamicCache.batch_select_indices``) and columns that became padding for every row are cut.

The KV cache is transformers' ``DynamicCache``; a row's positions are its own (``position_ids``), so a row's keys
and values do not depend on which rows share its batch or how much left padding it got: greedy output equals the
request's offline generation whatever joins or leaves around it (``tests/serve/test_scheduler.py``).

``policy="wave"`` keeps the old static batching for comparison (``nora bench --what load``): a group is admitted
only when nothing is running, and it runs until its last row finishes.

Isolation: an error that belongs to one row (sampling, detokenizing, its stream callback, loading its adapter)
fails that row only, with one error event; a failed request never returns to the queue. A failing prefill of
several rows is retried one row at a time, so only the row that causes it fails. A failing decode step fails the
rows in it (their cache is gone) and the loop goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args

import torch
import torch.nn as nn
from transformers import DynamicCache

from .config import Policy
from .errors import AdapterError, timeout_message
from .layers import SlotStacks, StepMapping
from .metrics import ServeMetrics

log = logging.getLogger("nora_peft.serve")

#: How often an otherwise idle loop looks again at requests whose adapters are being read (seconds).
STALL_POLL_S = 0.005


class StepLock:
    """The engine's re-entrant lock: the scheduler holds it for one step at a time, adapter loads and unloads (and
    tests) take it between steps. It counts the threads waiting for it, so the scheduler yields the CPU after a step
    only when one is: an unconditional ``time.sleep(0)`` gives away a whole time slice whenever the machine is busy
    (measured: 48 tokens in 1.9 s instead of 1.45 s with two other busy processes on two cores)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._count = threading.Lock()
        self._waiting = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self._count:
            self._waiting += 1
        try:
            return self._lock.acquire(blocking, timeout)
        finally:
            with self._count:
                self._waiting -= 1

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def contended(self) -> bool:
        """Whether another thread is waiting for the lock (or about to take it)."""
        return self._waiting > 0


@dataclass
class GenRequest:
    """One generation request; ``on_event(kind, payload)`` receives ``("delta", str)``, then ``("done", dict)`` or
    ``("error", (status, message))``, from the scheduler thread. Set ``cancelled`` to drop it."""

    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # EOS does not end the request; max_tokens and stop strings still do
    on_event: Callable[[str, Any], None] = lambda kind, payload: None
    model: str | None = None  # the name the client used (metrics label); default: the adapter or "base"
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    prefill_alone: bool = False  # set after a failed group prefill: this request is retried in a group of its own
    # generation state
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finished: str | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None


@dataclass
class _Row:
    """A request in the running batch (or in a prefill group)."""

    req: GenRequest
    slot: int  # pool slot (-1: base model)
    generator: torch.Generator | None
    position: int = 0  # the position id of the next token fed
    last_token: int = 0
    solo: bool = False  # prefill alone (after a group prefill failed)


@dataclass
class _Group:
    """Rows whose prompts are being prefilled together (left-padded), chunk by chunk."""

    rows: list[_Row]
    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    done: int = 0  # columns prefilled so far
    cache: DynamicCache = field(default_factory=DynamicCache)


@dataclass
class _Batch:
    """The running rows and their KV cache; ``mask`` is ``(rows, cached columns)``."""

    rows: list[_Row] = field(default_factory=list)
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None
    mapping: StepMapping | None = None  # rebuilt when rows join or leave


class Scheduler:
    """The background loop: a bounded waiting queue, prefill groups and the running batch.

    Args:
        model: the base model (adapted layers wired to ``stacks``).
        tokenizer: decodes generated tokens for streaming and stop strings.
        stacks: the slot layout the per-step mapping is built from.
        slot_for: ``slot_for(request, pinned)`` -> the pool slot for the request's adapter (loading it if needed;
            ``-1`` for the base; ``None`` while the adapter is read off the step loop: the request waits and is
            asked for again next step); raises :class:`AdapterError` (status 503 while every slot is pinned; any
            other error fails the request once).
        metrics: where latencies and counters go.
        lock: held during every step (adapter loads and unloads take it too).
        eos_ids, pad_id: end-of-sequence ids and the padding id.
        policy: ``"continuous"`` (iteration-level) or ``"wave"`` (static batches).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        stacks: SlotStacks,
        slot_for: Callable[[GenRequest, set[str]], int],
        metrics: ServeMetrics,
        lock: StepLock,
        *,
        eos_ids: set[int],
        pad_id: int,
        max_batch_size: int = 16,
        max_queue: int = 256,
        batch_wait_s: float = 0.005,
        request_timeout_s: float,
        prefill_chunk: int = 128,
        policy: Policy = "continuous",
    ) -> None:
        if policy not in get_args(Policy):
            raise ValueError(f"policy must be one of {get_args(Policy)}; got {policy!r}.")
        if max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1.")
        self.model, self.tokenizer, self.stacks, self.slot_for = model, tokenizer, stacks, slot_for
        self.metrics, self.lock = metrics, lock
        self.eos_ids, self.pad_id = eos_ids, pad_id
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.batch_wait_s, self.request_timeout_s = batch_wait_s, request_timeout_s
        self.prefill_chunk, self.policy = prefill_chunk, policy
        self.device = next(model.parameters()).device
        self.waiting: deque[GenRequest] = deque()
        self.cv = threading.Condition()
        self.group: _Group | None = None
        self.batch = _Batch()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stalled = False  # the last admission found only requests that wait (see _wait_for_work)

    # -- the public side ----------------------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        """Queue ``req``; raises ``AdapterError(503)`` when ``max_queue`` requests are already waiting."""
        with self.cv:
            if len(self.waiting) >= self.max_queue:
                self.metrics.rejected("queue_full")
                raise AdapterError("The server is busy (request queue full); retry later.", status=503)
            self.waiting.append(req)
            self.cv.notify()
        self.start()

    def queue_depth(self) -> int:
        return len(self.waiting)

    def running_rows(self) -> int:
        return len(self.batch.rows) + (len(self.group.rows) if self.group else 0)

    def pinned(self) -> set[str]:
        """Adapters of the rows in flight (never evicted while they run)."""
        rows = self.batch.rows + (self.group.rows if self.group else [])
        return {r.req.adapter for r in rows if r.req.adapter is not None}

    def abort_adapter(self, name: str, status: int, message: str) -> None:
        """Fail the requests that use adapter ``name``, queued or in flight (call with ``lock`` held, e.g. before
        unloading it); each gets one error event and is gone."""
        with self.cv:
            queued = [req for req in self.waiting if req.adapter == name]
            self.waiting = deque(req for req in self.waiting if req.adapter != name)
        for req in queued:
            self._fail(req, status, message)
        if self.group and any(r.req.adapter == name for r in self.group.rows):
            for row in self.group.rows:  # the group shares one cache: the others start again
                if row.req.adapter == name:
                    self._fail(row.req, status, message)
                elif row.req.finished is None:
                    self._requeue(row.req)
            self.group = None
        self._drop(lambda row: row.req.adapter == name, status, message)

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="nora-serve-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the loop; every request still waiting or running gets a 503."""
        self._stop.set()
        with self.cv:
            self.cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self.lock, self.cv:
            for req in [*self.waiting, *(r.req for r in self.batch.rows)]:
                self._fail(req, 503, "The server is shutting down.")
            for row in self.group.rows if self.group else []:
                self._fail(row.req, 503, "The server is shutting down.")
            self.waiting.clear()
            self.batch, self.group = _Batch(), None

    # -- the loop -----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._wait_for_work():
                continue
            with self.lock:
                try:
                    self.step()
                except Exception:  # the loop never dies; step() already failed the rows concerned
                    log.exception("scheduler step failed")
            if self.lock.contended:
                time.sleep(0)  # let the thread waiting for the lock (adapter load / unload) take it between steps

    def _wait_for_work(self) -> bool:
        """Block while idle; when the first request arrives, wait ``batch_wait_s`` for company. While every waiting
        request waits for its adapter's read, look again every ``STALL_POLL_S`` (a submit wakes the loop at once)."""
        if self.batch.rows or self.group:
            return True
        with self.cv:
            stalled, self._stalled = self._stalled and bool(self.waiting), False
            if not self.waiting or stalled:
                self.cv.wait(timeout=STALL_POLL_S if stalled else 0.05)
                if not self.waiting:
                    return False
        if not stalled and self.batch_wait_s > 0 and len(self.waiting) < self.max_batch_size:
            time.sleep(self.batch_wait_s)
        return True

    def step(self) -> None:
        """One iteration: admit, one prefill chunk, one decode step."""
        if self.group is None and (self.policy == "continuous" or not self.batch.rows):
            self.group = self._admit()
        if self.group is not None:
            self._prefill_chunk()
        if self.batch.rows:
            self._decode()

    # -- admission ------------------------------------------------------------------------------------------------
    def _admit(self) -> _Group | None:
        room = self.max_batch_size - len(self.batch.rows)
        rows: list[_Row] = []
        pinned = self.pinned()
        deferred: list[GenRequest] = []
        now = time.monotonic()
        while room > len(rows):
            with self.cv:
                if not self.waiting:
                    break
                req = self.waiting.popleft()
            if req.finished is not None:  # failed or finished elsewhere (e.g. its adapter was unloaded): gone
                continue
            if req.cancelled:
                self._finish_cancelled(req)
                continue
            if now - req.enqueued > self.request_timeout_s:
                self.metrics.rejected("timeout")
                self._fail(req, 503, timeout_message(self.request_timeout_s))
                continue
            row = self._row_for(req, pinned)
            if row is None:
                if req.finished is None:  # waiting for a slot or for its adapter's read; a failed one is dropped
                    deferred.append(req)
                continue
            if row.solo and rows:  # retried alone after a failed group prefill
                deferred.append(req)
                break
            rows.append(row)
            if row.solo:
                break
        with self.cv:
            self.waiting.extendleft(reversed(deferred))
        # nothing to run and every waiting request waits (for an adapter read): the loop sleeps instead of spinning
        self._stalled = not rows and not self.batch.rows and bool(deferred)
        return self._make_group(rows) if rows else None

    def _row_for(self, req: GenRequest, pinned: set[str]) -> _Row | None:
        """The row for ``req`` (its adapter loaded and pinned), or ``None``: the request waits (for a free slot, or
        while its adapter is read) when ``req.finished`` is still ``None``, else it has failed (once, for good)."""
        try:
            slot = self.slot_for(req, pinned)
            if slot is None:  # its adapter is being read off the step loop: ask again next step
                return None
        except AdapterError as e:
            if e.status == 503 and pinned:  # every slot is busy: wait until a running row leaves
                return None
            self.metrics.rejected("adapter")
            self._fail(req, e.status, str(e))
            return None
        except Exception as e:  # a broken adapter file fails this request only
            self.metrics.rejected("adapter")
            self._fail(req, 500, f"Adapter {req.adapter!r} failed to load: {type(e).__name__}: {e}")
            return None
        if req.adapter is not None:
            pinned.add(req.adapter)
        try:
            generator = _generator(req)
        except Exception as e:
            self._fail(req, 400, f"Invalid sampling parameters: {e}")
            return None
        return _Row(req=req, slot=slot, generator=generator, solo=req.prefill_alone)

    def _make_group(self, rows: list[_Row]) -> _Group:
        length = max(len(r.req.prompt_ids) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's last prompt token is in the last column
            n = len(row.req.prompt_ids)
            ids[i, length - n :] = torch.tensor(row.req.prompt_ids)
            mask[i, length - n :] = 1
            row.position = n
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.metrics.group_admitted(len(rows), int(mask.sum()))
        dev = self.device
        return _Group(rows=rows, ids=ids.to(dev), mask=mask.to(dev), positions=positions.to(dev))

    # -- prefill --------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _prefill_chunk(self) -> None:
        group = self.group
        columns = max(1, self.prefill_chunk // len(group.rows))  # a token budget shared by the group's rows
        end = min(group.done + columns, group.ids.shape[1])
        # the last position only, as an index tensor: an int slices a non-contiguous view, and the LM head's matmul
        # on it copies the whole output embedding once per row (seconds on a CPU for a 49k vocabulary)
        last = torch.tensor([end - group.done - 1], device=self.device)
        try:
            mapping = self.stacks.mapping([r.slot for r in group.rows])
            with self.stacks.use(mapping):
                out = self.model(
                    input_ids=group.ids[:, group.done : end],
                    attention_mask=group.mask[:, :end],
                    position_ids=group.positions[:, group.done : end],
                    past_key_values=group.cache,
                    use_cache=True,
                    logits_to_keep=last,
                )
        except Exception as e:
            self.group = None
            self._prefill_failed(group.rows, e)
            return
        group.done = end
        if end < group.ids.shape[1]:
            return
        self.group = None
        tokens = self._sample(out.logits[:, -1], group.rows)
        keep = [i for i, row in enumerate(group.rows) if self._advance(row, tokens[i])]
        if keep:
            self._join(group, keep)

    def _prefill_failed(self, rows: list[_Row], error: Exception) -> None:
        if len(rows) == 1:
            log.exception("prefill failed")
            self._fail(rows[0].req, 500, f"Internal error while reading the prompt: {type(error).__name__}: {error}")
            return
        for row in rows:  # retry one at a time: only the row that causes the failure fails
            row.req.prefill_alone = True
            self._requeue(row.req)

    def _requeue(self, req: GenRequest) -> None:
        with self.cv:
            self.waiting.appendleft(req)

    def _join(self, group: _Group, keep: list[int]) -> None:
        """Merge the prefilled rows ``keep`` of ``group`` into the running batch (KV rows and mask)."""
        index = torch.tensor(keep, device=self.device)
        if len(keep) < len(group.rows):
            group.cache.batch_select_indices(index)
        mask = group.mask.index_select(0, index)
        batch = self.batch
        if not batch.rows:
            batch.cache, batch.mask = group.cache, mask
        else:
            batch.cache, batch.mask = merge_caches(batch.cache, batch.mask, group.cache, mask)
        batch.rows.extend(group.rows[i] for i in keep)
        batch.mapping = None

    # -- decode ---------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _decode(self) -> None:
        batch = self.batch
        rows = batch.rows
        if batch.mapping is None:
            batch.mapping = self.stacks.mapping([r.slot for r in rows])
        n = len(rows)
        ids = torch.tensor([[r.last_token] for r in rows], device=self.device)
        positions = torch.tensor([[r.position] for r in rows], device=self.device)
        mask = torch.cat([batch.mask, batch.mask.new_ones(n, 1)], dim=1)
        try:
            with self.stacks.use(batch.mapping):
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=batch.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        except Exception as e:
            log.exception("decode step failed")
            self._drop(lambda row: True, 500, f"Internal error while generating: {type(e).__name__}: {e}")
            return
        batch.mask = mask
        self.metrics.decode_step(n)
        tokens = self._sample(out.logits[:, -1], rows)
        for row in rows:
            row.position += 1
        finished = {i for i, row in enumerate(rows) if not self._advance(row, tokens[i])}
        if finished:
            self._drop(lambda row: row.req.finished is not None, 500, "")

    def _drop(self, which: Callable[[_Row], bool], status: int, message: str) -> None:
        """Remove the rows ``which`` selects from the running batch (failing those not finished yet)."""
        batch = self.batch
        gone = [i for i, row in enumerate(batch.rows) if which(row)]
        if not gone:
            return
        for i in gone:
            if batch.rows[i].req.finished is None:
                self._fail(batch.rows[i].req, status, message)
        keep = [i for i in range(len(batch.rows)) if i not in set(gone)]
        if not keep:
            self.batch = _Batch()
            return
        index = torch.tensor(keep, device=self.device)
        batch.cache.batch_select_indices(index)
        batch.mask = batch.mask.index_select(0, index)
        batch.rows = [batch.rows[i] for i in keep]
        batch.mapping = None
        _trim_left_padding(batch)

    # -- per-row work (errors stay in their row) -------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Greedy for rows at temperature 0 (one argmax for all), temperature / top-p sampling for the others."""
        chosen = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            if row.generator is None or row.req.finished is not None:
                continue
            try:
                chosen[i] = _sample_one(logits[i].float().cpu(), row.req, row.generator)
            except Exception as e:
                self._fail(row.req, 500, f"Sampling failed: {type(e).__name__}: {e}")
        return chosen

    def _advance(self, row: _Row, token: int) -> bool:
        """Append ``token`` to the row's request (stream, stops); ``True`` while the row goes on."""
        req = row.req
        if req.finished is not None:
            return False
        if req.cancelled:
            self._finish_cancelled(req)
            return False
        try:
            row.last_token = token
            self._append(req, token)
        except Exception as e:
            log.exception("row failed")
            self._fail(req, 500, f"Internal error while streaming the answer: {type(e).__name__}: {e}")
        return req.finished is None

    def _append(self, req: GenRequest, token: int) -> None:
        """Append one token: timing, eos / stop strings / max_tokens, and the streamed text."""
        now = time.monotonic()
        self.metrics.token(req, now)
        req.last_token_at = now
        if req.first_token_at is None:
            req.first_token_at = now
        finish = None
        if token in self.eos_ids and not req.ignore_eos:
            finish = "stop"
        else:  # with ignore_eos an EOS counts towards max_tokens; decoding skips it like any special token
            req.generated.append(token)
        text = self.tokenizer.decode(req.generated, skip_special_tokens=True)
        for s in req.stop:
            at = text.find(s)
            if at >= 0:
                text, finish = text[:at], "stop"
        if finish is None and len(req.generated) >= req.max_tokens:
            finish = "length"
        req.text = text
        safe = len(text)
        if finish is None:
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                safe = len(text.rstrip("\ufffd"))
            if req.stop:  # hold back what could be the start of a stop string
                safe = min(safe, len(text) - max(len(s) for s in req.stop) + 1)
        if safe > req.sent:
            delta, req.sent = text[req.sent : safe], safe
            req.on_event("delta", delta)
        if finish is not None:
            req.finished = finish
            self.metrics.finished(req, finish, now)
            req.on_event(
                "done",
                {
                    "text": text,
                    "token_ids": list(req.generated),
                    "finish_reason": finish,
                    "prompt_tokens": len(req.prompt_ids),
                    "completion_tokens": len(req.generated),
                },
            )

    def _finish_cancelled(self, req: GenRequest) -> None:
        req.finished = "cancelled"
        self.metrics.finished(req, "cancelled", time.monotonic())

    def _fail(self, req: GenRequest, status: int, message: str) -> None:
        """End ``req`` with one error event; a request that has already ended (an error included) is left alone."""
        if req.finished is not None:
            return
        req.finished = "error"
        self.metrics.finished(req, "error", time.monotonic())
        try:
            req.on_event("error", (status, message))
        except Exception:
            log.exception("error callback failed")


def _generator(req: GenRequest) -> torch.Generator | None:
    if req.temperature <= 0:
        return None
    g = torch.Generator()
    g.manual_seed(req.seed if req.seed is not None else torch.seed())
    return g


def _sample_one(logits: torch.Tensor, req: GenRequest, generator: torch.Generator) -> int:
    """Temperature / top-p (nucleus) sampling of one row."""
    probs = torch.softmax(logits / req.temperature, -1)
    if req.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < req.top_p
        keep[0] = True  # the most likely token always stays (a tiny top_p is 0 in float32: nothing would be kept)
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def merge_caches(
    cache_a: DynamicCache, mask_a: torch.Tensor, cache_b: DynamicCache, mask_b: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Stack two batches' KV caches row-wise, left-padding the shorter one (its padding is masked out)."""
    length = max(mask_a.shape[1], mask_b.shape[1])

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = length - t.shape[dim]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    layers = []
    for la, lb in zip(cache_a.layers, cache_b.layers, strict=True):
        keys = torch.cat([pad(la.keys, 2), pad(lb.keys, 2)])
        values = torch.cat([pad(la.values, 2), pad(lb.values, 2)])
        layers.append((keys, values))
    return DynamicCache(ddp_cache_data=layers), torch.cat([pad(mask_a, 1), pad(mask_b, 1)])


def _trim_left_padding(batch: _Batch) -> None:
    """Cut cache columns that are padding for every remaining row (they grow when long rows leave)."""
    used = batch.mask.any(0).nonzero()
    start = int(used[0]) if used.numel() else 0
    if start == 0:
        return
    for layer in batch.cache.layers:
        layer.keys = layer.keys[:, :, start:]
        layer.values = layer.values[:, :, start:]
    batch.mask = batch.mask[:, start:]

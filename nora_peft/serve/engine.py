"""The serving engine: one base model, many unmerged adapters, concurrent requests batched through one pass.

* :class:`MultiAdapterLinear` replaces each targeted ``nn.Linear`` of the base model. It holds the stacked weights
  of every adapter in memory (one slot each, padded to the largest rank, see ``nora_peft.mixed``) and adds
  ``mixed_delta(x, stack, index)`` to the base output, where ``index`` (one adapter slot per batch row, ``-1`` for the
  base model) is set by the engine for each forward step.
* :class:`AdapterPool` maps adapter names to slots with an LRU limit; evicted adapters are reloaded from disk on use.
* :class:`Engine` runs a background batching loop: requests wait in a bounded queue; the loop takes up to
  ``max_batch_size`` of them (waiting ``batch_wait_ms`` for company), left-pads their prompts, and generates for all
  of them together with a KV cache -- one forward per token for the whole batch, whichever adapters the rows use
  (static "wave" batching: requests arriving during a wave join the next one). ``metrics`` counts batch sizes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..mixed import StackedAdapters, mixed_delta
from .adapters import check_adapter_name, read_adapter, scan_adapters_dir
from .errors import AdapterError
from .pool import AdapterPool

log = logging.getLogger("nora_peft.serve")


class MultiAdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the stacked weights of all adapters in the pool (one slot each)."""

    def __init__(self, base: nn.Linear, pool: AdapterPool) -> None:
        super().__init__()
        self.base = base
        self.pool = pool
        n = pool.capacity + 1  # the last slot stays zero (rows without an adapter)
        w = base.weight
        self.up = torch.zeros(n, pool.r_max, base.in_features, dtype=w.dtype, device=w.device)
        self.down = torch.zeros(n, base.out_features, pool.r_max, dtype=w.dtype, device=w.device)

    def grow_rank(self, r_max: int) -> None:
        """Re-pad every slot to a larger ``r_max`` (zeros are exact no-ops)."""
        up = self.up.new_zeros(self.up.shape[0], r_max, self.up.shape[2])
        down = self.down.new_zeros(self.down.shape[0], self.down.shape[1], r_max)
        up[:, : self.up.shape[1]] = self.up
        down[:, :, : self.down.shape[2]] = self.down
        self.up, self.down = up, down

    def set_slot(self, slot: int, w_up: torch.Tensor | None, w_down: torch.Tensor | None, scaling: float) -> None:
        """Write one adapter's weights into ``slot`` (``None``: this adapter does not target this layer)."""
        self.up[slot].zero_()
        self.down[slot].zero_()
        if w_up is not None and w_down is not None:
            r = w_up.shape[0]
            self.up[slot, :r] = w_up.to(self.up)
            self.down[slot, :, :r] = w_down.to(self.down) * scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        index = self.pool.index
        if index is None:
            return out
        stack = StackedAdapters(up=self.up, down=self.down, kind=self.pool.kind, kinds=self.pool.kinds, names=())
        return out + mixed_delta(x, stack, index).to(out.dtype)


@dataclass
class GenRequest:
    """One generation request; ``on_event(kind, payload)`` receives ``("delta", str)``, then ``("done", dict)`` or
    ``("error", (status, message))``, from the engine thread."""

    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    on_event: Callable[[str, Any], None] = lambda kind, payload: None
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # generation state
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finished: str | None = None


class Engine:
    """Base model + adapter pool + background batching loop. Thread-safe ``submit``; ``generate`` for offline use."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        adapters_dir: str | None = None,
        max_adapters: int = 8,
        max_batch_size: int = 16,
        max_queue: int = 256,
        batch_wait_ms: float = 5.0,
        request_timeout_s: float = 120.0,
        max_prompt_tokens: int | None = None,
        base_name: str = "base",
        allow_external_paths: bool = False,
        add_bos: bool | None = None,
    ) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.base_name = base_name
        self.adapters_dir = adapters_dir
        self.allow_external_paths = allow_external_paths
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.request_timeout_s = request_timeout_s
        ctx = getattr(model.config, "max_position_embeddings", None) or 2048
        self.context_len = int(ctx)
        self.max_prompt_tokens = int(max_prompt_tokens or self.context_len - 1)
        # like training (nora_peft.lab.data.formatting): text prompts start with BOS when the tokenizer has one and no
        # chat template, unless the tokenizer already adds it
        self.add_bos = (
            (tokenizer.bos_token_id is not None and not getattr(tokenizer, "chat_template", None))
            if (add_bos is None)
            else add_bos
        )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        self.pool = AdapterPool(model, max_adapters, MultiAdapterLinear)
        self.registry: dict[str, str] = scan_adapters_dir(adapters_dir)  # every adapter a client may name
        self.queue: queue.Queue[GenRequest] = queue.Queue(maxsize=max_queue)
        self.pending: deque[GenRequest] = deque()
        self.lock = threading.RLock()
        self.metrics: dict[str, Any] = {
            "requests_total": 0,
            "requests_failed": 0,
            "batches_total": 0,
            "steps_total": 0,
            "tokens_generated": 0,
            "max_batch_size_seen": 0,
            "batch_size_hist": Counter(),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        with self.lock:  # load what fits at start (clear errors now rather than at the first request)
            for name in list(self.registry):
                try:
                    adapter = read_adapter(self.registry[name], name)
                    self.pool.check_fits(adapter)
                except AdapterError as e:
                    log.error("skipping adapter %s: %s", name, e)
                    del self.registry[name]
                    continue
                if len(self.pool.slots) < max_adapters:
                    self.pool.add(adapter)

    # -- adapters ---------------------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return [self.base_name, *sorted(self.registry)]

    def load_adapter(self, name: str, path: str) -> None:
        """Register and load adapter ``name`` from ``path`` (relative paths resolve under ``adapters_dir``)."""
        check_adapter_name(name, "lora_name")
        if name == self.base_name:
            raise AdapterError(f"lora_name {name!r} is the base model's name; choose another.", param="lora_name")
        resolved = self._resolve_path(path)
        adapter = read_adapter(resolved, name)
        with self.lock:
            self.pool.add(adapter)
            self.registry[name] = str(resolved)

    def unload_adapter(self, name: str) -> None:
        check_adapter_name(name, "lora_name")
        with self.lock:
            if name not in self.registry:
                raise AdapterError(f"Adapter {name!r} is not loaded; GET /v1/models lists them.", status=404)
            del self.registry[name]
            if name in self.pool.slots:
                self.pool.remove(name)

    def _resolve_path(self, path: object) -> Any:
        from pathlib import Path

        if not isinstance(path, str) or not path:
            raise AdapterError("lora_path must be a non-empty string (an adapter folder).", param="lora_path")
        p = Path(path)
        root = Path(self.adapters_dir).resolve() if self.adapters_dir else None
        if not p.is_absolute():
            if root is None:
                raise AdapterError(
                    "lora_path is relative but the server has no --adapters-dir; pass an absolute path.",
                    param="lora_path",
                )
            p = root / p
        p = p.resolve()
        if not self.allow_external_paths and (root is None or not p.is_relative_to(root)):
            raise AdapterError(
                f"lora_path {path!r} is outside --adapters-dir; put the adapter there, or start the server with "
                "--allow-external-paths.",
                status=403,
                param="lora_path",
            )
        return p

    def _ensure_loaded(self, name: str, pinned: set[str]) -> int:
        slot = self.pool.slot_of(name)
        if slot is None:
            slot = self.pool.add(read_adapter(self.registry[name], name), pinned)
        return slot

    # -- requests ---------------------------------------------------------------------------------------------
    def check_model(self, name: object) -> str | None:
        """The adapter a request's ``model`` names (``None`` for the base); 404 if unknown, 400 if not a name."""
        if name == self.base_name:
            return None
        name = check_adapter_name(name, "model")
        if name not in self.registry:
            raise AdapterError(
                f"The model {name!r} does not exist: serving {self.model_names()}. Load an adapter with POST "
                "/v1/load_lora_adapter.",
                status=404,
                param="model",
            )
        return name

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            ids = list(prompt)
        else:
            ids = self.tokenizer(prompt)["input_ids"]
            if self.add_bos and (not ids or ids[0] != self.tokenizer.bos_token_id):
                ids = [self.tokenizer.bos_token_id, *ids]
        if not ids:
            raise AdapterError("prompt is empty; send at least one token.", param="prompt")
        if len(ids) > self.max_prompt_tokens:
            raise AdapterError(
                f"prompt has {len(ids)} tokens, over the limit of {self.max_prompt_tokens}; shorten it.",
                status=400,
                param="prompt",
            )
        return ids

    def submit(self, req: GenRequest) -> None:
        """Queue ``req``; raises ``AdapterError(503)`` when the queue is full."""
        if len(req.prompt_ids) + req.max_tokens > self.context_len:
            raise AdapterError(
                f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the model's context "
                f"of {self.context_len} tokens; lower max_tokens.",
                param="max_tokens",
            )
        self.start()
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise AdapterError("The server is busy (request queue full); retry later.", status=503) from None

    def generate(self, prompt: str | list[int], adapter: str | None = None, **kwargs: Any) -> dict:
        """Single-request path (blocks): the same loop as the server, e.g. for offline checks."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def on_event(kind: str, payload: Any) -> None:
            if kind in ("done", "error"):
                box[kind] = payload
                done.set()

        self.submit(GenRequest(prompt_ids=self.encode(prompt), adapter=adapter, on_event=on_event, **kwargs))
        done.wait()
        if "error" in box:
            status, message = box["error"]
            raise AdapterError(message, status=status)
        return box["done"]

    # -- the batching loop ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="nora-serve-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        while True:  # fail what is still waiting, so no client hangs
            try:
                req = self.pending.popleft() if self.pending else self.queue.get_nowait()
            except queue.Empty:
                break
            self._fail(req, 503, "The server is shutting down.")

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if not batch:
                continue
            try:
                with self.lock:
                    self._run_batch(batch)
            except Exception as e:  # a failing batch never takes the server down
                log.exception("batch failed")
                for req in batch:
                    if req.finished is None:
                        self._fail(req, 500, f"Internal error while generating: {type(e).__name__}: {e}")

    def _next_batch(self) -> list[GenRequest]:
        batch: list[GenRequest] = []
        while self.pending and len(batch) < self.max_batch_size:
            batch.append(self.pending.popleft())
        try:
            if not batch:
                batch.append(self.queue.get(timeout=0.05))
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                left = deadline - time.monotonic()
                batch.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
        except queue.Empty:
            pass
        now = time.monotonic()
        ready = []
        for req in batch:
            if req.cancelled:
                continue
            if now - req.enqueued > self.request_timeout_s:
                self._fail(req, 503, f"Request waited over {self.request_timeout_s:.0f}s in the queue; retry later.")
                continue
            ready.append(req)
        return ready

    def _assign_slots(self, batch: list[GenRequest]) -> tuple[list[GenRequest], list[int]]:
        """Slot per row; loads evicted adapters; defers rows whose adapters don't fit the pool this time."""
        rows, slots, pinned = [], [], set()
        for req in batch:
            if req.adapter is None:
                rows.append(req)
                slots.append(-1)
                continue
            if req.adapter not in self.registry:
                self._fail(req, 404, f"The model {req.adapter!r} was unloaded.")
                continue
            if req.adapter not in pinned and len(pinned) >= self.pool.capacity:
                self.pending.append(req)
                continue
            try:
                slot = self._ensure_loaded(req.adapter, pinned)
            except AdapterError as e:
                self._fail(req, e.status if e.status != 400 else 500, f"Adapter {req.adapter!r} failed to load: {e}")
                continue
            pinned.add(req.adapter)
            rows.append(req)
            slots.append(slot)
        return rows, slots

    @torch.inference_mode()
    def _run_batch(self, batch: list[GenRequest]) -> None:
        rows, slots = self._assign_slots(batch)
        if not rows:
            return
        n = len(rows)
        self.metrics["batches_total"] += 1
        self.metrics["batch_size_hist"][n] += 1
        self.metrics["max_batch_size_seen"] = max(self.metrics["max_batch_size_seen"], n)
        length = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((n, length), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((n, length), dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):  # left padding: every row's last token is at the same position
            ids[i, length - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, device=self.device)
            mask[i, length - len(r.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [self._generator(r) for r in rows]
        self.pool.index = torch.tensor(slots, device=self.device) if any(s >= 0 for s in slots) else None
        try:
            from transformers import DynamicCache

            cache = DynamicCache()
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )
            for _ in range(max(r.max_tokens for r in rows)):
                self.metrics["steps_total"] += 1
                next_ids = self._choose(out.logits[:, -1].float(), rows, generators)
                for i, r in enumerate(rows):
                    if r.finished is None:
                        self._advance(r, int(next_ids[i]))
                if all(r.finished is not None for r in rows):
                    break
                mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
                positions = positions[:, -1:] + 1
                out = self.model(
                    input_ids=next_ids.view(n, 1).to(self.device),
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
        finally:
            self.pool.index = None

    def _generator(self, req: GenRequest) -> torch.Generator | None:
        if req.temperature <= 0:
            return None
        g = torch.Generator()
        g.manual_seed(req.seed if req.seed is not None else torch.seed())
        return g

    @staticmethod
    def _choose(logits: torch.Tensor, rows: list[GenRequest], generators: list) -> torch.Tensor:
        """Greedy (temperature 0) or temperature / top-p sampling, per row."""
        chosen = logits.argmax(-1).cpu()
        for i, (r, g) in enumerate(zip(rows, generators)):
            if g is None or r.finished is not None:
                continue
            probs = torch.softmax(logits[i].cpu() / r.temperature, -1)
            if r.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < r.top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            chosen[i] = torch.multinomial(probs, 1, generator=g)[0]
        return chosen

    def _advance(self, req: GenRequest, token: int) -> None:
        """Append one token to ``req``: stream the new text, check eos / stop strings / max_tokens."""
        if req.cancelled:
            req.finished = "cancelled"
            return
        self.metrics["tokens_generated"] += 1
        finish = None
        if token in self.eos_ids:
            finish = "stop"
        else:
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
            req.on_event("delta", text[req.sent : safe])
            req.sent = safe
        if finish is not None:
            req.finished = finish
            self.metrics["requests_total"] += 1
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

    def _fail(self, req: GenRequest, status: int, message: str) -> None:
        req.finished = "error"
        self.metrics["requests_failed"] += 1
        req.on_event("error", (status, message))

    def snapshot_metrics(self) -> dict[str, Any]:
        m = dict(self.metrics)
        m["batch_size_hist"] = {str(k): v for k, v in sorted(self.metrics["batch_size_hist"].items())}
        m["queue_depth"] = self.queue.qsize() + len(self.pending)
        m["adapters_known"] = len(self.registry)
        m["adapters_in_memory"] = len(self.pool.slots)
        m["adapter_loads"] = self.pool.loads
        m["adapter_evictions"] = self.pool.evictions
        m["r_max"] = self.pool.r_max
        return m

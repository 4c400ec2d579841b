"""The serving engine: one base model, many unmerged adapters, concurrent requests batched through one pass.

The engine is the façade the HTTP app talks to (``submit`` a request, stream its tokens through ``on_event``, cancel
it with ``req.cancelled = True``). It ties together:

* :class:`~nora_peft.serve.pool.AdapterPool` -- adapter names -> slots, LRU, loading and checks;
* :class:`~nora_peft.serve.layers.MultiAdapterLinear` / ``SlotStacks`` -- stacked adapter slots per rank bucket in
  each targeted linear layer, and the per-step batch mapping;
* :class:`~nora_peft.serve.scheduler.Scheduler` -- iteration-level (continuous) batching, or static waves;
* :class:`~nora_peft.serve.metrics.ServeMetrics` -- Prometheus text and JSON.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch.nn as nn

from ..kernels.attention import ATTENTION, use_folded_decode_attention
from ..prompt import encode_prompt, eos_ids, pad_id
from .config import ServeConfig
from .errors import AdapterError
from .layers import MultiAdapterLinear
from .metrics import ServeMetrics
from .pool import AdapterPool, check_adapter_name
from .scheduler import GenRequest, Scheduler, StepLock

__all__ = ["Engine", "GenRequest", "MultiAdapterLinear"]

log = logging.getLogger("nora_peft.serve")


class Engine:
    """Base model + adapter pool + scheduler. Thread-safe ``submit``; ``generate`` for offline use.

    Every setting comes from ``config`` (:class:`~nora_peft.serve.config.ServeConfig`), e.g. ``scheduler``
    (``"continuous"`` batches per iteration, ``"wave"`` is static batching) and ``prefill_chunk`` (prompt tokens
    prefilled per iteration while other rows decode).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: ServeConfig | None = None) -> None:
        self.config = config = config or ServeConfig()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if use_folded_decode_attention(self.model):  # rows of different lengths: sdpa would copy the KV cache
            log.info("attention: %s (grouped-query decode without repeating KV heads)", ATTENTION)
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.base_name = config.base_name
        self.context_len = int(getattr(model.config, "max_position_embeddings", None) or 2048)
        self.max_prompt_tokens = int(config.max_prompt_tokens or self.context_len - 1)
        self.pool = AdapterPool(
            model,
            config.max_adapters,
            adapters_dir=config.adapters_dir,
            allow_external_paths=config.allow_external_paths,
            max_rank=config.max_lora_rank,
            reserved={config.base_name},
            max_cpu_adapters=config.max_cpu_adapters,
            read_timeout_s=config.adapter_read_timeout_s,
            max_parallel_reads=config.max_parallel_reads,
        )
        self.registry = self.pool.registry  # every adapter a client may name
        self.lock = StepLock()
        self.metrics = self._make_metrics()
        self.scheduler = self._make_scheduler()
        with self.lock:  # load what fits at start; bad adapters are skipped with a logged reason
            self.pool.load_dir()

    def _make_scheduler(self) -> Scheduler:
        config = self.config
        return Scheduler(
            self.model,
            self.tokenizer,
            self.pool.stacks,
            self._slot_for,
            self.metrics,
            self.lock,
            eos_ids=set(eos_ids(self.model, self.tokenizer)),
            pad_id=pad_id(self.tokenizer),
            max_batch_size=config.max_batch_size,
            max_queue=config.max_queue,
            batch_wait_s=config.batch_wait_ms / 1000,
            request_timeout_s=config.request_timeout_s,
            prefill_chunk=config.prefill_chunk,
            policy=config.scheduler,
        )

    # -- adapters ---------------------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return [self.base_name, *sorted(self.registry)]

    def load_adapter(self, name: str, path: str) -> None:
        """Register and load adapter ``name`` from ``path`` (relative paths resolve under ``adapters_dir``)."""
        adapter, folder = self.pool.prepare(name, path)  # checks and reading need no lock
        with self.lock:
            self.pool.install(adapter, folder, self.scheduler.pinned())

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            self.pool.unload(name)  # checks the name, 404 when not loaded; frees its slot and host-memory copy
            self.scheduler.abort_adapter(name, 404, f"The model {name!r} was unloaded.")

    def _slot_for(self, req: GenRequest, pinned: set[str]) -> int | None:
        """The pool slot for ``req``'s adapter (``-1``: the base model), loading it if it was evicted."""
        name = req.adapter
        if name is None:
            return -1
        if name not in self.registry:
            raise AdapterError(f"The model {name!r} was unloaded.", status=404)
        slot = self.pool.slot_of(name)
        if slot is None:
            if name not in pinned and len(pinned) >= self.pool.capacity:
                raise AdapterError("Every adapter slot is in use by running requests.", status=503)
            slot = self.pool.ensure_loaded(name, pinned)  # None while its files are read off the step loop
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

    def encode(self, prompt: str | list[int], *, chat: bool = False) -> list[int]:
        """Token ids of a prompt (text, or ids as they are), checked against ``max_prompt_tokens``. A chat's text
        (:func:`nora_peft.prompt.format_chat`) is encoded as training encodes it: without the tokenizer's own
        special tokens; a completion's text with them. Both then follow the BOS rule."""
        if isinstance(prompt, list):
            ids = list(prompt)
        else:
            ids = encode_prompt(self.tokenizer, prompt, add_special_tokens=not chat)
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
        self.scheduler.submit(req)

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

    # -- the loop and metrics ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        """Stop the scheduler; requests still waiting or running get a 503."""
        self.scheduler.stop()

    def _make_metrics(self) -> ServeMetrics:
        pool = self.pool
        gauges = {
            "nora_queue_depth": ("Requests waiting to be admitted.", lambda: self.scheduler.queue_depth()),
            "nora_running_rows": ("Rows decoding or prefilling.", lambda: self.scheduler.running_rows()),
            "nora_adapters_known": ("Adapters a request may name.", lambda: len(self.registry)),
            "nora_adapters_in_memory": ("Adapters holding a pool slot.", lambda: len(pool.slots)),
            "nora_adapter_weight_bytes": ("Bytes of stacked adapter weights.", lambda: pool.stacks.nbytes()),
            "nora_r_max": ("Largest padded rank held.", lambda: pool.stacks.r_max),
        }
        counters = {
            "nora_adapter_loads_total": ("Adapters written into a slot.", lambda: pool.loads),
            "nora_adapter_evictions_total": ("Adapters evicted (LRU) to free a slot.", lambda: pool.evictions),
        }
        return ServeMetrics(gauges, counters)

    def snapshot_metrics(self) -> dict[str, Any]:
        """The JSON metrics (``GET /metrics?format=json``)."""
        return self.metrics.snapshot()

    def prometheus_metrics(self) -> str:
        """The Prometheus text exposition (``GET /metrics``)."""
        return self.metrics.prometheus()

"""Every ``nora serve`` setting in one frozen :class:`ServeConfig`: built once by the CLI from its flags, passed whole
to the engine, the app and uvicorn, so each limit has one definition and one default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Policy = Literal["continuous", "wave"]


@dataclass(frozen=True)
class ServeConfig:
    """The server's settings (each one a ``nora serve`` flag; docs/serving.md lists them).

    Model and batching:
        base_name: the base model's name in ``model`` fields.
        adapters_dir: folder of adapter folders loaded at start (and where relative ``lora_path`` values resolve).
        allow_external_paths: allow ``lora_path`` outside ``adapters_dir``.
        max_adapters: adapters held in the model's slots (LRU beyond).
        max_cpu_adapters: evicted adapters kept in host memory, most recently used first, so that reloading one reads
            no file (``None``: as many as ``max_adapters``; 0: none).
        adapter_read_timeout_s: how long one adapter's files may take to read; past it that adapter's requests get a
            504 (reads run in background threads, never in the generation loop).
        max_parallel_reads: adapter reads running at once.
        max_lora_rank: largest adapter rank (``None``: min(d, k) of each layer).
        max_batch_size: rows per batched step.
        max_queue: waiting requests before a 503.
        batch_wait_ms: how long a batch waits for company.
        scheduler: ``"continuous"`` (iteration-level batching) or ``"wave"`` (static batches, for comparison).
        prefill_chunk: prompt tokens prefilled per step while other rows decode.
        max_prompt_tokens: prompt length in tokens (``None``: the model's context - 1).

    Security and limits:
        api_key, admin_key: the user key (generate, list) and the admin key (load / unload adapters).
        max_body_bytes: request body size; larger bodies get a 413 before they are read.
        max_prompt_chars: prompt text length checked before tokenizing (``None``: 32 x ``max_prompt_tokens`` -- a
            token is rarely longer than 32 characters). A chat counts its templated text.
        max_stop_strings, max_stop_chars: how many stop strings a request may send, and how long each may be.
        request_timeout_s: how long a request may wait for its first token (queued, or in prefill) before it is
            dropped with a 503 and ``Retry-After``.
        retry_after_s: the ``Retry-After`` seconds sent with 503s.
        header_timeout_s, body_timeout_s: how long a client may take to send its headers / its body (the connection
            is closed after that).
        max_connections: requests in progress at once (``/health`` excepted); more get a JSON 503. Open sockets may
            exceed it by :data:`HEALTH_ROOM`; past that a new connection closes the oldest one that is idle.
        max_connections_per_client: open sockets from one client address; past it the client's oldest idle one is
            closed, or the new one refused with a JSON 503 when none is idle.
    """

    base_name: str = "base"
    adapters_dir: str | None = None
    allow_external_paths: bool = False
    max_adapters: int = 16
    max_cpu_adapters: int | None = None
    adapter_read_timeout_s: float = 30.0
    max_parallel_reads: int = 2
    max_lora_rank: int | None = None
    max_batch_size: int = 16
    max_queue: int = 256
    batch_wait_ms: float = 5.0
    scheduler: Policy = "continuous"
    prefill_chunk: int = 128
    max_prompt_tokens: int | None = None
    api_key: str | None = None
    admin_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int | None = None
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    request_timeout_s: float = 120.0
    retry_after_s: int = 2
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 512
    max_connections_per_client: int = 128

    def __post_init__(self) -> None:
        positive = (
            "max_adapters",
            "max_parallel_reads",
            "max_batch_size",
            "max_queue",
            "prefill_chunk",
            "max_body_bytes",
            "max_connections",
        )
        for name in (*positive, "max_connections_per_client", "max_stop_strings", "max_stop_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}.")
        if self.max_cpu_adapters is not None and self.max_cpu_adapters < 0:
            raise ValueError(f"max_cpu_adapters must be 0 or more; got {self.max_cpu_adapters}.")
        for name in ("request_timeout_s", "header_timeout_s", "body_timeout_s", "adapter_read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds; got {getattr(self, name)}.")
        if self.scheduler not in get_args(Policy):
            raise ValueError(f"scheduler must be one of {get_args(Policy)}; got {self.scheduler!r}.")


#: open sockets allowed beyond ``max_connections``, so a health probe gets in while every request slot is busy
HEALTH_ROOM = 8

"""``nora serve --base PATH_OR_DEFAULT --adapters-dir DIR``: run the OpenAI-compatible server (uvicorn)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .app import Limits

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="default", help="base model folder (HF format), or 'default' (embedded)")
    parser.add_argument("--adapters-dir", default=None, help="folder of adapter folders (or `nora train` run dirs)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-adapters", type=int, default=16, help="adapters held in memory (LRU beyond)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows per batched generation")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for company")
    parser.add_argument("--scheduler", default="continuous", choices=["continuous", "wave"], help="batching policy")
    parser.add_argument("--prefill-chunk", type=int, default=128, help="prompt tokens prefilled per step")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context - 1")
    parser.add_argument("--served-model-name", default=None, help="the base model's name in `model` fields")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="model dtype")
    security = parser.add_argument_group("security and limits (docs/serving.md)")
    security.add_argument(
        "--api-key", default=os.environ.get("NORA_API_KEY"), help="user key: generate, list (env NORA_API_KEY)"
    )
    security.add_argument(
        "--admin-key", default=os.environ.get("NORA_ADMIN_KEY"), help="admin key: load/unload (env NORA_ADMIN_KEY)"
    )
    security.add_argument("--allow-external-paths", action="store_true", help="allow lora_path outside --adapters-dir")
    security.add_argument("--max-lora-rank", type=int, default=None, help="largest adapter rank (default: min(d, k))")
    limits = Limits()
    security.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes, help="request body limit (413)")
    security.add_argument(
        "--max-prompt-chars", type=int, default=None, help="prompt text limit before tokenizing (default 32 x tokens)"
    )
    security.add_argument("--max-stop-strings", type=int, default=limits.max_stop_strings)
    security.add_argument("--max-stop-chars", type=int, default=limits.max_stop_chars, help="length of each stop")
    security.add_argument(
        "--request-timeout", type=float, default=limits.request_timeout_s, help="seconds to a first token (503)"
    )
    security.add_argument("--header-timeout", type=float, default=limits.header_timeout_s, help="seconds for headers")
    security.add_argument("--body-timeout", type=float, default=limits.body_timeout_s, help="seconds for a body")
    security.add_argument("--max-connections", type=int, default=512, help="open connections before 503")


def limits_from_args(args: argparse.Namespace) -> Limits:
    """The :class:`~nora_peft.serve.app.Limits` the flags describe."""
    return Limits(
        max_body_bytes=args.max_body_bytes,
        max_prompt_chars=args.max_prompt_chars,
        max_stop_strings=args.max_stop_strings,
        max_stop_chars=args.max_stop_chars,
        request_timeout_s=args.request_timeout,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
    )


def timed_h11_protocol(header_timeout_s: float, body_timeout_s: float) -> type:
    """uvicorn's h11 protocol with read deadlines: a client gets ``header_timeout_s`` to send a request's headers and
    ``body_timeout_s`` to send its body, else the connection is closed (uvicorn itself only times out idle
    keep-alive connections, so a client sending one header line every few seconds would hold a socket forever)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None
        _read_phase: Any = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._update_read_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._update_read_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._update_read_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            super().connection_lost(exc)

        def _update_read_timer(self) -> None:
            state = self.conn.their_state
            phase = state if state in (h11.IDLE, h11.SEND_BODY) else None
            if phase is self._read_phase:
                return
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None
            self._read_phase = phase
            if phase is not None:
                limit = header_timeout_s if phase is h11.IDLE else body_timeout_s
                self._read_timer = self.loop.call_later(limit, self._read_timed_out, phase)

        def _read_timed_out(self, phase: Any) -> None:
            if self.conn.their_state is phase and not self.transport.is_closing():
                self.logger.info(
                    "closing a connection that sent no complete request %s in time",
                    "headers" if phase is h11.IDLE else "body",
                )
                self.transport.close()

    return TimedH11Protocol


def uvicorn_config(app: Any, limits: Limits, *, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> Any:
    """The uvicorn settings ``nora serve`` runs with: read timeouts (h11 with deadlines) and a connection limit."""
    import uvicorn

    options = {"log_level": "info", "limit_concurrency": 512, "timeout_keep_alive": 5, **kwargs}
    http = timed_h11_protocol(limits.header_timeout_s, limits.body_timeout_s)
    return uvicorn.Config(app, host=host, port=port, http=http, **options)


def load_base(base: str, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any, str]:
    """``(model, tokenizer, served name)`` for a folder, ``default`` (the embedded base) or another named base of
    ``nora_peft.bases.named`` (``smollm2-135m``). ``dtype="auto"``: bf16 on a GPU or on a CPU with bf16 units (decode is
    ~1.7x faster there, measured on smollm2-135m), else the weights' own dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if base in ("", None):
        base = "default"
    if base == "default" or not Path(base).is_dir():
        from ..bases.named import NAMED_BASES, resolve_model  # named bases live with the lab (built or converted once)

        if base not in NAMED_BASES:
            raise SystemExit(
                f"--base {base!r} is neither a folder nor a named base; pass a saved HF model folder or one of "
                f"{', '.join(NAMED_BASES)}."
            )
        folder, name = resolve_model(base), base
    else:
        folder, name = base, Path(base).resolve().name
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    if dtype == "auto" and _bf16_is_fast(device):
        dtype = "bfloat16"
    if dtype != "auto":
        model = model.to(DTYPES[dtype])
    return model.eval(), tokenizer, name


def _bf16_is_fast(device: str) -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    from ..kernels.device import cpu_has_bf16

    return cpu_has_bf16()


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .engine import Engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, tokenizer, name = load_base(args.base, args.device, args.dtype)
    limits = limits_from_args(args)
    engine = Engine(
        model,
        tokenizer,
        adapters_dir=args.adapters_dir,
        max_adapters=args.max_adapters,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        batch_wait_ms=args.batch_wait_ms,
        request_timeout_s=args.request_timeout,
        max_prompt_tokens=args.max_prompt_tokens,
        base_name=args.served_model_name or name,
        allow_external_paths=args.allow_external_paths,
        scheduler=args.scheduler,
        prefill_chunk=args.prefill_chunk,
        max_lora_rank=args.max_lora_rank,
    )
    print(
        f"nora serve: base {engine.base_name!r}, adapters {sorted(engine.registry)}, http://{args.host}:{args.port}/v1"
    )
    app = create_app(engine, api_key=args.api_key, admin_key=args.admin_key, limits=limits)
    config = uvicorn_config(app, limits, host=args.host, port=args.port, limit_concurrency=args.max_connections)
    uvicorn.Server(config).run()
    return 0

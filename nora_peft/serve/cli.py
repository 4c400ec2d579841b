"""``nora serve --base PATH_OR_DEFAULT --adapters-dir DIR``: run the OpenAI-compatible server (uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, get_args

import torch

from .config import Policy, ServeConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``nora serve``'s flags: the model and batching, then security and limits (each a ServeConfig field)."""
    defaults = ServeConfig()
    _add_model_arguments(parser, defaults)
    _add_security_arguments(parser.add_argument_group("security and limits (docs/serving.md)"), defaults)


def _add_model_arguments(parser: argparse.ArgumentParser, defaults: ServeConfig) -> None:
    parser.add_argument("--base", default="default", help="base model folder (HF format), or 'default' (embedded)")
    parser.add_argument("--adapters-dir", default=None, help="folder of adapter folders (or `nora train` run dirs)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--max-adapters", type=int, default=defaults.max_adapters, help="adapters held in memory (LRU beyond)"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=defaults.max_batch_size, help="rows per batched generation"
    )
    parser.add_argument(
        "--max-cpu-adapters",
        type=int,
        default=None,
        help="evicted adapters kept in host memory (default: --max-adapters; 0: none)",
    )
    parser.add_argument(
        "--adapter-read-timeout",
        type=float,
        default=defaults.adapter_read_timeout_s,
        help="seconds one adapter's files may take to read (504 past it)",
    )
    parser.add_argument(
        "--max-parallel-reads", type=int, default=defaults.max_parallel_reads, help="adapter reads at once"
    )
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue, help="waiting requests before 503")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=defaults.batch_wait_ms, help="how long a batch waits for company"
    )
    parser.add_argument("--scheduler", default=defaults.scheduler, choices=get_args(Policy), help="batching policy")
    parser.add_argument(
        "--prefill-chunk", type=int, default=defaults.prefill_chunk, help="prompt tokens prefilled per step"
    )
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context - 1")
    parser.add_argument("--served-model-name", default=None, help="the base model's name in `model` fields")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="model dtype")


def _add_security_arguments(security: argparse._ArgumentGroup, defaults: ServeConfig) -> None:
    security.add_argument(
        "--api-key", default=os.environ.get("NORA_API_KEY"), help="user key: generate, list (env NORA_API_KEY)"
    )
    security.add_argument(
        "--admin-key", default=os.environ.get("NORA_ADMIN_KEY"), help="admin key: load/unload (env NORA_ADMIN_KEY)"
    )
    security.add_argument("--allow-external-paths", action="store_true", help="allow lora_path outside --adapters-dir")
    security.add_argument("--max-lora-rank", type=int, default=None, help="largest adapter rank (default: min(d, k))")
    security.add_argument(
        "--max-body-bytes", type=int, default=defaults.max_body_bytes, help="request body limit (413)"
    )
    security.add_argument(
        "--max-prompt-chars", type=int, default=None, help="prompt text limit before tokenizing (default 32 x tokens)"
    )
    security.add_argument("--max-stop-strings", type=int, default=defaults.max_stop_strings)
    security.add_argument("--max-stop-chars", type=int, default=defaults.max_stop_chars, help="length of each stop")
    security.add_argument(
        "--request-timeout", type=float, default=defaults.request_timeout_s, help="seconds to a first token (503)"
    )
    security.add_argument("--header-timeout", type=float, default=defaults.header_timeout_s, help="seconds for headers")
    security.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s, help="seconds for a body")
    security.add_argument(
        "--max-connections", type=int, default=defaults.max_connections, help="requests in progress before a 503"
    )
    security.add_argument(
        "--max-connections-per-client",
        type=int,
        default=defaults.max_connections_per_client,
        help="open sockets per client address (its oldest idle one is closed past it)",
    )


def config_from_args(args: argparse.Namespace, base_name: str) -> ServeConfig:
    """The :class:`~nora_peft.serve.config.ServeConfig` the flags describe (``base_name``: the served base's name
    unless ``--served-model-name`` says otherwise)."""
    return ServeConfig(
        base_name=args.served_model_name or base_name,
        adapters_dir=args.adapters_dir,
        allow_external_paths=args.allow_external_paths,
        max_adapters=args.max_adapters,
        max_cpu_adapters=args.max_cpu_adapters,
        adapter_read_timeout_s=args.adapter_read_timeout,
        max_parallel_reads=args.max_parallel_reads,
        max_lora_rank=args.max_lora_rank,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        batch_wait_ms=args.batch_wait_ms,
        scheduler=args.scheduler,
        prefill_chunk=args.prefill_chunk,
        max_prompt_tokens=args.max_prompt_tokens,
        api_key=args.api_key,
        admin_key=args.admin_key,
        max_body_bytes=args.max_body_bytes,
        max_prompt_chars=args.max_prompt_chars,
        max_stop_strings=args.max_stop_strings,
        max_stop_chars=args.max_stop_chars,
        request_timeout_s=args.request_timeout,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        max_connections=args.max_connections,
        max_connections_per_client=args.max_connections_per_client,
    )


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
    from .guard import uvicorn_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, tokenizer, name = load_base(args.base, args.device, args.dtype)
    try:
        config = config_from_args(args, name)
    except ValueError as e:
        raise SystemExit(f"nora serve: {e}") from None
    engine = Engine(model, tokenizer, config)
    print(
        f"nora serve: base {engine.base_name!r}, adapters {sorted(engine.registry)}, http://{args.host}:{args.port}/v1"
    )
    server_config = uvicorn_config(create_app(engine), config, host=args.host, port=args.port)
    uvicorn.Server(server_config).run()
    return 0

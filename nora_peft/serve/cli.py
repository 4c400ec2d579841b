"""``nora serve --base PATH_OR_DEFAULT --adapters-dir DIR``: run the OpenAI-compatible server (uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch

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
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds a request may wait queued")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context - 1")
    parser.add_argument("--served-model-name", default=None, help="the base model's name in `model` fields")
    parser.add_argument(
        "--api-key", default=os.environ.get("NORA_API_KEY"), help="require 'Bearer KEY' (env NORA_API_KEY)"
    )
    parser.add_argument("--allow-external-paths", action="store_true", help="allow lora_path outside --adapters-dir")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="model dtype")


def load_base(base: str, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any, str]:
    """``(model, tokenizer, served name)`` for a folder or ``default`` (the embedded base from nora_peft.lab.base)."""
    if base in ("default", "", None):
        from ..lab.base import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(None)
        from ..lab.base import DEFAULT_BASE_NAME

        name = DEFAULT_BASE_NAME
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(base).is_dir():
            raise SystemExit(f"--base {base!r} is not a folder; pass a saved HF model folder or 'default'.")
        model = AutoModelForCausalLM.from_pretrained(base)
        tokenizer = AutoTokenizer.from_pretrained(base)
        name = Path(base).resolve().name
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    if dtype != "auto":
        model = model.to(DTYPES[dtype])
    return model.eval(), tokenizer, name


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .engine import Engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, tokenizer, name = load_base(args.base, args.device, args.dtype)
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
    )
    print(
        f"nora serve: base {engine.base_name!r}, adapters {sorted(engine.registry)}, http://{args.host}:{args.port}/v1"
    )
    uvicorn.run(create_app(engine, api_key=args.api_key), host=args.host, port=args.port, log_level="info")
    return 0

"""What every evaluation pass shares: the model's device, the pad id, autocast, the no-grad eval context, the
bf16 decoding copy, and batches of similar length."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from copy import deepcopy

import torch

from ..torch_utils import eval_mode


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (evaluation keeps a model on one device)."""
    return next(model.parameters()).device


def autocast(model: torch.nn.Module, precision: str | None):
    """``torch.autocast`` for ``precision`` "bf16" / "fp16" on the model's device; no-op for ``None`` / "fp32" (the
    weights' own dtype)."""
    if precision in (None, "fp32"):
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(model_device(model).type, dtype=dtype)


@contextmanager
def inference(model: torch.nn.Module, precision: str | None) -> Iterator[None]:
    """No gradients, eval mode (restored after), autocast at ``precision``."""
    with torch.no_grad(), eval_mode(model), autocast(model, precision):
        yield


def decode_weights(model: torch.nn.Module, precision: str | None) -> tuple[torch.nn.Module, str | None]:
    """The model and precision greedy decoding runs with: for "bf16" on a CPU with fp32 weights, a copy of the model
    whose parameters are bf16 (buffers such as RoPE's ``inv_freq`` stay fp32), run without autocast.

    Why: autocast re-casts every fp32 weight to bf16 at every call and leaves the rotated keys of the KV cache in
    fp32, so one decode step of smollm2-135m spends most of its time copying (measured 333 ms vs 150 ms per step at
    batch 16 on one core). The matmuls are bf16 either way; the residual stream of the copy is bf16 too, as in any
    model loaded in bf16. The caller's model is left as it is (perplexity keeps the fp32 residual stream)."""
    if (
        precision != "bf16"
        or model_device(model).type != "cpu"
        or any(p.dtype != torch.float32 for p in model.parameters())
    ):
        return model, precision
    copy = deepcopy(model)  # deepcopy keeps tied weights tied, so each shared tensor is cast once
    for p in copy.parameters():
        p.data = p.data.to(torch.bfloat16)
    return copy, None


def length_batches(lengths: list[int], batch_size: int, progress: str | None = None) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (sorted, stable), so a batch pads little; with ``progress``
    (a label), a line on stderr per batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    start = time.perf_counter()
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]
        if progress:
            done = min(i + batch_size, len(order))
            print(f"[nora eval] {progress}: {done}/{len(order)} records, {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip

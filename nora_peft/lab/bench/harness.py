"""What every benchmark section shares: the device, alternating timing, random inputs and models, activation memory.

Every comparison is measured *alternately* in one run: each repeat times every variant once (the order flips every
repeat), so slow drifts of a shared machine hit all variants alike. Sections report medians and ratios.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

#: the seven projections of a Llama block; the default target of every section
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; any other name is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so a timer measures it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def small_llama(
    hidden: int = 256,
    layers: int = 4,
    vocab: int = 1024,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A random-init Llama from a config (no download), in eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or int(hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(device).eval()


def load_bench_model(name: str | None, args: Any, device: torch.device) -> nn.Module:
    """``--model NAME`` in eval mode on ``device``: a benchmark shape (``shape:llama-3-8b``, random init, bf16 unless
    ``--dtype``), a named base or folder (via ``nora_peft.bases``), or without a name the random-init Llama."""
    from ...bases.shapes import build_shape, is_shape

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[getattr(args, "dtype", None)]
    if is_shape(name):
        return build_shape(name, device=device, dtype=dtype)
    if not name:
        model = small_llama(32 if args.quick else args.hidden, 1 if args.quick else 4, device=device)
    else:
        from ...bases.named import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(name, dtype=dtype)  # loaded in its dtype, never first in fp32
    return model.to(device=device, dtype=dtype).eval()


def alternate(
    fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each variant, interleaved: every repeat runs every variant once, order alternating."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(values: list[float]) -> float:
    """Median of seconds, in milliseconds."""
    return 1000 * statistics.median(values)


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repeats of ``num_i / den_i``: each repeat ran both back to back, so this ratio is paired in time
    and robust to a shared machine's load changing between repeats (a ratio of medians is not)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def random_ids(batch: int, length: int, vocab: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """Token ids in ``[3, vocab)`` (clear of pad/bos/eos), reproducible by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the tables and JSON)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def saved_activation_bytes(model: nn.Module, fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn()`` runs (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())

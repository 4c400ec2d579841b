"""``--what train``: fwd + bwd + AdamW step time and activation memory, NoRA vs peft LoRA at equal rank and dropout.

Memory on CPU is the bytes of the unique tensor storages the autograd graph saves for backward (via
``torch.autograd.graph.saved_tensors_hooks``), parameters excluded; on CUDA it is ``torch.cuda.max_memory_allocated``
during the step minus what was allocated before it. :func:`compare_train_steps` is reused by the ``real`` section.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ...methods import AdapterSpec, build_peft_model
from .harness import (
    ALL_LINEAR,
    alternate,
    load_bench_model,
    log,
    median_ms,
    paired_ratio,
    random_ids,
    saved_activation_bytes,
    small_llama,
)


def _train_step(model: nn.Module, ids: torch.Tensor, autocast: torch.dtype | None) -> Callable[[], None]:
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    device_type = ids.device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _step_memory(model: nn.Module, ids: torch.Tensor, step: Callable[[], None], autocast: torch.dtype | None) -> int:
    """Activation memory of one step (see the module docstring); AdamW state is allocated before measuring."""
    device = ids.device
    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        return torch.cuda.max_memory_allocated(device) - before

    def loss() -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            return model(input_ids=ids, labels=ids).loss

    got = saved_activation_bytes(model, loss)
    model.zero_grad(set_to_none=True)
    return got


def compare_train_steps(
    base: nn.Module,
    ids: torch.Tensor,
    specs: dict[str, AdapterSpec],
    *,
    repeats: int,
    warmup: int,
    autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """Step time (alternating repeats) and activation memory of each spec on a copy of ``base``.

    Returns ``{"ms": {name: median}, "paired_ratio" (second spec over first, see ``harness.paired_ratio``; two specs
    only), "mem_bytes": {name: bytes}, "step_times_ms": {name: [...]}, "memory_measure"}``.
    """
    steps, memory = {}, {}
    for name, spec in specs.items():
        torch.manual_seed(0)
        model = build_peft_model(copy.deepcopy(base), spec).train()
        steps[name] = _train_step(model, ids, autocast)
        memory[name] = _step_memory(model, ids, steps[name], autocast)
    times = alternate(steps, repeats=repeats, warmup=warmup, device=ids.device)
    names = list(specs)
    return {
        "ms": {name: median_ms(t) for name, t in times.items()},
        "paired_ratio": paired_ratio(times, names[-1], names[0]) if len(names) == 2 else None,
        "mem_bytes": memory,
        "step_times_ms": {name: [1000 * t for t in ts] for name, ts in times.items()},
        "memory_measure": "cuda_max_allocated_during_step"
        if ids.device.type == "cuda"
        else "saved_for_backward_unique_storages_excl_params",
    }


def bench_train(
    *,
    ranks: tuple[int, ...] = (8, 64),
    dropouts: tuple[float, ...] = (0.0, 0.05),
    hidden: int = 256,
    layers: int = 4,
    seq_len: int = 128,
    batch_size: int = 8,
    repeats: int = 10,
    warmup: int = 2,
    targets: list[str] | None = None,
    device: torch.device | None = None,
    base: nn.Module | None = None,
) -> list[dict]:
    """NoRA vs peft LoRA training step (fwd + bwd + AdamW) at equal rank and dropout, measured alternately, on
    ``base`` (default: a random-init Llama of ``hidden`` x ``layers``; a bf16 base trains under bf16 autocast)."""
    device = device or torch.device("cpu")
    base = base if base is not None else small_llama(hidden, layers, device=device)
    autocast = torch.bfloat16 if next(base.parameters()).dtype == torch.bfloat16 else None
    ids = random_ids(batch_size, seq_len, base.config.vocab_size, device)
    rows = []
    for r in ranks:
        for p in dropouts:
            specs = {
                m: AdapterSpec(method=m, r=r, dropout=p, target_modules=targets or ALL_LINEAR) for m in ("lora", "nora")
            }
            log(f"train r={r} dropout={p}: timing {repeats} alternating repeats")
            got = compare_train_steps(base, ids, specs, repeats=repeats, warmup=warmup, autocast=autocast)
            rows.append(
                {
                    "r": r,
                    "dropout": p,
                    "batch_size": batch_size,
                    "seq_len": seq_len,
                    "precision": "bf16" if autocast else "fp32",
                    **step_ratios(got),
                    "lora_step_times_ms": got["step_times_ms"]["lora"],
                    "nora_step_times_ms": got["step_times_ms"]["nora"],
                }
            )
    return rows


def step_ratios(got: dict[str, Any]) -> dict[str, Any]:
    """The row fields of one :func:`compare_train_steps` result: medians, memory and NoRA/LoRA ratios."""
    ms, mem = got["ms"], got["mem_bytes"]
    return {
        "lora_ms": ms["lora"],
        "nora_ms": ms["nora"],
        "time_ratio_nora_over_lora": ms["nora"] / ms["lora"],
        "time_ratio_paired_median": got["paired_ratio"],
        "lora_mem_bytes": mem["lora"],
        "nora_mem_bytes": mem["nora"],
        "mem_ratio_nora_over_lora": mem["nora"] / mem["lora"],
        "memory_measure": got["memory_measure"],
    }


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The section's results under the key ``train``."""
    q = args.quick
    rows = bench_train(
        base=load_bench_model(args.model, args, device) if args.model else None,
        targets=args.targets.split(",") if args.targets else None,
        ranks=tuple(int(r) for r in args.ranks.split(",")) if args.ranks else (8,) if q else (8, 64),
        dropouts=(0.0,) if q else (0.0, 0.05),
        hidden=32 if q else args.hidden,
        layers=1 if q else 4,
        seq_len=args.seq_len or (16 if q else 128),
        batch_size=args.batch_size or (2 if q else 8),
        repeats=args.repeats or (2 if q else 10),
        warmup=1 if q else 2,
        device=device,
    )
    return {"train": rows}


def print_step_table(title: str, rows: list[dict[str, Any]], lead: str = "r") -> None:
    """The NoRA-vs-LoRA step table (ms, ratios, MiB) of rows from :func:`bench_train` or the ``real`` section."""
    print(f"\n{title}")
    cols = ("lora ms", "nora ms", "time x", "pair x", "lora MiB", "nora MiB", "mem x")
    w = max(5, len(lead))
    print(
        f"{lead:>{w}} {'drop':>5} " + " ".join(f"{c:>{6 if c == 'mem x' else 9 if 'x' not in c else 7}}" for c in cols)
    )
    for row in rows:
        print(
            f"{row[lead]:>{w}} {row['dropout']:>5} {row['lora_ms']:>9.1f} {row['nora_ms']:>9.1f} "
            f"{row['time_ratio_nora_over_lora']:>7.3f} {row['time_ratio_paired_median']:>7.3f} "
            f"{row['lora_mem_bytes'] / 2**20:>9.1f} "
            f"{row['nora_mem_bytes'] / 2**20:>9.1f} {row['mem_ratio_nora_over_lora']:>6.3f}"
        )


def print_tables(results: dict[str, Any]) -> None:
    """The table of ``results["train"]``."""
    print_step_table("training step (fwd+bwd+AdamW), NoRA vs LoRA, medians", results["train"])

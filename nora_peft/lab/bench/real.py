"""``--what real --model smollm2-135m``: NoRA vs LoRA on a real pretrained model (issue: real model, item 3).

* **Training step** (fwd + bwd + AdamW) time and activation memory at equal rank, measured alternately in one run
  (:func:`.train.compare_train_steps`), with NoRA/LoRA ratios; fp32, and bf16 autocast when ``--precision bf16``.
  Targets: NoRA <= 1.03x LoRA's step time and <= 1.0x its memory.
* **Decode** tokens/s of the base model, unmerged NoRA and merged (and unmerged) LoRA: greedy ``generate`` with a KV
  cache at batch 1 and 8, alternately (:func:`.infer.decode_throughput`).

Defaults follow the paper's setup on q_proj and v_proj at r=16 with short sequences (a 2-core CPU budget); every
setting is stored with the numbers.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ...methods import AdapterSpec
from .harness import load_bench_model, log, random_ids
from .infer import decode_throughput
from .train import compare_train_steps, print_step_table, step_ratios

DEFAULT_TARGETS = ["q_proj", "v_proj"]


def train_rows(
    model: torch.nn.Module,
    *,
    rank: int,
    targets: list[str],
    dropouts: tuple[float, ...],
    batch_size: int,
    seq_len: int,
    repeats: int,
    precisions: tuple[str, ...],
) -> list[dict[str, Any]]:
    """One row per (precision, dropout): LoRA and NoRA step medians, memory, ratios and the raw step times."""
    device = next(model.parameters()).device
    ids = random_ids(batch_size, seq_len, model.config.vocab_size, device)
    rows = []
    for precision in precisions:
        autocast = torch.bfloat16 if precision == "bf16" else None
        for p in dropouts:
            specs = {m: AdapterSpec(method=m, r=rank, dropout=p, target_modules=targets) for m in ("lora", "nora")}
            log(f"real train {precision} r={rank} dropout={p} batch {batch_size}x{seq_len}: {repeats} repeats")
            got = compare_train_steps(model, ids, specs, repeats=repeats, warmup=1, autocast=autocast)
            rows.append(
                {
                    "precision": precision,
                    "r": rank,
                    "dropout": p,
                    "batch_size": batch_size,
                    "seq_len": seq_len,
                    **step_ratios(got),
                    "step_times_ms": got["step_times_ms"],
                }
            )
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--precision`` of the real-model training step (``--seq-len`` 128 and ``--batch-size`` 4 by default)."""
    parser.add_argument("--precision", default="fp32", help="real: comma list of fp32, bf16 (CPU/CUDA autocast)")


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The section's results under the key ``real``."""
    q = args.quick
    model = load_bench_model(args.model, args, device)
    rank = args.rank or (4 if q else 16)
    targets = args.targets.split(",") if args.targets else DEFAULT_TARGETS
    precisions = tuple(p.strip() for p in args.precision.split(",") if p.strip())
    bad = set(precisions) - {"fp32", "bf16"}
    if bad:
        raise SystemExit(f"--precision: unknown {sorted(bad)}; choose fp32 and/or bf16.")
    train = train_rows(
        model,
        rank=rank,
        targets=targets,
        dropouts=(0.0,) if q else (0.0, 0.05),
        batch_size=2 if q else args.batch_size or 4,
        seq_len=16 if q else args.seq_len or 128,
        repeats=args.repeats or (2 if q else 6),
        precisions=precisions,
    )
    specs = [AdapterSpec(method=m, r=rank, target_modules=targets) for m in ("lora", "nora")]
    decode = {}
    for batch in (1,) if q else (1, 8):
        log(f"real decode batch {batch}")
        decode[f"b{batch}"] = decode_throughput(
            model, specs, batch_size=batch, new_tokens=4 if q else 32, repeats=args.repeats or (1 if q else 3)
        )
    name = args.model or "random-init Llama"
    return {"real": {"model": name, "rank": rank, "targets": targets, "train": train, "decode": decode}}


def print_tables(results: dict[str, Any]) -> None:
    """The training-step table and one decode table per batch size."""
    real = results["real"]
    title = f"real model {real['model']}: training step (fwd+bwd+AdamW), r={real['rank']} on {real['targets']}"
    print_step_table(title, real["train"], lead="precision")
    for key, rows in real["decode"].items():
        print(f"\nreal model decode {key} (greedy, KV cache)")
        print(f"{'label':<18} {'ms':>9} {'rel':>6} {'tok/s':>8}")
        for row in rows:
            print(f"{row['label']:<18} {row['ms']:>9.1f} {row['rel_latency']:>6.3f} {row['decode_tokens_per_s']:>8.1f}")

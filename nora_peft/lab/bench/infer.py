"""``--what infer``: prefill latency / throughput and decode throughput of the base model, merged LoRA, unmerged LoRA
and unmerged NoRA by rank (the paper's Table 3), on a random-init Llama.

:func:`latency_table` (prefill) and :func:`decode_throughput` (greedy ``generate``) take any causal LM and are reused
by the ``latency`` and ``real`` sections.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ...methods import AdapterSpec, build_peft_model
from .harness import ALL_LINEAR, alternate, log, median_ms, random_ids, small_llama


def mergeable(spec: AdapterSpec) -> bool:
    """LoRA methods, and NoRA with the identity activation, fold into the base weights."""
    return spec.method in ("lora", "rslora") or (spec.method == "nora" and spec.activation == "identity")


def adapter_variants(
    model: nn.Module, specs: list[AdapterSpec], merged: bool = True, unmerged: bool = True
) -> dict[str, tuple[nn.Module, dict]]:
    """label -> (model, info): the base, and per spec the unmerged adapter and/or (mergeable specs) the merged one."""
    out: dict[str, tuple[nn.Module, dict]] = {"base": (model, {"method": "base", "r": 0, "merged": False})}
    for spec in specs:
        info = {"method": spec.method, "r": spec.r}
        if unmerged or not mergeable(spec):
            torch.manual_seed(0)
            out[spec.label()] = (build_peft_model(copy.deepcopy(model), spec).eval(), {**info, "merged": False})
        if merged and mergeable(spec):
            torch.manual_seed(0)
            folded = build_peft_model(copy.deepcopy(model), spec).eval().merge_and_unload()
            out[spec.label() + "-merged"] = (folded, {**info, "merged": True})
    return out


def prefill_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """One forward of ``ids`` without autograd."""

    def run() -> None:
        with torch.inference_mode():
            model(input_ids=ids)

    return run


def generate_fn(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens with a KV cache."""

    def run() -> None:
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    return run


def latency_table(
    model: nn.Module,
    specs: list[AdapterSpec],
    *,
    batch_size: int = 1,
    seq_len: int = 128,
    repeats: int = 20,
    warmup: int = 3,
    merged_lora: bool = True,
) -> list[dict]:
    """Prefill forward latency of ``model`` alone and with each adapter, measured alternately.

    Rows ``{"label", "ms", "rel_latency" (vs "base"), "tokens_per_s", "method", "r", "merged"}``, first "base";
    LoRA specs also get a ``<label>-merged`` row (merged into the weights). ``model`` is not modified.
    """
    device = next(model.parameters()).device
    ids = random_ids(batch_size, seq_len, model.config.vocab_size, device)
    variants = adapter_variants(model, specs, merged=merged_lora)
    fns = {k: prefill_fn(m, ids) for k, (m, _) in variants.items()}
    times = alternate(fns, repeats=repeats, warmup=warmup, device=device)
    base_ms = median_ms(times["base"])
    rows = []
    for label, (_, info) in variants.items():
        ms = median_ms(times[label])
        rows.append(
            {"label": label, "ms": ms, "rel_latency": ms / base_ms, "tokens_per_s": batch_size * seq_len / ms * 1000}
            | info
        )
    return rows


def decode_throughput(
    model: nn.Module,
    specs: list[AdapterSpec],
    *,
    batch_size: int = 1,
    prompt_len: int = 16,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
) -> list[dict]:
    """Greedy ``generate`` with a KV cache: generated tokens per second (prompt prefill included), alternately."""
    device = next(model.parameters()).device
    ids = random_ids(batch_size, prompt_len, model.config.vocab_size, device)
    variants = adapter_variants(model, specs)
    fns = {k: generate_fn(m, ids, new_tokens) for k, (m, _) in variants.items()}
    times = alternate(fns, repeats=repeats, warmup=warmup, device=device)
    base_ms = median_ms(times["base"])
    return [
        {
            "label": label,
            "batch_size": batch_size,
            "ms": median_ms(times[label]),
            "rel_latency": median_ms(times[label]) / base_ms,
            "decode_tokens_per_s": batch_size * new_tokens / median_ms(times[label]) * 1000,
        }
        | info
        for label, (_, info) in variants.items()
    ]


def bench_infer(
    *,
    ranks: tuple[int, ...] = (8, 64),
    hidden: int = 256,
    layers: int = 4,
    seq_len: int = 128,
    repeats: int = 20,
    decode_batches: tuple[int, ...] = (1, 16),
    new_tokens: int = 32,
    targets: list[str] | None = None,
    device: torch.device | None = None,
) -> dict:
    """Prefill at batch 1 and 16, then decode at each of ``decode_batches``: LoRA and NoRA at each rank."""
    device = device or torch.device("cpu")
    model = small_llama(hidden, layers, device=device)
    specs = [AdapterSpec(method=m, r=r, target_modules=targets or ALL_LINEAR) for r in ranks for m in ("lora", "nora")]
    out: dict[str, Any] = {}
    for batch in (1, 16):
        log(f"infer prefill batch={batch} seq={seq_len}")
        out[f"prefill_b{batch}"] = latency_table(model, specs, batch_size=batch, seq_len=seq_len, repeats=repeats)
    for batch in decode_batches:
        log(f"infer decode batch={batch} new_tokens={new_tokens}")
        out[f"decode_b{batch}"] = decode_throughput(
            model, specs, batch_size=batch, new_tokens=new_tokens, repeats=max(3, repeats // 4)
        )
    return out


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The section's results under the key ``infer``."""
    q = args.quick
    out = bench_infer(
        ranks=(8,) if q else (8, 64),
        hidden=32 if q else args.hidden,
        layers=1 if q else 4,
        seq_len=16 if q else 128,
        repeats=args.repeats or (2 if q else 20),
        decode_batches=(1,) if q else (1, 16),
        new_tokens=4 if q else 32,
        device=device,
    )
    return {"infer": out}


def print_tables(results: dict[str, Any]) -> None:
    """One table per prefill/decode shape of ``results["infer"]``."""
    for key, rows in results["infer"].items():
        print(f"\ninference {key}")
        col = "tokens_per_s" if key.startswith("prefill") else "decode_tokens_per_s"
        print(f"{'label':<18} {'ms':>9} {'rel':>6} {'tok/s':>10}")
        for row in rows:
            print(f"{row['label']:<18} {row['ms']:>9.2f} {row['rel_latency']:>6.3f} {row[col]:>10.0f}")

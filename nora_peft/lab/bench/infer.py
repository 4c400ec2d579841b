"""``--what infer``: prefill latency / throughput and decode throughput of the base model, merged LoRA, unmerged LoRA
and unmerged NoRA by rank (the paper's Table 3), on a random-init Llama or ``--model`` (e.g. ``shape:llama-3-1b``).

:func:`latency_table` (prefill) and :func:`decode_throughput` (greedy decode) take any causal LM and are reused
by the ``latency`` and ``real`` sections. Decode runs on one of three paths (:data:`DECODE_PATHS`, ``--decode``):
``eager`` is ``generate`` (dynamic KV cache); ``static`` is ``nora_peft.kernels.decode.StaticDecoder`` (static KV cache,
eager step); ``graph`` is the same decoder with its step captured as a CUDA graph (on a CPU it runs as ``static``, and
its rows say ``"cuda_graph": false``). Every variant of one measurement runs on the same path.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ...methods import AdapterSpec, build_peft_model
from .harness import ALL_LINEAR, alternate, load_bench_model, log, median_ms, random_ids, small_llama

#: ``--decode`` choices
DECODE_PATHS = ("eager", "static", "graph")


def mergeable(spec: AdapterSpec) -> bool:
    """LoRA methods, and NoRA with the identity activation, fold into the base weights."""
    return spec.method in ("lora", "rslora") or (spec.method == "nora" and spec.activation == "identity")


def variant(model: nn.Module, spec: AdapterSpec, merged: bool) -> tuple[str, nn.Module, dict]:
    """``(label, model, info)``: a copy of ``model`` with ``spec``'s adapter, folded into the weights if ``merged``;
    ``info["adapter_parameters"]`` counts the adapter's parameters (before merging)."""
    torch.manual_seed(0)
    adapted = build_peft_model(copy.deepcopy(model), spec).eval()
    params = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    info = {"method": spec.method, "r": spec.r, "merged": merged, "adapter_parameters": params}
    if merged:
        return spec.label() + "-merged", adapted.merge_and_unload(), info
    return spec.label(), adapted, info


def adapter_variants(
    model: nn.Module, specs: list[AdapterSpec], merged: bool = True, unmerged: bool = True
) -> dict[str, tuple[nn.Module, dict]]:
    """label -> (model, info): the base, and per spec the unmerged adapter and/or (mergeable specs) the merged one."""
    out: dict[str, tuple[nn.Module, dict]] = {
        "base": (model, {"method": "base", "r": 0, "merged": False, "adapter_parameters": 0})
    }
    for spec in specs:
        for fold in [False] * (unmerged or not mergeable(spec)) + [True] * (merged and mergeable(spec)):
            label, adapted, info = variant(model, spec, fold)
            out[label] = (adapted, info)
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


def decode_fn(model: nn.Module, ids: torch.Tensor, new_tokens: int, path: str = "eager") -> Callable[[], None]:
    """Greedy decode of exactly ``new_tokens`` tokens after ``ids`` on ``path`` (:data:`DECODE_PATHS`)."""
    if path == "eager":
        return generate_fn(model, ids, new_tokens)
    if path not in DECODE_PATHS:
        raise ValueError(f"unknown decode path {path!r}; choose from {', '.join(DECODE_PATHS)}")
    from ...kernels.decode import StaticDecoder

    graph = path == "graph" and ids.device.type == "cuda"
    decoder = StaticDecoder(model, batch_size=ids.shape[0], max_cache_len=ids.shape[1] + new_tokens, graph=graph)

    def run() -> None:
        decoder.generate(ids, max_new_tokens=new_tokens)

    return run


def decode_paths(text: str | None) -> tuple[str, ...]:
    """``--decode eager,graph`` -> ``("eager", "graph")``, checked."""
    paths = tuple(p.strip() for p in (text or "eager").split(",") if p.strip())
    bad = [p for p in paths if p not in DECODE_PATHS]
    if bad or not paths:
        raise SystemExit(f"--decode: unknown path(s) {bad}; choose from {', '.join(DECODE_PATHS)} (comma list)")
    return paths


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
    path: str = "eager",
) -> list[dict]:
    """Greedy decode with a KV cache on ``path``: generated tokens per second (prompt prefill included), alternately."""
    device = next(model.parameters()).device
    ids = random_ids(batch_size, prompt_len, model.config.vocab_size, device)
    variants = adapter_variants(model, specs)
    fns = {k: decode_fn(m, ids, new_tokens, path) for k, (m, _) in variants.items()}
    times = alternate(fns, repeats=repeats, warmup=warmup, device=device)
    base_ms = median_ms(times["base"])
    return [
        {
            "label": label,
            "batch_size": batch_size,
            "decode_path": path,
            "cuda_graph": path == "graph" and device.type == "cuda",
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
    base: nn.Module | None = None,
    paths: tuple[str, ...] = ("eager",),
) -> dict:
    """Prefill at batch 1 and 16, then decode at each of ``decode_batches`` on each of ``paths`` (keys
    ``decode_b<batch>`` for the first path, ``decode_b<batch>_<path>`` for the others): LoRA and NoRA at each rank,
    on ``base`` (default: a random-init Llama of ``hidden`` x ``layers``)."""
    device = device or torch.device("cpu")
    model = base if base is not None else small_llama(hidden, layers, device=device)
    specs = [AdapterSpec(method=m, r=r, target_modules=targets or ALL_LINEAR) for r in ranks for m in ("lora", "nora")]
    out: dict[str, Any] = {}
    for batch in (1, 16):
        log(f"infer prefill batch={batch} seq={seq_len}")
        out[f"prefill_b{batch}"] = latency_table(model, specs, batch_size=batch, seq_len=seq_len, repeats=repeats)
    for batch in decode_batches:
        for i, path in enumerate(paths):
            log(f"infer decode batch={batch} new_tokens={new_tokens} path={path}")
            out[f"decode_b{batch}" + (f"_{path}" if i else "")] = decode_throughput(
                model, specs, batch_size=batch, new_tokens=new_tokens, repeats=max(3, repeats // 4), path=path
            )
    return out


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The section's results under the key ``infer``."""
    q = args.quick
    out = bench_infer(
        base=load_bench_model(args.model, args, device) if args.model else None,
        paths=decode_paths(args.decode),
        targets=args.targets.split(",") if args.targets else None,
        ranks=tuple(int(r) for r in args.ranks.split(",")) if args.ranks else (8,) if q else (8, 64),
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

"""``--what latency``: the paper's claim (5) and Table 3 -- unmerged NoRA vs merged LoRA vs unmerged LoRA, prefill
and decode, on any decode path.

The variants are built once: the base, LoRA at ``merged_rank`` merged into the weights (Table 3's reference: LoRA
r=512 merged), and LoRA and NoRA unmerged at each of ``ranks``. Every *round* times prefill (one forward of
``batch x seq_len`` tokens) and decode (greedy decode of ``decode_tokens`` after a ``decode_prompt``-token prompt) of
every variant alternately, ``repeats`` times each, on each decode path (``--decode eager,static,graph``, see
:mod:`.infer`), and keeps every time and the medians. A round's overhead is the median over repeats of the paired
ratio (the variants of one repeat ran back to back); the 95% CIs are Student-t over rounds (``lab.stats``). The
``table`` holds Table 3's rows per path: adapter parameters, tok/s and latency relative to merged LoRA.

Table 3 on a GPU: ``--model shape:llama-3-8b --targets q_proj,v_proj --ranks 64,128 --merged-rank 512
--decode eager,graph``. The study's latency step stores :func:`measure_latency`'s result as ``latency.json``; the
report only reads it.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn as nn

from ...methods import AdapterSpec
from ..stats import latency_overheads, mean_ci, round_overhead
from .harness import alternate, load_bench_model, log, median_ms, random_ids
from .infer import decode_fn, decode_paths, prefill_fn, variant

__all__ = ["measure_latency", "table_rows"]


def _role(info: dict) -> str:
    if info["method"] == "base":
        return "base"
    return f"{info['method']}_{'merged' if info['merged'] else 'unmerged'}"


def _round_rows(variants: dict, times: dict[str, list[float]], tokens: int, rate_key: str) -> list[dict]:
    base_ms = median_ms(times["base"])
    return [
        {
            "label": label,
            "role": _role(info),
            "ms": median_ms(times[label]),
            "rel_latency": median_ms(times[label]) / base_ms,
            rate_key: tokens / median_ms(times[label]) * 1000,
            "times_ms": [1000 * t for t in times[label]],
        }
        | info
        for label, (_, info) in variants.items()
    ]


def latency_variants(
    model: nn.Module, adapter: dict[str, Any], ranks: tuple[int, ...], merged_rank: int
) -> dict[str, tuple[nn.Module, dict]]:
    """label -> (model, info): ``base`` (``model`` itself), merged LoRA at ``merged_rank``, then unmerged LoRA and
    NoRA at each of ``ranks`` (copies; ``model`` is not modified)."""
    out = {"base": (model, {"method": "base", "r": 0, "merged": False, "adapter_parameters": 0})}
    entries = [(AdapterSpec(method="lora", r=merged_rank, **adapter), True)]
    entries += [(AdapterSpec(method=m, r=r, **adapter), False) for m in ("lora", "nora") for r in ranks]
    for spec, merged in entries:
        label, adapted, info = variant(model, spec, merged)
        out[label] = (adapted, info)
    return out


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Table 3's rows from :func:`measure_latency`'s result: per decode path and variant, adapter parameters, decode
    tok/s (mean and 95% CI over rounds) and latency relative to merged LoRA (paired per repeat, CI over rounds)."""
    rows = []
    for path, rounds in result["decode_paths"].items():
        ref = next(r["label"] for r in rounds[0] if r["method"] == "lora" and r["merged"])
        for i, first in enumerate(rounds[0]):
            rate = mean_ci(rnd[i]["decode_tokens_per_s"] for rnd in rounds)
            rel = mean_ci(1 + round_overhead(rnd[i], next(r for r in rnd if r["label"] == ref)) for rnd in rounds)
            rows.append(
                {
                    "path": path,
                    "cuda_graph": first["cuda_graph"],
                    "label": first["label"],
                    "method": first["method"],
                    "r": first["r"],
                    "merged": first["merged"],
                    "adapter_parameters": first["adapter_parameters"],
                    "tokens_per_s": rate.mean,
                    "tokens_per_s_ci": [rate.lo, rate.hi],
                    "rel_latency_vs": ref,
                    "rel_latency": rel.mean,
                    "rel_latency_ci": [rel.lo, rel.hi],
                }
            )
    return rows


def _path_failed(out: dict[str, Any], path: str, exc: Exception) -> None:
    """Record that decode path ``path`` stopped (its rows are left out; the other paths go on)."""
    log(f"latency: decode path {path} failed: {exc}")
    out["errors"][path] = f"{type(exc).__name__}: {exc}"


def measure_latency(  # long: a quarter of it is the keyword arguments the study and the CLI pass
    model: nn.Module,
    adapter: dict[str, Any] | None = None,
    *,
    rank: int = 8,
    ranks: tuple[int, ...] | None = None,
    merged_rank: int | None = None,
    batch_size: int = 1,
    seq_len: int = 128,
    repeats: int = 10,
    rounds: int = 3,
    decode_tokens: int = 32,
    decode_prompt: int = 16,
    decode_repeats: int = 3,
    warmup: int = 2,
    paths: tuple[str, ...] = ("eager",),
) -> dict[str, Any]:
    """Latency of ``model`` with LoRA and NoRA (``adapter``: further ``AdapterSpec`` fields) at ``ranks`` (default
    ``(rank,)``), against LoRA at ``merged_rank`` (default: the largest rank) merged, on each decode path.

    Returns ``{"rank", "ranks", "merged_rank", "rounds": [[prefill rows]], "decode_paths": {path: [[decode rows]]},
    "decode_rounds" (the first path's), "table" (:func:`table_rows`), "errors" ({path: message} of decode paths that
    failed, e.g. a CUDA graph that could not be captured; the others are still measured), "setting",
    "decode_setting"}``; a row is
    ``{"label", "role", "ms", "rel_latency" (vs base), "tokens_per_s" | "decode_tokens_per_s", "method", "r",
    "merged", "adapter_parameters", "times_ms"}``. ``decode_tokens=0`` skips decode. ``model`` is not modified.
    """
    adapter = dict(adapter or {})
    ranks = tuple(ranks or (rank,))
    merged_rank = merged_rank or max(ranks)
    device = next(model.parameters()).device
    variants = latency_variants(model, adapter, ranks, merged_rank)
    ids = random_ids(batch_size, seq_len, model.config.vocab_size, device)
    prompt = random_ids(batch_size, decode_prompt, model.config.vocab_size, device, seed=2)
    prefill = {k: prefill_fn(m, ids) for k, (m, _) in variants.items()}
    graph = {p: p == "graph" and device.type == "cuda" for p in paths}
    out: dict[str, Any] = {"rank": ranks[0], "ranks": list(ranks), "merged_rank": merged_rank, "rounds": []}
    out["errors"] = {}  # decode path -> the error that stopped it (its rows are left out)
    out["decode_paths"] = {p: [] for p in paths} if decode_tokens else {}
    decode: dict[str, dict[str, Any]] = {}
    for path in out["decode_paths"]:
        try:  # a path may refuse the model when built (e.g. a static cache on a sliding-window model)
            decode[path] = {k: decode_fn(m, prompt, decode_tokens, path) for k, (m, _) in variants.items()}
        except (RuntimeError, ValueError) as exc:
            _path_failed(out, path, exc)
    for i in range(rounds):
        log(f"latency round {i + 1}/{rounds}: prefill {batch_size}x{seq_len}, decode {decode_tokens} tokens {paths}")
        times = alternate(prefill, repeats=repeats, warmup=warmup if i == 0 else 1, device=device)
        out["rounds"].append(_round_rows(variants, times, batch_size * seq_len, "tokens_per_s"))
        for path in [p for p in out["decode_paths"] if p not in out["errors"]]:
            try:
                times = alternate(decode[path], repeats=decode_repeats, warmup=1, device=device)
            except (RuntimeError, ValueError) as exc:  # e.g. a capture failure: keep the other paths' numbers
                _path_failed(out, path, exc)
                continue
            rows = _round_rows(variants, times, batch_size * decode_tokens, "decode_tokens_per_s")
            out["decode_paths"][path].append([r | {"decode_path": path, "cuda_graph": graph[path]} for r in rows])
    out["decode_paths"] = {p: rounds for p, rounds in out["decode_paths"].items() if p not in out["errors"]}
    out["decode_rounds"] = next(iter(out["decode_paths"].values()), [])
    out["table"] = table_rows(out) if out["decode_rounds"] else []
    dtype = next(model.parameters()).dtype
    where = f"{device}, {torch.get_num_threads()} threads, {dtype}"
    targets = adapter.get("target_modules", "the adapter default targets")
    out["setting"] = (
        f"r={list(ranks)} (LoRA r={merged_rank} merged) on {targets}, prefill {batch_size} x {seq_len}, {where}"
    )
    out["decode_setting"] = (
        f"r={list(ranks)}, greedy decode of {decode_tokens} tokens after a {decode_prompt}-token prompt, batch "
        f"{batch_size}, paths {list(paths)}, {where}"
    )
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--rounds``: latency rounds (CIs are over rounds)."""
    parser.add_argument("--rounds", type=int, default=None, help="latency: rounds (95%% CIs over rounds; default 5)")
    parser.add_argument("--merged-rank", type=int, default=None, help="latency: merged LoRA's rank (default: max rank)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="latency: tokens per decode (default 32)")


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The section's results under the key ``latency``."""
    q = args.quick
    paths = decode_paths(args.decode)
    model = load_bench_model(args.model, args, device)
    targets = args.targets.split(",") if args.targets else None
    result = measure_latency(
        model,
        {"target_modules": targets} if targets else None,
        rank=args.rank or 8,
        ranks=tuple(int(r) for r in args.ranks.split(",")) if args.ranks else None,
        merged_rank=args.merged_rank,
        seq_len=16 if q else 128,
        repeats=args.repeats or (2 if q else 10),
        rounds=args.rounds or (2 if q else 5),
        decode_tokens=args.decode_tokens or (4 if q else 32),
        decode_repeats=1 if q else 3,
        warmup=1,
        paths=paths,
    )
    params = sum(p.numel() for p in model.parameters())
    return {"latency": result | {"model": args.model or "random-init Llama", "model_parameters": params}}


def print_tables(results: dict[str, Any]) -> None:
    """Medians per round and the overheads with 95% CIs over rounds."""
    lat = results["latency"]
    for key, setting, rate in (
        ("rounds", "setting", "tokens_per_s"),
        ("decode_rounds", "decode_setting", "decode_tokens_per_s"),
    ):
        if not lat.get(key):
            continue
        print(f"\nclaim (5) {key.replace('rounds', '').strip('_') or 'prefill'}: {lat[setting]}")
        print(f"{'label':<18} {'ms (rounds)':>28} {'tok/s':>9}")
        for i, row in enumerate(lat[key][0]):
            ms = " ".join(f"{rnd[i]['ms']:.1f}" for rnd in lat[key])
            print(f"{row['label']:<18} {ms:>28} {mean_ci(r[i][rate] for r in lat[key]).mean:>9.1f}")
        ov = latency_overheads(lat[key])
        if ov:
            for name, stat in ov.items():
                print(f"NoRA unmerged overhead {name}: {stat.mean:+.1%} (95% CI {stat.lo:+.1%} .. {stat.hi:+.1%})")
    if lat.get("table"):
        print(f"\nTable 3 rows ({lat.get('model')}): decode tok/s and latency relative to merged LoRA, 95% CIs")
        print(f"{'path':<7} {'graph':<5} {'label':<18} {'adapter params':>14} {'tok/s':>9} {'rel':>7} {'rel CI':>15}")
        for row in lat["table"]:
            lo, hi = row["rel_latency_ci"]
            print(
                f"{row['path']:<7} {'yes' if row['cuda_graph'] else 'no':<5} {row['label']:<18} "
                f"{row['adapter_parameters']:>14,} {row['tokens_per_s']:>9.1f} {row['rel_latency']:>7.3f} "
                f"{lo:>7.3f}..{hi:<7.3f}"
            )

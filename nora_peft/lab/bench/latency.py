"""``--what latency``: the paper's claim (5) -- unmerged NoRA vs merged LoRA vs unmerged LoRA, prefill and decode.

The variants are built once; every *round* times prefill (one forward of ``batch x seq_len`` tokens) and decode
(greedy ``generate`` of ``decode_tokens`` after a ``decode_prompt``-token prompt, KV cache) of every variant
alternately, ``repeats`` times each, and keeps every time and the medians. A round's overhead is the median over
repeats of the paired ratio (the variants of one repeat ran back to back); the 95% CIs are Student-t over rounds
(``lab.stats.latency_overheads``). The study's latency step stores :func:`measure_latency`'s result as
``latency.json``; the report only reads it.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn as nn

from ...methods import AdapterSpec
from ..stats import latency_overheads, mean_ci
from .harness import alternate, log, median_ms, random_ids, small_llama
from .infer import adapter_variants, generate_fn, prefill_fn

#: the variants of claim (5), by role
ROLES = ("base", "lora_merged", "lora_unmerged", "nora_unmerged")


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


def measure_latency(
    model: nn.Module,
    adapter: dict[str, Any] | None = None,
    *,
    rank: int = 8,
    batch_size: int = 1,
    seq_len: int = 128,
    repeats: int = 10,
    rounds: int = 3,
    decode_tokens: int = 32,
    decode_prompt: int = 16,
    decode_repeats: int = 3,
    warmup: int = 2,
) -> dict[str, Any]:
    """Claim-(5) latency of ``model`` with LoRA and NoRA at ``rank`` (``adapter``: further ``AdapterSpec`` fields).

    Returns ``{"rank", "rounds": [[prefill rows]], "decode_rounds": [[decode rows]], "setting", "decode_setting"}``;
    a row is ``{"label", "role", "ms", "rel_latency", "tokens_per_s" | "decode_tokens_per_s", "method", "r",
    "merged"}``. ``decode_tokens=0`` skips decode. ``model`` is not modified.
    """
    adapter = dict(adapter or {})
    device = next(model.parameters()).device
    specs = [AdapterSpec(method=m, r=rank, **adapter) for m in ("lora", "nora")]
    variants = {k: v for k, v in adapter_variants(model, specs).items() if _role(v[1]) in ROLES}
    ids = random_ids(batch_size, seq_len, model.config.vocab_size, device)
    prompt = random_ids(batch_size, decode_prompt, model.config.vocab_size, device, seed=2)
    prefill = {k: prefill_fn(m, ids) for k, (m, _) in variants.items()}
    decode = {k: generate_fn(m, prompt, decode_tokens) for k, (m, _) in variants.items()}
    out: dict[str, Any] = {"rank": rank, "rounds": [], "decode_rounds": []}
    for i in range(rounds):
        log(f"latency round {i + 1}/{rounds}: prefill {batch_size}x{seq_len}, decode {decode_tokens} tokens")
        times = alternate(prefill, repeats=repeats, warmup=warmup if i == 0 else 1, device=device)
        out["rounds"].append(_round_rows(variants, times, batch_size * seq_len, "tokens_per_s"))
        if decode_tokens:
            times = alternate(decode, repeats=decode_repeats, warmup=1, device=device)
            out["decode_rounds"].append(_round_rows(variants, times, batch_size * decode_tokens, "decode_tokens_per_s"))
    where = f"{device}, {torch.get_num_threads()} threads, {next(model.parameters()).dtype}"
    targets = adapter.get("target_modules", "the adapter default targets")
    out["setting"] = f"r={rank} on {targets}, prefill batch {batch_size} x {seq_len} tokens, {where}"
    out["decode_setting"] = (
        f"r={rank}, greedy decode of {decode_tokens} tokens after a {decode_prompt}-token prompt, batch {batch_size}, "
        f"KV cache, {where}"
    )
    return out


def load_bench_model(name: str | None, args: argparse.Namespace, device: torch.device) -> nn.Module:
    """``--model NAME`` (a named base or folder, via ``nora_peft.bases``) or the random-init Llama, in eval mode."""
    if not name:
        return small_llama(32 if args.quick else args.hidden, 1 if args.quick else 4, device=device)
    from ...bases.named import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(name)
    return model.to(device).eval()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--rounds``: latency rounds (CIs are over rounds)."""
    parser.add_argument("--rounds", type=int, default=None, help="latency: rounds (95%% CIs over rounds; default 5)")


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The section's results under the key ``latency``."""
    q = args.quick
    model = load_bench_model(args.model, args, device)
    targets = args.targets.split(",") if args.targets else None
    return {
        "latency": measure_latency(
            model,
            {"target_modules": targets} if targets else None,
            rank=args.rank or 8,
            seq_len=16 if q else 128,
            repeats=args.repeats or (2 if q else 10),
            rounds=args.rounds or (2 if q else 5),
            decode_tokens=4 if q else 32,
            decode_repeats=1 if q else 3,
            warmup=1,
        )
        | {"model": args.model or "random-init Llama"}
    }


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

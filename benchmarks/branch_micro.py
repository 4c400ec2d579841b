"""One adapted layer, fwd + bwd, measured alternately: peft-LoRA's formula (``s * B(A x)`` with autograd) vs
``nora_peft.tuner.ops.nora_delta`` (silu; its own autograd function). Prints JSON.

    python benchmarks/branch_micro.py [--tokens 1024] [--width 256] [--repeats 80]

Isolates the adapter branch from the rest of the model: the whole-model step is ``nora bench --what train``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nora_peft.tuner.ops import nora_delta


def measure(r: int, n: int, k: int, repeats: int) -> dict:
    """Median ms of fwd + bwd for LoRA's and NoRA's branch at rank ``r``."""
    x = torch.randn(n, k, requires_grad=True)
    w_up = torch.randn(r, k, requires_grad=True)
    w_down = torch.randn(k, r, requires_grad=True)
    g = torch.randn(n, k)
    fns = {
        "lora": lambda: ((x @ w_up.t() @ w_down.t()) * 2.0).backward(g),
        "nora": lambda: nora_delta(x, w_up, w_down, 2.0, "silu").backward(g),
    }
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        for name in fns if i % 2 == 0 else list(fns)[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
    return {"ms": ms, "nora_over_lora": ms["nora"] / ms["lora"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--repeats", type=int, default=80)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {f"r{r}": measure(r, args.tokens, args.width, args.repeats) for r in (8, 64)}
    print(
        json.dumps({"tokens": args.tokens, "width": args.width, "threads": args.threads, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()

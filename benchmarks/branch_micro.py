"""One adapted layer, measured alternately. Prints JSON.

``--mode train`` (default): fwd + bwd of peft-LoRA's formula (``s * B(A x)`` with autograd) vs ``nora_delta`` (silu;
its own autograd function). ``--mode infer``: the eval forward (``torch.inference_mode``) of one NoRA-adapted
``nn.Linear`` (the layer peft builds, called directly) vs peft's LoRA layer vs the bare linear, at decode (1 token)
and prefill (``--tokens``) shapes; it uses only the public API, so the same script times any version of the package
(``PYTHONPATH=<checkout>``).

    python benchmarks/branch_micro.py [--mode train|infer] [--tokens 1024] [--width 256] [--repeats 80]

Isolates the adapter branch from the rest of the model: the whole-model numbers are ``nora bench --what train`` /
``--what infer``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nora_peft import nora_delta


def _alternate(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms of each function, called in alternating order after one warm-up call each."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        for name in fns if i % 2 == 0 else list(fns)[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(v) for name, v in times.items()}


def measure_infer(r: int, n: int, k: int, repeats: int) -> dict:
    """Median ms of the eval forward of the bare linear, peft's LoRA layer and the NoRA layer at rank ``r``."""
    from peft import LoraConfig, get_peft_model

    from nora_peft import NoraConfig

    def adapted(config) -> torch.nn.Module:
        torch.manual_seed(0)
        return get_peft_model(torch.nn.Sequential(torch.nn.Linear(k, k)), config).eval().base_model.model[0]

    torch.manual_seed(0)
    base = torch.nn.Linear(k, k).eval()
    lora = adapted(LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False))
    nora = adapted(NoraConfig(r=r, alpha=2 * r, target_modules=["0"], init_weights=False))
    out = {}
    for shape, tokens in (("decode", 1), ("prefill", n)):
        x = torch.randn(1, tokens, k)

        def call(layer, x=x):
            def run() -> None:
                with torch.inference_mode():
                    layer(x)

            return run

        ms = _alternate({"base": call(base), "lora": call(lora), "nora": call(nora)}, repeats)
        out[shape] = {"tokens": tokens, "ms": ms, "nora_over_base": ms["nora"] / ms["base"],
                      "nora_over_lora": ms["nora"] / ms["lora"]}  # fmt: skip
    return out


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
    ms = _alternate(fns, repeats)
    return {"ms": ms, "nora_over_lora": ms["nora"] / ms["lora"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--repeats", type=int, default=80)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fn = measure if args.mode == "train" else measure_infer
    results = {f"r{r}": fn(r, args.tokens, args.width, args.repeats) for r in (8, 64)}
    head = {"mode": args.mode, "tokens": args.tokens, "width": args.width, "threads": args.threads}
    print(json.dumps({**head, "results": results}, indent=2))


if __name__ == "__main__":
    main()

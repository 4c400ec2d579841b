"""One adapted layer, fwd + bwd, measured alternately: peft-LoRA's formula vs ``nora_peft.ops.nora_delta`` (silu) vs a
*proposed* variant of NoRA's autograd function (scaling applied to the r-wide latent instead of the d-wide output,
and the activation derivative through torch's fused ``silu_backward``). Prints JSON.

    python benchmarks/branch_micro.py [--tokens 1024] [--width 256] [--repeats 80]

The proposed variant is checked against ``nora_delta`` (outputs and all three gradients) before timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from nora_peft.ops import nora_delta


class ProposedNoraDelta(torch.autograd.Function):
    """``s * W_down silu(W_up x)``: scale the (N, r) latent, fused derivative; saves x (reference) and z, like ops."""

    @staticmethod
    def forward(ctx, x, w_up, w_down, s):  # type: ignore[override]
        z = x @ w_up.t()
        ctx.save_for_backward(x, z, w_up, w_down)
        ctx.s = s
        return (F.silu(z) * s) @ w_down.t()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, z, w_up, w_down = ctx.saved_tensors
        a = F.silu(z).reshape(-1, z.shape[-1])
        grad_w_down = (g.reshape(-1, g.shape[-1]).t() @ a) * ctx.s
        gz = torch.ops.aten.silu_backward((g @ w_down) * ctx.s, z)
        grad_w_up = gz.reshape(-1, gz.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return gz @ w_up, grad_w_up, grad_w_down, None


def measure(r: int, n: int, k: int, repeats: int) -> dict:
    """Median ms of fwd + bwd for the three variants at rank ``r`` (checked equal first)."""
    x = torch.randn(n, k, requires_grad=True)
    w_up = torch.randn(r, k, requires_grad=True)
    w_down = torch.randn(k, r, requires_grad=True)
    g = torch.randn(n, k)
    ref = torch.autograd.grad(nora_delta(x, w_up, w_down, 2.0, "silu"), (x, w_up, w_down), g)
    new = torch.autograd.grad(ProposedNoraDelta.apply(x, w_up, w_down, 2.0), (x, w_up, w_down), g)
    for a, b in zip(ref, new):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-2)
    fns = {
        "lora": lambda: ((x @ w_up.t() @ w_down.t()) * 2.0).backward(g),
        "nora": lambda: nora_delta(x, w_up, w_down, 2.0, "silu").backward(g),
        "nora_proposed": lambda: ProposedNoraDelta.apply(x, w_up, w_down, 2.0).backward(g),
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
    return {
        "ms": ms,
        "nora_over_lora": ms["nora"] / ms["lora"],
        "nora_proposed_over_lora": ms["nora_proposed"] / ms["lora"],
    }


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

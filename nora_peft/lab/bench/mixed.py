"""``--what mixed``: batches whose rows use 1, 8, 32, 128 distinct adapters, measured alternately.

Variants: ``base`` (no adapters); ``nora_one`` (every row the same NoRA adapter, plain forward); ``nora_mixed`` (the
gathered one-pass ``peft_model(ids, adapter_names=...)``); ``stacked_mixed`` (the same gathered pass of core
``nora_peft.kernels.mixed`` hooked onto the bare base, without peft's per-forward hooks -- the shape a server uses);
``lora_one``; ``lora_peft_loop`` (peft's ``adapter_names=`` with LoRA adapters, one pass per adapter). Reported as
adapter overhead (time minus the base model's) and whole-forward throughput ratios.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ...kernels.mixed import mixed_delta, stack_adapters
from ...methods import AdapterSpec, build_peft_model
from ...tuner.layer import NoraLayer
from .harness import ALL_LINEAR, alternate, load_bench_model, log, median_ms, random_ids, small_llama


def multi_adapter_model(base: nn.Module, spec: AdapterSpec, n: int) -> tuple[nn.Module, list[str]]:
    """A copy of ``base`` with ``n`` adapters ``ad0..`` of ``spec`` (``ad0`` active), in eval mode."""
    names = [f"ad{i}" for i in range(n)]
    torch.manual_seed(0)
    model = build_peft_model(copy.deepcopy(base), spec, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, spec.to_peft_config())
    model.set_adapter(names[0])
    return model.eval(), names


class StackedModel:
    """A copy of ``base`` whose adapted linears add ``mixed_delta`` of ``nora``'s adapters, stacked once.

    Call with ``(ids, row_index)``; ``row_index[b]`` is the slot of row ``b``'s adapter (the order of ``names``).
    """

    def __init__(self, base: nn.Module, nora: nn.Module, names: list[str]) -> None:
        self.model = copy.deepcopy(base)
        self.index: torch.Tensor | None = None
        modules = dict(self.model.named_modules())
        for path, layer in nora.named_modules():
            if not isinstance(layer, NoraLayer):
                continue
            stacked = stack_adapters(
                [
                    (n, layer.nora_up[n].weight, layer.nora_down[n].weight, layer.scaling[n], layer.nora_activation[n])
                    for n in names
                ]
            )
            modules[path.removeprefix("base_model.model.")].register_forward_hook(self._hook(stacked))

    def _hook(self, stacked: Any) -> Callable:
        def add_delta(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + mixed_delta(inputs[0], stacked, self.index).to(output.dtype)

        return add_delta

    def __call__(self, ids: torch.Tensor, row_index: torch.Tensor) -> None:
        self.index = row_index
        try:
            with torch.inference_mode():
                self.model(input_ids=ids)
        finally:
            self.index = None


def _forward(m: nn.Module, ids: torch.Tensor, adapter_names: list[str] | None = None) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            if adapter_names is None:
                m(input_ids=ids)
            else:
                m(input_ids=ids, adapter_names=adapter_names)

    return run


def _mixed_row(n: int, batch: int, seq_len: int, hidden: int, r: int, times: dict[str, list[float]]) -> dict:
    ms = {k: median_ms(v) for k, v in times.items()}
    over = {k: median_ms([a - b for a, b in zip(times[k], times["base"])]) for k in ms if k != "base"}
    return {
        "n_adapters": n,
        "batch_size": batch,
        "seq_len": seq_len,
        "hidden": hidden,
        "r": r,
        "ms": ms,
        "overhead_ms": over,
        "overhead_ratio_mixed_over_one": over["nora_mixed"] / over["nora_one"],
        "overhead_ratio_mixed_over_peft_loop": over["nora_mixed"] / over["lora_peft_loop"],
        "overhead_ratio_stacked_mixed_over_one": over["stacked_mixed"] / over["nora_one"],
        "overhead_ratio_stacked_mixed_over_peft_loop": over["stacked_mixed"] / over["lora_peft_loop"],
        "throughput_ratio_mixed_over_base": ms["base"] / ms["nora_mixed"],
        "throughput_ratio_mixed_over_one": ms["nora_one"] / ms["nora_mixed"],
        "throughput_ratio_mixed_over_peft_loop": ms["lora_peft_loop"] / ms["nora_mixed"],
    }


def bench_mixed(
    *,
    n_adapters: tuple[int, ...] = (1, 8, 32, 128),
    batch_size: int = 32,
    seq_len: int = 32,
    r: int = 8,
    hidden: int = 256,
    layers: int = 4,
    repeats: int = 10,
    warmup: int = 2,
    targets: list[str] | None = None,
    device: torch.device | None = None,
    base: nn.Module | None = None,
) -> list[dict]:
    """Per n distinct adapters in a batch of ``max(batch_size, n)`` rows (round-robin), every variant alternately,
    on ``base`` (default: a random-init Llama of ``hidden`` x ``layers``)."""
    device = device or torch.device("cpu")
    base = base if base is not None else small_llama(hidden, layers, device=device)
    hidden = base.config.hidden_size
    targets = targets or ALL_LINEAR
    rows = []
    for n in n_adapters:
        batch = max(batch_size, n)
        ids = random_ids(batch, seq_len, base.config.vocab_size, device)
        nora_spec = AdapterSpec(method="nora", r=r, target_modules=targets, extra={"init_weights": False})
        nora, names = multi_adapter_model(base, nora_spec, n)
        lora, _ = multi_adapter_model(base, AdapterSpec(method="lora", r=r, target_modules=targets), n)
        row_names = [names[i % n] for i in range(batch)]
        stacked = StackedModel(base, nora, names)
        row_index = torch.tensor([i % n for i in range(batch)], device=device)
        fns = {
            "base": _forward(base, ids),
            "nora_one": _forward(nora, ids),
            "nora_mixed": _forward(nora, ids, row_names),
            "stacked_mixed": lambda s=stacked, ids=ids, idx=row_index: s(ids, idx),
            "lora_one": _forward(lora, ids),
            "lora_peft_loop": _forward(lora, ids, row_names),
        }
        log(f"mixed n_adapters={n} batch={batch} seq={seq_len} hidden={hidden}: {repeats} alternating repeats")
        times = alternate(fns, repeats=repeats, warmup=warmup, device=device)
        rows.append(_mixed_row(n, batch, seq_len, hidden, r, times))
        del nora, lora, stacked
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--large-hidden``: the width of the extra wide configuration; ``--mixed-parts``: which shapes to run."""
    parser.add_argument(
        "--large-hidden", type=int, default=1024, help="mixed: the larger config's hidden size (0: skip)"
    )
    parser.add_argument(
        "--mixed-parts",
        default=None,
        help="mixed: comma list of prefill, decode, large (default: all; --quick: prefill; with --model: no large)",
    )


def _parts(args: argparse.Namespace) -> set[str]:
    default = "prefill" if args.quick else "prefill,decode" if args.model else "prefill,decode,large"
    parts = {p.strip() for p in (args.mixed_parts or default).split(",") if p.strip()}
    if parts - {"prefill", "decode", "large"}:
        raise SystemExit(f"--mixed-parts: unknown {sorted(parts - {'prefill', 'decode', 'large'})}")
    return parts


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """``mixed`` (prefill shape), ``mixed_decode`` (1 token/row) and ``mixed_large`` (``--mixed-parts``), on the
    random Llama or ``--model`` (e.g. ``shape:llama-3-8b``), at ``--rank`` (8) on ``--targets`` (all linears)."""
    q, rep = args.quick, args.repeats
    parts = _parts(args)
    hidden, layers = (32, 1) if q else (args.hidden, 4)
    base = load_bench_model(args.model, args, device) if args.model else None
    targets = args.targets.split(",") if args.targets else None
    common = {"repeats": rep or (2 if q else 20), "warmup": 1 if q else 2, "device": device}
    common |= {"base": base, "targets": targets, "r": args.rank or 8}
    out = {}
    if "prefill" in parts:
        out["mixed"] = bench_mixed(
            n_adapters=(1, 4) if q else (1, 8, 32, 128),
            batch_size=4 if q else 32,
            seq_len=4 if q else 32,
            hidden=hidden,
            layers=layers,
            **common,
        )
    if "decode" in parts:
        out["mixed_decode"] = bench_mixed(
            n_adapters=(1, 4) if q else (1, 32),
            batch_size=4 if q else 32,
            seq_len=1,
            hidden=hidden,
            layers=layers,
            **common,
        )
    if "large" in parts and args.large_hidden:
        out["mixed_large"] = bench_mixed(
            n_adapters=(32,),
            batch_size=32,
            seq_len=16,
            hidden=args.large_hidden,
            layers=4,
            repeats=rep or 7,
            warmup=1,
            device=device,
            r=args.rank or 8,
            targets=targets,
        )
    return out


def print_tables(results: dict[str, Any]) -> None:
    """One table per mixed shape present in ``results``."""
    for key in ("mixed", "mixed_decode", "mixed_large"):
        if key not in results:
            continue
        print(f"\n{key}: adapter overhead = time - base time (ms); ratios of overheads / of throughputs")
        print(
            f"{'n':>4} {'rows':>4} {'base':>7} {'one':>7} {'mixed':>7} {'stack':>7} {'peft':>7} "
            f"{'mix/one':>8} {'mix/peft':>8} {'stk/one':>8} {'stk/peft':>8} {'thr mix/base':>12} {'thr mix/peft':>12}"
        )
        for row in results[key]:
            o = row["overhead_ms"]
            print(
                f"{row['n_adapters']:>4} {row['batch_size']:>4} {row['ms']['base']:>7.1f} {o['nora_one']:>7.2f} "
                f"{o['nora_mixed']:>7.2f} {o['stacked_mixed']:>7.2f} {o['lora_peft_loop']:>7.2f} "
                f"{row['overhead_ratio_mixed_over_one']:>8.3f} {row['overhead_ratio_mixed_over_peft_loop']:>8.3f} "
                f"{row['overhead_ratio_stacked_mixed_over_one']:>8.3f} "
                f"{row['overhead_ratio_stacked_mixed_over_peft_loop']:>8.3f} "
                f"{row['throughput_ratio_mixed_over_base']:>12.3f} "
                f"{row['throughput_ratio_mixed_over_peft_loop']:>12.3f}"
            )

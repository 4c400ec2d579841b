"""Side-by-side speed and memory benchmarks, reported as medians and ratios; ``nora bench --what SECTION,...``.

Every comparison is measured *alternately* in one run (see :mod:`.harness`). Each section is one module, listed in
:data:`SECTIONS`; a section module provides

* ``run(args, device) -> dict``: its results, as top-level keys of the JSON (e.g. ``{"train": [...]}``);
* ``print_tables(results) -> None``: the human tables of those keys;
* optionally ``add_arguments(parser)``: its own flags (module-level imports stay light: torch and the core; heavier
  ones go inside ``run``, so ``nora bench --help`` stays cheap).

To add a section, write the module and add one line to :data:`SECTIONS`. All adapters are built with
``nora_peft.methods.AdapterSpec`` / ``build_peft_model``. CPU or CUDA (``--device``). The lab never imports the
server: a section that measures ``nora serve`` talks to it over loopback HTTP.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import time
from types import ModuleType
from typing import Any

import torch

from ...io import write_json_atomic
from .harness import alternate, pick_device, saved_activation_bytes, small_llama
from .infer import decode_throughput, latency_table

__all__ = [
    "SECTIONS",
    "alternate",
    "decode_throughput",
    "latency_table",
    "pick_device",
    "run",
    "saved_activation_bytes",
    "small_llama",
]

#: section name -> (module under nora_peft.lab.bench, one-line help); ``--what`` dispatches here
SECTIONS: dict[str, tuple[str, str]] = {
    "train": ("train", "NoRA vs LoRA training step time and activation memory (random-init Llama)"),
    "infer": ("infer", "prefill/decode speed: base, merged and unmerged LoRA, unmerged NoRA (Table 3)"),
    "mixed": ("mixed", "batches mixing 1-128 adapters: gathered one pass vs peft's per-adapter loop"),
    "latency": ("latency", "claim (5): unmerged NoRA vs merged/unmerged LoRA prefill and decode latency, with CIs"),
    "real": ("real", "a real model (--model smollm2-135m): step time, memory and decode tok/s, NoRA vs LoRA"),
    "load": ("load", "open-loop load generator against nora serve (Poisson arrivals, many adapters)"),
}
DEFAULT_SECTIONS = "train,infer,mixed"


def available_sections() -> list[str]:
    """Sections whose module is present in this checkout."""
    return [n for n, (mod, _) in SECTIONS.items() if importlib.util.find_spec(f"{__name__}.{mod}") is not None]


def section_module(name: str) -> ModuleType:
    """The module implementing section ``name``."""
    return importlib.import_module(f"{__name__}.{SECTIONS[name][0]}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared flags, then each section's own (in a group named after it)."""
    names = available_sections()
    listing = "; ".join(f"{n}: {SECTIONS[n][1]}" for n in names)
    parser.add_argument("--what", default=DEFAULT_SECTIONS, help=f"comma list of sections ({listing})")
    parser.add_argument("--json", default=None, help="write the results here (atomically)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default per section)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random-init benchmark Llama")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats (a smoke run, not numbers)")
    parser.add_argument(
        "--model",
        default=None,
        help="a benchmark shape (shape:llama-3-8b, shape:llama-3-1b, shape:smollm2-135m, shape:tiny: random init, "
        "bf16), a named base (smollm2-135m) or HF folder (default: the random Llama of --hidden)",
    )
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="cast --model to this dtype")
    parser.add_argument("--rank", type=int, default=None, help="latency/real/mixed: adapter rank (default per section)")
    parser.add_argument(
        "--ranks", default=None, help="latency/train: comma list of unmerged adapter ranks (latency default: --rank)"
    )
    parser.add_argument(
        "--decode",
        default="eager",
        help="infer/latency: comma list of decode paths: eager (generate), static (static KV cache), graph (static "
        "KV cache + CUDA graph; as static on a CPU)",
    )
    parser.add_argument("--seq-len", type=int, default=None, help="train/real: training sequence length")
    parser.add_argument("--batch-size", type=int, default=None, help="train/real: training batch size")
    parser.add_argument(
        "--targets", default=None, help="latency/real/load: comma list of module names to adapt (default per section)"
    )
    for name in names:
        module = section_module(name)
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser.add_argument_group(f"{name} section"))


def _sections(what: str) -> list[str]:
    names = [w.strip() for w in what.split(",") if w.strip()]
    known = available_sections()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--what: unknown section(s) {unknown}; choose from {', '.join(known)}.")
    return names


def _meta(device: torch.device, quick: bool) -> dict[str, Any]:
    return {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": quick,
        "cuda_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run(args: argparse.Namespace) -> dict:
    """Run the sections ``args.what`` names and return the results dict (what ``--json`` writes)."""
    names = _sections(args.what)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    results: dict[str, Any] = {"meta": _meta(device, args.quick)}
    for name in names:
        results |= section_module(name).run(args, device)
    return results


def main(args: argparse.Namespace) -> int:
    """``nora bench``: run, print each section's tables, write or print the JSON."""
    results = run(args)
    for name in _sections(args.what):
        section_module(name).print_tables(results)
    if args.json:
        write_json_atomic(args.json, results)
        print(f"\nwrote {args.json}")
    else:
        print(json.dumps(results, indent=2, default=str))
    return 0

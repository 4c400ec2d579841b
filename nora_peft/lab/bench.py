"""Side-by-side speed and memory benchmarks, reported as medians and ratios; ``nora bench``.

Every comparison is measured *alternately* in one run: each repeat times every variant once (in alternating order),
so slow drifts of a shared machine hit all variants alike. Three sections:

* ``train``: fwd + bwd + AdamW step time and activation memory, NoRA vs peft LoRA at equal rank (and dropout).
  Memory on CPU is the bytes of the unique tensor storages the autograd graph saves for backward (via
  ``torch.autograd.graph.saved_tensors_hooks``), parameters excluded; on CUDA it is ``torch.cuda.max_memory_allocated``
  during the step minus what was allocated before it.
* ``infer``: prefill latency / throughput and decode throughput (batch 1 and 16) of the base model, merged LoRA,
  unmerged LoRA and unmerged NoRA by rank (the paper's Table 3); :func:`latency_table` is the reusable part.
* ``mixed``: batches whose rows use 1, 8, 32, 128 distinct adapters: the gathered one-pass NoRA forward vs the same
  batch with one adapter vs peft's per-adapter loop (``adapter_names=`` with LoRA adapters), as adapter overhead
  (time minus the base model's) and whole-forward throughput ratios.

All adapters are built with ``nora_peft.methods.AdapterSpec`` / ``build_peft_model``. CPU or CUDA (``--device``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..methods import AdapterSpec, build_peft_model
from .io import write_json_atomic

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- helpers --------------------------------------------------------------------------------------------------
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def small_llama(
    hidden: int = 256,
    layers: int = 4,
    vocab: int = 1024,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A random-init Llama from a config (no download), in eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or int(hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(device).eval()


def alternate(
    fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each variant, interleaved: every repeat runs every variant once, order alternating."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def _ids(batch: int, length: int, vocab: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def saved_activation_bytes(model: nn.Module, fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn()`` runs (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


# -- training ---------------------------------------------------------------------------------------------------
def bench_train(
    *,
    ranks: tuple[int, ...] = (8, 64),
    dropouts: tuple[float, ...] = (0.0, 0.05),
    hidden: int = 256,
    layers: int = 4,
    seq_len: int = 128,
    batch_size: int = 8,
    repeats: int = 10,
    warmup: int = 2,
    targets: list[str] | None = None,
    device: torch.device | None = None,
) -> list[dict]:
    """NoRA vs peft LoRA training step (fwd + bwd + AdamW) at equal rank and dropout, measured alternately."""
    device = device or pick_device()
    base = small_llama(hidden, layers, device=device)
    ids = _ids(batch_size, seq_len, base.config.vocab_size, device)
    rows = []
    for r in ranks:
        for p in dropouts:
            models, steps, memory = {}, {}, {}
            for method in ("lora", "nora"):
                spec = AdapterSpec(method=method, r=r, dropout=p, target_modules=targets or ALL_LINEAR)
                torch.manual_seed(0)
                model = build_peft_model(copy.deepcopy(base), spec).train()
                opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)

                def step(model=model, opt=opt) -> None:
                    model(input_ids=ids, labels=ids).loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                models[method], steps[method] = model, step
                step()  # AdamW state allocated before measuring memory
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                    step()
                    memory[method] = torch.cuda.max_memory_allocated(device) - before
                else:
                    memory[method] = saved_activation_bytes(model, lambda m=model: m(input_ids=ids, labels=ids).loss)
                    model.zero_grad(set_to_none=True)
            _log(f"train r={r} dropout={p}: timing {repeats} alternating repeats")
            times = alternate(steps, repeats=repeats, warmup=warmup, device=device)
            ms = {m: _median_ms(t) for m, t in times.items()}
            rows.append(
                {
                    "r": r,
                    "dropout": p,
                    "lora_ms": ms["lora"],
                    "nora_ms": ms["nora"],
                    "time_ratio_nora_over_lora": ms["nora"] / ms["lora"],
                    "lora_mem_bytes": memory["lora"],
                    "nora_mem_bytes": memory["nora"],
                    "mem_ratio_nora_over_lora": memory["nora"] / memory["lora"],
                    "memory_measure": "cuda_max_allocated_during_step"
                    if device.type == "cuda"
                    else "saved_for_backward_unique_storages_excl_params",
                    "lora_step_times_ms": [1000 * t for t in times["lora"]],
                    "nora_step_times_ms": [1000 * t for t in times["nora"]],
                }
            )
            del models, steps
    return rows


# -- inference latency (Table 3) ----------------------------------------------------------------------------------
def _variants(model: nn.Module, specs: list[AdapterSpec], merged_lora: bool) -> dict[str, tuple[nn.Module, dict]]:
    """label -> (model, info): the base, and per spec the unmerged adapter (and merged, for LoRA methods)."""
    out: dict[str, tuple[nn.Module, dict]] = {"base": (model, {"method": "base", "r": 0, "merged": False})}
    for spec in specs:
        torch.manual_seed(0)
        peft_model = build_peft_model(copy.deepcopy(model), spec).eval()
        info = {"method": spec.method, "r": spec.r}
        out[spec.label()] = (peft_model, {**info, "merged": False})
        mergeable = spec.method in ("lora", "rslora") or (spec.method == "nora" and spec.activation == "identity")
        if merged_lora and mergeable:
            merged = build_peft_model(copy.deepcopy(model), spec).eval().merge_and_unload()
            out[spec.label() + "-merged"] = (merged, {**info, "merged": True})
    return out


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
    ids = _ids(batch_size, seq_len, model.config.vocab_size, device)
    variants = _variants(model, specs, merged_lora)

    def forward(m: nn.Module) -> Callable[[], Any]:
        def run() -> None:
            with torch.inference_mode():
                m(input_ids=ids)

        return run

    times = alternate({k: forward(m) for k, (m, _) in variants.items()}, repeats=repeats, warmup=warmup, device=device)
    base_ms = _median_ms(times["base"])
    rows = []
    for label, (_, info) in variants.items():
        ms = _median_ms(times[label])
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
    ids = _ids(batch_size, prompt_len, model.config.vocab_size, device)
    variants = _variants(model, specs, merged_lora=True)

    def gen(m: nn.Module) -> Callable[[], Any]:
        def run() -> None:
            with torch.inference_mode():
                m.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )

        return run

    times = alternate({k: gen(m) for k, (m, _) in variants.items()}, repeats=repeats, warmup=warmup, device=device)
    base_ms = _median_ms(times["base"])
    return [
        {
            "label": label,
            "batch_size": batch_size,
            "ms": _median_ms(times[label]),
            "rel_latency": _median_ms(times[label]) / base_ms,
            "decode_tokens_per_s": batch_size * new_tokens / _median_ms(times[label]) * 1000,
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
    device = device or pick_device()
    model = small_llama(hidden, layers, device=device)
    specs = [AdapterSpec(method=m, r=r, target_modules=targets or ALL_LINEAR) for r in ranks for m in ("lora", "nora")]
    out: dict[str, Any] = {}
    for batch in (1, 16):
        _log(f"infer prefill batch={batch} seq={seq_len}")
        out[f"prefill_b{batch}"] = latency_table(model, specs, batch_size=batch, seq_len=seq_len, repeats=repeats)
    for batch in decode_batches:
        _log(f"infer decode batch={batch} new_tokens={new_tokens}")
        out[f"decode_b{batch}"] = decode_throughput(
            model, specs, batch_size=batch, new_tokens=new_tokens, repeats=max(3, repeats // 4)
        )
    return out


# -- mixed-adapter batches -----------------------------------------------------------------------------------------
def _multi_adapter_model(base: nn.Module, spec: AdapterSpec, n: int) -> tuple[nn.Module, list[str]]:
    names = [f"ad{i}" for i in range(n)]
    torch.manual_seed(0)
    model = build_peft_model(copy.deepcopy(base), spec, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, spec.to_peft_config())
    model.set_adapter(names[0])
    return model.eval(), names


def _engine_model(base: nn.Module, nora: nn.Module, names: list[str]) -> tuple[nn.Module, Any]:
    """A copy of ``base`` with ``nora``'s adapters in a serving ``AdapterPool`` (the ``nora serve`` path)."""
    from ..layer import NoraLayer
    from ..serve.adapters import AdapterWeights
    from ..serve.engine import AdapterPool

    model = copy.deepcopy(base)
    pool = AdapterPool(model, capacity=len(names))
    layers = [(n.removeprefix("base_model.model."), m) for n, m in nora.named_modules() if isinstance(m, NoraLayer)]
    for name in names:
        adapter = AdapterWeights(name=name, path="", method="nora", activation=layers[0][1].nora_activation[name])
        for module, layer in layers:
            adapter.modules[module] = (
                layer.nora_up[name].weight.detach(),
                layer.nora_down[name].weight.detach(),
                layer.scaling[name],
            )
        pool.add(adapter)
    return model, pool


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
) -> list[dict]:
    """Per n distinct adapters in a batch of ``max(batch_size, n)`` rows (round-robin), alternately:
    ``base`` (no adapters), ``nora_one`` (every row the same NoRA adapter, plain forward), ``nora_mixed`` (the
    gathered one-pass ``adapter_names=`` forward), ``lora_one``, ``lora_peft_loop`` (peft's ``adapter_names=``,
    one pass per adapter)."""
    device = device or pick_device()
    base = small_llama(hidden, layers, device=device)
    rows = []
    for n in n_adapters:
        batch = max(batch_size, n)
        ids = _ids(batch, seq_len, base.config.vocab_size, device)
        targets = targets or ALL_LINEAR
        nora, names = _multi_adapter_model(
            base, AdapterSpec(method="nora", r=r, target_modules=targets, extra={"init_weights": False}), n
        )
        lora, _ = _multi_adapter_model(base, AdapterSpec(method="lora", r=r, target_modules=targets), n)
        row_names = [names[i % n] for i in range(batch)]
        served, pool = _engine_model(base, nora, names)
        row_slots = torch.tensor([pool.slots[name] for name in row_names], device=device)

        def serve_fwd(served: nn.Module = served, pool: Any = pool, row_slots=row_slots, ids=ids) -> None:
            pool.index = row_slots
            try:
                with torch.inference_mode():
                    served(input_ids=ids)
            finally:
                pool.index = None

        def fwd(m: nn.Module, adapter_names: list[str] | None = None, ids: torch.Tensor = ids) -> Callable[[], Any]:
            def run() -> None:
                with torch.inference_mode():
                    if adapter_names is None:
                        m(input_ids=ids)
                    else:
                        m(input_ids=ids, adapter_names=adapter_names)

            return run

        fns = {
            "base": fwd(base),
            "nora_one": fwd(nora),
            "nora_mixed": fwd(nora, row_names),
            "serve_mixed": serve_fwd,
            "lora_one": fwd(lora),
            "lora_peft_loop": fwd(lora, row_names),
        }
        _log(f"mixed n_adapters={n} batch={batch} seq={seq_len} hidden={hidden}: {repeats} alternating repeats")
        times = alternate(fns, repeats=repeats, warmup=warmup, device=device)
        ms = {k: _median_ms(v) for k, v in times.items()}
        over = {k: _median_ms([a - b for a, b in zip(times[k], times["base"])]) for k in ms if k != "base"}
        rows.append(
            {
                "n_adapters": n,
                "batch_size": batch,
                "seq_len": seq_len,
                "hidden": hidden,
                "r": r,
                "ms": ms,
                "overhead_ms": over,
                "overhead_ratio_mixed_over_one": over["nora_mixed"] / over["nora_one"],
                "overhead_ratio_mixed_over_peft_loop": over["nora_mixed"] / over["lora_peft_loop"],
                "overhead_ratio_serve_mixed_over_one": over["serve_mixed"] / over["nora_one"],
                "overhead_ratio_serve_mixed_over_peft_loop": over["serve_mixed"] / over["lora_peft_loop"],
                "throughput_ratio_mixed_over_base": ms["base"] / ms["nora_mixed"],
                "throughput_ratio_mixed_over_one": ms["nora_one"] / ms["nora_mixed"],
                "throughput_ratio_mixed_over_peft_loop": ms["lora_peft_loop"] / ms["nora_mixed"],
            }
        )
        del nora, lora, served
    return rows


# -- the command ----------------------------------------------------------------------------------------------------
def _print_tables(results: dict) -> None:
    if "train" in results:
        print("\ntraining step (fwd+bwd+AdamW), NoRA vs LoRA, medians")
        print(
            f"{'r':>4} {'drop':>5} {'lora ms':>9} {'nora ms':>9} {'time x':>7} "
            f"{'lora MiB':>9} {'nora MiB':>9} {'mem x':>6}"
        )
        for row in results["train"]:
            print(
                f"{row['r']:>4} {row['dropout']:>5} {row['lora_ms']:>9.1f} {row['nora_ms']:>9.1f} "
                f"{row['time_ratio_nora_over_lora']:>7.3f} {row['lora_mem_bytes'] / 2**20:>9.1f} "
                f"{row['nora_mem_bytes'] / 2**20:>9.1f} {row['mem_ratio_nora_over_lora']:>6.3f}"
            )
    if "infer" in results:
        for key, rows in results["infer"].items():
            print(f"\ninference {key}")
            col = "tokens_per_s" if key.startswith("prefill") else "decode_tokens_per_s"
            print(f"{'label':<18} {'ms':>9} {'rel':>6} {'tok/s':>10}")
            for row in rows:
                print(f"{row['label']:<18} {row['ms']:>9.2f} {row['rel_latency']:>6.3f} {row[col]:>10.0f}")
    for key in ("mixed", "mixed_decode", "mixed_large"):
        if key not in results:
            continue
        print(f"\n{key}: adapter overhead = time - base time (ms); ratios of overheads / of throughputs")
        print(
            f"{'n':>4} {'rows':>4} {'base':>7} {'one':>7} {'mixed':>7} {'serve':>7} {'peft':>7} "
            f"{'mix/one':>8} {'mix/peft':>8} {'srv/one':>8} {'srv/peft':>8} {'thr mix/base':>12} {'thr mix/peft':>12}"
        )
        for row in results[key]:
            o = row["overhead_ms"]
            print(
                f"{row['n_adapters']:>4} {row['batch_size']:>4} {row['ms']['base']:>7.1f} {o['nora_one']:>7.2f} "
                f"{o['nora_mixed']:>7.2f} {o['serve_mixed']:>7.2f} {o['lora_peft_loop']:>7.2f} "
                f"{row['overhead_ratio_mixed_over_one']:>8.3f} {row['overhead_ratio_mixed_over_peft_loop']:>8.3f} "
                f"{row['overhead_ratio_serve_mixed_over_one']:>8.3f} "
                f"{row['overhead_ratio_serve_mixed_over_peft_loop']:>8.3f} "
                f"{row['throughput_ratio_mixed_over_base']:>12.3f} "
                f"{row['throughput_ratio_mixed_over_peft_loop']:>12.3f}"
            )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--what", default="train,infer,mixed", help="comma list of: train, infer, mixed")
    parser.add_argument("--json", default=None, help="write the results here (atomically)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default per section)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the benchmark Llama")
    parser.add_argument(
        "--large-hidden", type=int, default=1024, help="mixed: the larger config's hidden size (0: skip)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats (a smoke run, not numbers)")


def run(args: argparse.Namespace) -> dict:
    """Run the sections ``args.what`` names and return the results dict (what ``--json`` writes)."""
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    unknown = set(what) - {"train", "infer", "mixed"}
    if unknown:
        raise SystemExit(f"--what: unknown section(s) {sorted(unknown)}; choose from train, infer, mixed.")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    q = args.quick
    rep = args.repeats
    results: dict[str, Any] = {
        "meta": {
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "quick": q,
            "cuda_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    }
    hidden = 32 if q else args.hidden
    layers = 1 if q else 4
    if "train" in what:
        results["train"] = bench_train(
            ranks=(8,) if q else (8, 64),
            dropouts=(0.0,) if q else (0.0, 0.05),
            hidden=hidden,
            layers=layers,
            seq_len=16 if q else 128,
            batch_size=2 if q else 8,
            repeats=rep or (2 if q else 10),
            warmup=1 if q else 2,
            device=device,
        )
    if "infer" in what:
        results["infer"] = bench_infer(
            ranks=(8,) if q else (8, 64),
            hidden=hidden,
            layers=layers,
            seq_len=16 if q else 128,
            repeats=rep or (2 if q else 20),
            decode_batches=(1,) if q else (1, 16),
            new_tokens=4 if q else 32,
            device=device,
        )
    if "mixed" in what:
        common = {"repeats": rep or (2 if q else 20), "warmup": 1 if q else 2, "device": device}
        results["mixed"] = bench_mixed(
            n_adapters=(1, 4) if q else (1, 8, 32, 128),
            batch_size=4 if q else 32,
            seq_len=4 if q else 32,
            hidden=hidden,
            layers=layers,
            **common,
        )
        if not q:
            results["mixed_decode"] = bench_mixed(
                n_adapters=(1, 32), batch_size=32, seq_len=1, hidden=hidden, layers=layers, **common
            )
            if args.large_hidden:
                results["mixed_large"] = bench_mixed(
                    n_adapters=(32,),
                    batch_size=32,
                    seq_len=16,
                    hidden=args.large_hidden,
                    layers=4,
                    repeats=rep or 7,
                    warmup=1,
                    device=device,
                )
    return results


def main(args: argparse.Namespace) -> int:
    results = run(args)
    _print_tables(results)
    if args.json:
        write_json_atomic(args.json, results)
        print(f"\nwrote {args.json}")
    else:
        print(json.dumps(results, indent=2, default=str))
    return 0

"""``--what load``: ``nora serve`` under open-loop load over loopback, continuous vs wave scheduling, side by side.

1. **Set-up.** The base (``--model``: a named base such as ``smollm2-135m`` or a folder; default the embedded tiny
   one) and ``--load-adapters`` random NoRA adapters (r = ``--rank``, on ``--targets``, default every linear layer of
   a block; random weights so each one changes the output) written to a temporary folder.
2. **Open loop.** One seeded workload: Poisson arrivals at ``--load-rate`` requests/s for ``--load-duration``
   seconds (at most ``--load-requests``), prompt and output lengths drawn from a short/medium/long mix, each request
   on a random adapter (one in eight on the base). Each policy gets the *same* workload against its own
   ``nora serve --scheduler POLICY`` subprocess (127.0.0.1 only): a request is sent at its arrival time whatever the
   server is doing (open loop: a slow server does not slow the arrivals). Streaming answers give time to first
   token (TTFT), inter-token latency (ITL) and end-to-end latency per request; tokens come from the server's own
   counters. Errors are counted, never retried.
3. **Throughput** (closed loop, same server): ``n`` concurrent requests on ``n`` different adapters vs plain
   ``transformers`` ``generate`` at batch ``n`` on the base alone in this process, alternately, n = 1 and 8.
4. **Adapter mix at one decode batch**: 32 concurrent requests all on one adapter, on 32 distinct adapters, and on
   31 r=8 adapters plus one r=256 (rank buckets: the r=8 rows do not pay for r=256), against 32 on the base; the
   decode step time is the median inter-token gap.
5. **Rank padding** (``ranks``, no server): the adapter work of one such decode step with the core functions,
   padded to one r=256 stack vs rank buckets; and 32 rows on one adapter vs on 32 distinct ones next to the time it
   takes just to read the distinct adapters' weights once (the memory-bandwidth floor of any kernel).

The server runs with ``OMP_NUM_THREADS=--threads`` (default 1) and ``--load-dtype``; every setting and the machine's
load average go into the JSON next to the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...prompt import format_chat, has_chat_template
from .harness import alternate, log, median_ms

WORDS = (
    "the robot paints a small red house near the river while two children count apples and the teacher explains "
    "why seven plus five is twelve before lunch on a sunny day in the old town"
).split()
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: ``(in_features, out_features)`` of smollm2-135m's seven linear layers per block (30 blocks)
SMOLLM2_SHAPES = {
    "q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
    "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576),
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The section's flags (all prefixed ``--load-``)."""
    parser.add_argument("--load-rate", type=float, default=None, help="load: arrivals per second (default 1.0)")
    parser.add_argument("--load-duration", type=float, default=None, help="load: seconds of arrivals (default 60)")
    parser.add_argument("--load-requests", type=int, default=None, help="load: at most this many requests (200)")
    parser.add_argument("--load-adapters", type=int, default=None, help="load: distinct adapters, 8-32 (16)")
    parser.add_argument("--load-dtype", default="auto", help="load: server and generate dtype (auto: bfloat16 on CPU)")
    parser.add_argument("--load-policies", default="continuous,wave", help="load: scheduler policies to compare")
    parser.add_argument("--load-parts", default="open,throughput,mix,ranks", help="load: which parts to run")
    parser.add_argument("--load-max-batch", type=int, default=32, help="load: the server's --max-batch-size")


@dataclass
class Job:
    """One request of the workload."""

    at: float  # seconds after the start
    model: str
    prompt: str
    max_tokens: int


@dataclass
class Outcome:
    """What the client saw of one request."""

    ok: bool = False
    error: str | None = None
    sent: float = 0.0
    first: float | None = None
    chunks: list[float] = field(default_factory=list)
    end: float = 0.0


# -- set-up --------------------------------------------------------------------------------------------------------
def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16
    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[name]


def write_adapters(
    base: torch.nn.Module, folder: Path, ranks: list[int], seed: int = 0, targets: list[str] | None = None
) -> list[str]:
    """Random NoRA adapters of ``ranks`` in ``folder``: one peft save per rank, then fresh random tensors per adapter.

    ``targets`` (default: every linear layer of a block) whose ``min(in, out)`` is below the rank are left out (the
    server refuses ranks above it).
    """
    import copy

    from safetensors.torch import load_file, save_file

    from ...methods import AdapterSpec, build_peft_model

    widths = {n.rsplit(".", 1)[-1]: min(m.in_features, m.out_features) for n, m in base.named_modules()
              if isinstance(m, torch.nn.Linear)}  # fmt: skip
    names, templates = [], {}
    for i, r in enumerate(ranks):
        if r not in templates:
            fit = [t for t in targets or ALL_LINEAR if widths.get(t, 0) >= r]
            spec = AdapterSpec(method="nora", r=r, target_modules=fit, extra={"init_weights": False})
            templates[r] = folder / f"_template_r{r}"
            build_peft_model(copy.deepcopy(base), spec).save_pretrained(str(templates[r]))
        name = f"nora-r{r}-{i}"
        (folder / name).mkdir(parents=True)
        shutil.copy(templates[r] / "adapter_config.json", folder / name / "adapter_config.json")
        g = torch.Generator().manual_seed(seed + i)
        tensors = load_file(str(templates[r] / "adapter_model.safetensors"))
        fresh = {k: torch.randn(v.shape, generator=g).to(v.dtype) / math.sqrt(v.shape[1]) for k, v in tensors.items()}
        save_file(fresh, str(folder / name / "adapter_model.safetensors"))
        names.append(name)
    for template in templates.values():
        shutil.rmtree(template)
    return names


def workload(
    tokenizer: Any, models: list[str], *, rate: float, duration: float, limit: int, quick: bool, seed: int = 0
) -> list[Job]:
    """Seeded Poisson arrivals with mixed prompt / output lengths and adapters (the same list for every policy)."""
    rng = random.Random(seed)
    prompt_words, outputs = ((4, 12, 24), (4, 8, 16)) if quick else ((12, 48, 160), (16, 48, 96))
    jobs, t = [], rng.expovariate(rate)
    while t < duration and len(jobs) < limit:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.choice(prompt_words)))
        jobs.append(Job(t, rng.choice(models), _prompt(tokenizer, text), rng.choice(outputs)))
        t += rng.expovariate(rate)
    return jobs


def _prompt(tokenizer: Any, text: str) -> str:
    """A completion prompt: a chat turn in the tokenizer's template (as the server formats a chat), else the text."""
    if has_chat_template(tokenizer):
        return format_chat(tokenizer, [{"role": "user", "content": f"Continue this story: {text}"}])
    return text


# -- the server ----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(base: str, adapters_dir: Path, *, policy: str, dtype: str, threads: int, max_adapters: int, batch: int):
    """A ``nora serve`` subprocess on a free loopback port; yields its URL, stops it afterwards."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "nora_peft.cli", "serve", "--base", base, "--adapters-dir", str(adapters_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--scheduler", policy, "--dtype", dtype, "--device", "cpu"]
    cmd += ["--max-adapters", str(max_adapters), "--max-batch-size", str(batch), "--max-queue", "4096"]
    cmd += ["--served-model-name", "base"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log_file = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                log_file.seek(0)
                raise RuntimeError(f"nora serve exited: {log_file.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("nora serve did not start within 300 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log_file.close()


def server_metrics(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{url}/metrics", params={"format": "json"}, timeout=30).json()


# -- the client ----------------------------------------------------------------------------------------------------
async def _one(client: Any, url: str, job: Job, start: float) -> Outcome:
    out = Outcome(sent=time.perf_counter() - start)
    body = {
        "model": job.model,
        "prompt": job.prompt,
        "max_tokens": job.max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }  # every request generates its max_tokens, whatever its (random) adapter says
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}"
                await response.aread()
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    out.error = str(data["error"].get("message", "error"))[:200]
                    return out
                if data["choices"][0].get("text"):
                    now = time.perf_counter() - start
                    out.first = out.first if out.first is not None else now
                    out.chunks.append(now)
        out.ok = True
    except Exception as e:  # counted as an error, never retried
        out.error = f"{type(e).__name__}: {e}"[:200]
    finally:
        out.end = time.perf_counter() - start
    return out


async def _replay(url: str, jobs: list[Job], *, open_loop: bool, timeout: float) -> list[Outcome]:
    """Send every job at its arrival time (open loop) or all at once; wait for all of them."""
    import httpx

    limits = httpx.Limits(max_connections=len(jobs) + 4, max_keepalive_connections=len(jobs) + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for job in jobs:
            if open_loop:
                await asyncio.sleep(max(0.0, job.at - (time.perf_counter() - start)))
            tasks.append(asyncio.create_task(_one(client, url, job, start)))
        return await asyncio.gather(*tasks)


def replay(url: str, jobs: list[Job], *, open_loop: bool = True, timeout: float = 600) -> dict[str, Any]:
    """Run the jobs against ``url``; latency percentiles (ms), throughput and errors, with the server's counters."""
    before = server_metrics(url)
    wall = time.perf_counter()
    outcomes = asyncio.run(_replay(url, jobs, open_loop=open_loop, timeout=timeout))
    wall = time.perf_counter() - wall
    after = server_metrics(url)
    return summarize(outcomes, wall, after["tokens_generated"] - before["tokens_generated"])


def summarize(outcomes: list[Outcome], wall: float, tokens: int) -> dict[str, Any]:
    """TTFT / ITL / end-to-end p50 and p99 in ms, tokens/s, requests/s, errors (with the first few messages)."""
    good = [o for o in outcomes if o.ok]
    ttft = sorted(1000 * (o.first - o.sent) for o in good if o.first is not None)
    itl = sorted(1000 * (b - a) for o in good for a, b in zip(o.chunks, o.chunks[1:]))
    e2e = sorted(1000 * (o.end - o.sent) for o in good)
    errors = [o.error for o in outcomes if not o.ok]
    return {
        "requests": len(outcomes),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "wall_s": wall,
        "tokens": tokens,
        "throughput_tok_s": tokens / wall if wall else math.nan,
        "throughput_req_s": len(good) / wall if wall else math.nan,
        **{f"ttft_ms_{k}": v for k, v in _pcts(ttft).items()},
        **{f"itl_ms_{k}": v for k, v in _pcts(itl).items()},
        **{f"e2e_ms_{k}": v for k, v in _pcts(e2e).items()},
    }


def _pcts(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"p50": values[0], "p99": values[0]} if values else {}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p99": cuts[98]}


# -- the parts -----------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What every part shares: the base (folder and loaded copy), tokenizer, adapters and server settings."""

    base_dir: str
    model: torch.nn.Module
    tokenizer: Any
    adapters_dir: Path
    names: list[str]
    big: str | None
    dtype: str
    threads: int
    max_batch: int


def open_loop(setup: Setup, jobs: list[Job], policies: list[str]) -> list[dict[str, Any]]:
    """The same workload against each policy's server (one server per policy, started fresh)."""
    rows = []
    for policy in policies:
        with _server(setup, policy) as url:
            _warm(url, setup.names)
            log(f"load open loop: {policy}, {len(jobs)} requests over {jobs[-1].at:.0f} s")
            rows.append({"policy": policy, **replay(url, jobs)} | {"server": _server_side(server_metrics(url))})
    return rows


def throughput(setup: Setup, *, new_tokens: int, repeats: int, sizes: tuple[int, ...] = (1, 8)) -> list[dict]:
    """``n`` concurrent mixed-adapter requests through the server vs ``generate`` at batch ``n`` on the base.

    Measured alternately (server, generate, server, ...) so both see the same machine load.
    """
    prompt = _prompt(setup.tokenizer, " ".join(WORDS[:24]))
    rows = []
    with _server(setup, "continuous") as url:
        _warm(url, setup.names)
        for n in sizes:
            jobs = [Job(0.0, setup.names[i % len(setup.names)], prompt, new_tokens) for i in range(n)]
            served, plain = [], []
            log(f"load throughput: {n} concurrent requests vs generate at batch {n}, {repeats} alternating repeats")
            for _ in range(repeats):
                got = replay(url, jobs, open_loop=False)
                served.append(got["throughput_tok_s"])
                plain.append(_generate_rate(setup, prompt, n, new_tokens))
            rows.append(
                {
                    "concurrent": n,
                    "new_tokens": new_tokens,
                    "serve_mixed_tok_s": statistics.median(served),
                    "generate_base_tok_s": statistics.median(plain),
                    "ratio": statistics.median(served) / statistics.median(plain),
                    "serve_runs": served,
                    "generate_runs": plain,
                }
            )
    return rows


def _generate_rate(setup: Setup, prompt: str, batch: int, new_tokens: int) -> float:
    """Plain greedy ``generate`` with a KV cache on the base, batch ``batch``: generated tokens per second (exactly
    ``new_tokens`` per row: ``min_new_tokens`` keeps EOS away, as ``ignore_eos`` does for the server's requests)."""
    tok = setup.tokenizer
    ids = tok([prompt] * batch, return_tensors="pt", add_special_tokens=not has_chat_template(tok))
    with torch.inference_mode():
        start = time.perf_counter()
        out = setup.model.generate(
            **ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        wall = time.perf_counter() - start
    return out[:, ids["input_ids"].shape[1] :].numel() / wall


def adapter_mix(setup: Setup, *, new_tokens: int, rows: int = 32) -> list[dict[str, Any]]:
    """Decode step time (median inter-token gap) of ``rows`` concurrent requests per adapter mix."""
    prompt = _prompt(setup.tokenizer, " ".join(WORDS[:12]))
    small = setup.names[:rows]
    mixes = {
        "base": ["base"] * rows,
        "one_adapter": [small[0]] * rows,
        f"{rows}_distinct_r8": [small[i % len(small)] for i in range(rows)],
    }
    if setup.big:
        mixes[f"{rows - 1}_r8_plus_one_r256"] = mixes[f"{rows}_distinct_r8"][: rows - 1] + [setup.big]
    out = []
    with _server(setup, "continuous") as url:
        _warm(url, setup.names + ([setup.big] if setup.big else []))
        for _ in range(2):  # two rounds, alternating the mixes; the median gap of each round is kept
            for name, models in mixes.items():
                log(f"load adapter mix: {name}, {rows} rows x {new_tokens} tokens")
                got = replay(url, [Job(0.0, m, prompt, new_tokens) for m in models], open_loop=False)
                step = got.get("itl_ms_p50", math.nan)
                out.append(
                    {"mix": name, "rows": rows, "step_ms": step, "errors": got["errors"], "tokens": got["tokens"]}
                )
    return out


def _drain(calls: Iterable[Any]) -> None:
    """Run a generator of calls keeping no result alive, as a model's forward does: a list of one step's ~200
    layer outputs makes the allocator map fresh pages every round (2-3x the time of the same work in a model)."""
    deque(calls, maxlen=0)


def rank_padding(*, rows: int = 32, big_rank: int = 256, blocks: int = 30, repeats: int = 5) -> dict[str, Any]:
    """Adapter work of one decode step (``kernels.mixed``, no model): ``rows - 1`` r=8 rows and one
    r=``big_rank`` row, padded to one stack vs rank buckets; ms of CPU time per step over ``blocks`` blocks of the
    seven smollm2-135m linear shapes (layers narrower than ``big_rank`` get an r=8 adapter)."""
    from ...kernels.mixed import mixed_delta, plan_segments, segmented_delta, stack_adapters

    shapes = list(SMOLLM2_SHAPES.values())
    g = torch.Generator().manual_seed(0)
    layers = []
    for k, d in shapes:
        adapters = [(f"a{i}", torch.randn(8, k, generator=g), torch.randn(d, 8, generator=g), 1.0, "silu")
                    for i in range(rows - 1)]  # fmt: skip
        r = big_rank if min(k, d) >= big_rank else 8
        adapters.append(("big", torch.randn(r, k, generator=g), torch.randn(d, r, generator=g), 1.0, "silu"))
        buckets = {8: stack_adapters(adapters[:-1]), big_rank: stack_adapters(adapters[-1:])}
        layers.append((torch.randn(rows, 1, k, generator=g), stack_adapters(adapters, r_max=big_rank), buckets))
    acts = {(8, i): "silu" for i in range(rows - 1)} | {(big_rank, 0): "silu"}
    mixed = plan_segments([(8, i) for i in range(rows - 1)] + [(big_rank, 0)], acts)
    small = plan_segments([(8, i % (rows - 1)) for i in range(rows)], acts)
    index = torch.arange(rows)
    variants = {
        "padded": lambda: _drain(mixed_delta(x, padded, index) for x, padded, _ in layers),
        "buckets": lambda: _drain(segmented_delta(x, buckets, mixed) for x, _, buckets in layers),
        "all_r8": lambda: _drain(segmented_delta(x, buckets, small) for x, _, buckets in layers),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, fn in variants.items():
                start = time.thread_time()
                for _ in range(blocks):
                    fn()
                times[name].append(1000 * (time.thread_time() - start))
    return {"rows": rows, "big_rank": big_rank, "blocks": blocks} | {
        f"{name}_ms": statistics.median(v) for name, v in times.items()
    }


def distinct_adapters(
    targets: list[str], *, rows: int = 32, rank: int = 8, blocks: int = 30, repeats: int = 5
) -> dict[str, Any]:
    """Adapter work of one decode step of ``rows`` rows (``kernels.mixed``, no model, wall ms): every row on
    one adapter vs ``rows`` distinct adapters, on ``blocks`` distinct blocks of smollm2-135m's ``targets`` shapes (so
    the weights come from memory, as in a real step), next to the floor of reading those distinct adapters' weights
    once (``torch.sum`` over each stack: no pass that reads every weight can be faster)."""
    from ...kernels.mixed import plan_segments, segmented_delta, stack_adapters

    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(blocks):
        for k, d in (SMOLLM2_SHAPES[t] for t in targets):
            adapters = [(f"a{i}", torch.randn(rank, k, generator=g), torch.randn(d, rank, generator=g), 1.0, "silu")
                        for i in range(rows)]  # fmt: skip
            layers.append((torch.randn(rows, 1, k, generator=g), {rank: stack_adapters(adapters)}))
    acts = {(rank, i): "silu" for i in range(rows)}
    one = plan_segments([(rank, 0)] * rows, acts)
    distinct = plan_segments([(rank, i) for i in range(rows)], acts)
    variants = {
        "one_adapter": lambda: _drain(segmented_delta(x, stacks, one) for x, stacks in layers),
        "distinct": lambda: _drain(segmented_delta(x, stacks, distinct) for x, stacks in layers),
        # stack_adapters appends an all-zero slot for index -1; the floor reads the ``rows`` real ones only
        "read_once": lambda: _drain((s.up[:rows].sum(), s.down[:rows].sum()) for _, st in layers for s in st.values()),
    }
    with torch.inference_mode():
        times = alternate(variants, repeats=repeats, warmup=1, device=torch.device("cpu"))
    weight_bytes = sum(
        t[:rows].numel() * t.element_size() for _, st in layers for s in st.values() for t in (s.up, s.down)
    )
    return {"rows": rows, "rank": rank, "blocks": blocks, "targets": targets, "weight_mb": weight_bytes / 1e6} | {
        f"{name}_ms": median_ms(v) for name, v in times.items()
    }


def _server(setup: Setup, policy: str):
    extra = 1 if setup.big else 0
    return serve(
        setup.base_dir,
        setup.adapters_dir,
        policy=policy,
        dtype=setup.dtype,
        threads=setup.threads,
        max_adapters=len(setup.names) + extra,
        batch=setup.max_batch,
    )


def _warm(url: str, names: list[str]) -> None:
    """One short request per adapter (loads it) and one on the base, before anything is timed."""
    replay(url, [Job(0.0, n, "the robot", 2) for n in ["base", *names]], open_loop=False)


def _server_side(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("ttft_s", "inter_token_s", "e2e_s", "max_batch_size_seen", "rejections", "requests_failed")
    return {k: metrics.get(k) for k in keys}


def _load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The section's results under the key ``load``."""
    from ...bases.named import load_model_and_tokenizer, resolve_model

    q = args.quick
    threads = args.threads or 1
    torch.set_num_threads(threads)
    dtype = _dtype(args.load_dtype)
    base_dir = resolve_model(args.model)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model = model.to(dtype).eval()
    parts = set(args.load_parts.split(","))
    n_adapters = min(32, max(1, args.load_adapters or (4 if q else 16)))
    targets = args.targets.split(",") if args.targets else ALL_LINEAR
    settings = {
        "model": args.model or "default",
        "dtype": str(dtype).removeprefix("torch."),
        "threads": threads,
        "adapters": n_adapters,
        "rank": args.rank or 8,
        "targets": targets,
        "max_batch_size": args.load_max_batch,
        "load_average_before": _load_average(),
    }
    with tempfile.TemporaryDirectory(prefix="nora-load-") as tmp:
        folder = Path(tmp)
        log(f"load: writing random adapters to {folder}")
        ranks = [args.rank or 8] * max(n_adapters, 32 if "mix" in parts else 0)
        names = write_adapters(model.float(), folder, ranks, targets=targets)
        big = write_adapters(model, folder, [256], seed=99, targets=targets)[0] if "mix" in parts and not q else None
        model = model.to(dtype)
        setup = Setup(base_dir, model, tokenizer, folder, names, big, settings["dtype"], threads, args.load_max_batch)
        result: dict[str, Any] = {"settings": settings}
        if "open" in parts:
            jobs = workload(
                tokenizer,
                ["base", *names[:n_adapters]],
                rate=args.load_rate or (4.0 if q else 1.0),
                duration=args.load_duration or (4.0 if q else 60.0),
                limit=args.load_requests or (12 if q else 200),
                quick=q,
            )
            result["open_loop"] = open_loop(setup, jobs, args.load_policies.split(","))
        if "throughput" in parts:
            result["throughput"] = throughput(setup, new_tokens=8 if q else 48, repeats=1 if q else 3)
        if "ranks" in parts:
            log("load ranks: one decode step's adapter work, padded vs rank buckets (CPU time)")
            result["rank_padding"] = rank_padding(repeats=2 if q else 5, blocks=2 if q else 30)
            log(f"load ranks: {4 if q else 32} rows on one adapter vs as many distinct ones, and the read floor")
            result["distinct_adapters"] = distinct_adapters(
                targets, rows=4 if q else 32, blocks=2 if q else 30, repeats=2 if q else 5
            )
        if "mix" in parts:
            result["adapter_mix"] = adapter_mix(setup, new_tokens=6 if q else 24, rows=4 if q else 32)
    settings["load_average_after"] = _load_average()
    return {"load": result}


def print_tables(results: dict[str, Any]) -> None:
    """Human tables of ``results["load"]``."""
    load = results.get("load")
    if not load:
        return
    s = load["settings"]
    print(
        f"\n## nora serve under load ({s['model']}, {s['dtype']}, {s['threads']} thread(s), {s['adapters']} adapters)"
    )
    if "open_loop" in load:
        print("| policy | requests | errors | TTFT p50 / p99 ms | ITL p50 / p99 ms | e2e p50 / p99 ms | tok/s |")
        print("|---|---|---|---|---|---|---|")
        for r in load["open_loop"]:
            print(
                f"| {r['policy']} | {r['requests']} | {r['errors']} | {r.get('ttft_ms_p50', math.nan):.0f} / "
                f"{r.get('ttft_ms_p99', math.nan):.0f} | {r.get('itl_ms_p50', math.nan):.0f} / "
                f"{r.get('itl_ms_p99', math.nan):.0f} | {r.get('e2e_ms_p50', math.nan):.0f} / "
                f"{r.get('e2e_ms_p99', math.nan):.0f} | {r['throughput_tok_s']:.1f} |"
            )
    if "throughput" in load:
        print("\n| concurrent | nora serve (mixed adapters) tok/s | generate (base) tok/s | ratio |")
        print("|---|---|---|---|")
        for r in load["throughput"]:
            print(f"| {r['concurrent']} | {r['serve_mixed_tok_s']:.1f} | {r['generate_base_tok_s']:.1f} | "
                  f"{r['ratio']:.2f} |")  # fmt: skip
    if "rank_padding" in load:
        r = load["rank_padding"]
        print(
            f"\nadapter work per decode step ({r['rows'] - 1} r=8 rows + 1 r={r['big_rank']}): padded "
            f"{r['padded_ms']:.1f} ms, rank buckets {r['buckets_ms']:.1f} ms (all r=8: {r['all_r8_ms']:.1f} ms)"
        )
    if "distinct_adapters" in load:
        r = load["distinct_adapters"]
        print(
            f"adapter work per decode step ({r['rows']} rows, r={r['rank']}, {r['blocks']} blocks): one adapter "
            f"{r['one_adapter_ms']:.1f} ms, {r['rows']} distinct {r['distinct_ms']:.1f} ms; reading those "
            f"{r['weight_mb']:.0f} MB once {r['read_once_ms']:.1f} ms"
        )
    if "adapter_mix" in load:
        steps: dict[str, list[float]] = {}
        for r in load["adapter_mix"]:
            steps.setdefault(r["mix"], []).append(r["step_ms"])
        base = statistics.median(steps.get("base", [math.nan]))
        print("\n| adapter mix (one decode batch) | step ms | overhead over base ms |")
        print("|---|---|---|")
        for mix, values in steps.items():
            ms = statistics.median(values)
            print(f"| {mix} | {ms:.1f} | {ms - base:.1f} |")

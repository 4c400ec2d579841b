"""``nora study SPEC``: run a study spec (YAML file or preset name), then its latency step and its report.

The steps: cells (``.runner.run_study``, any number of shards) -> once every cell has a row, the latency step
(``.latency.latency_step``: the claim-5 benchmark, stored as ``latency.json``) -> the report (``.report``, which only
reads). :func:`finish_study` is the last two.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...bases.named import SMOLLM2_GGUF_ENV
from . import probe
from .results import read_results
from .spec import PRESETS, StudySpec, expand_cells, load_spec, parse_shard, shard_cells

GIB = 1 << 30
#: GPU memory one --jobs process may take by default: smollm2-135m's cells peak near 10 GiB (logits of a batch of 32 x
#: 384 tokens x 49,152 in the loss, then the evaluation batches), with room to spare
JOB_MEMORY_GIB = 16.0
#: seconds a just-started shard process is assumed not to have allocated its memory yet
SETTLE_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help=f"a study spec YAML file or a preset name ({', '.join(PRESETS)})")
    parser.add_argument("--out", default=None, help="output dir (default: runs/study-<name>)")
    parser.add_argument("--shard", default=None, help="run only shard i of n (i/n, from 0); all shards share --out")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="run N shards as N local processes, then the report (default: 1 with a GPU, else min(4, CPU cores))",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores/jobs)")
    parser.add_argument("--report-only", action="store_true", help="only (re)write the report from results.jsonl")
    parser.add_argument("--no-report", action="store_true", help="run cells but do not write the report")
    parser.add_argument("--list", action="store_true", help="list the cells (of --shard) and exit")
    parser.add_argument(
        "--probe-only", action="store_true", help="run only this shard's lr-probe cells (specs with a probe) and exit"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec key (dotted path, YAML value), e.g. --set seeds=[0] --set eval.max_generate=4",
    )
    parser.add_argument("--max-steps", type=int, default=None, help="train.max_steps (and the probe's, capped by it)")
    parser.add_argument(
        "--gguf", default=None, help=f"smollm2-135m from this GGUF file instead of the wheel (sets ${SMOLLM2_GGUF_ENV})"
    )
    parser.add_argument(
        "--job-memory",
        type=float,
        default=JOB_MEMORY_GIB,
        help="GiB of GPU memory one --jobs process may take: another starts only while that much is free "
        f"(default {JOB_MEMORY_GIB:g}; CUDA only)",
    )


def default_jobs() -> int:
    """Local shard processes when ``--jobs`` is not given: 1 on a GPU machine, else ``min(4, cores)``.

    The cells of a CPU study are small models, for which torch's intra-op threads scale poorly (and oversubscribe
    badly on a shared machine), so independent cells in parallel processes with 1-2 threads each finish sooner.
    """
    import torch

    if torch.cuda.is_available():
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def _shard_command(args: argparse.Namespace, out: Path, shard: str, threads: int, extra: tuple[str, ...]) -> list[str]:
    """The ``nora study`` command line of one ``--jobs`` shard process: the same spec and overrides, its shard."""
    sets = [x for o in args.overrides for x in ("--set", o)]
    steps = ["--max-steps", str(args.max_steps)] if args.max_steps is not None else []
    return [sys.executable, "-m", "nora_peft.cli", "study", args.spec, "--out", str(out), "--shard", shard,
            "--no-report", "--threads", str(threads), *sets, *steps, *extra]  # fmt: skip


def _run_jobs(args: argparse.Namespace, out: Path, jobs: int, extra: tuple[str, ...] = ()) -> int:
    """``--jobs N``: N subprocesses, one shard each (``extra`` flags added), then the report in this process. On a GPU
    they share the device, each started only while its ``--job-memory`` is free (:func:`launch`)."""
    import torch

    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NORA_STUDY_THREADS": str(threads)}
    cmds = [_shard_command(args, out, f"{i}/{jobs}", threads, extra) for i in range(jobs)]
    gpu = torch.cuda.is_available()
    codes = launch(cmds, env, free_bytes=cuda_free_bytes if gpu else None, need_bytes=int(args.job_memory * GIB))
    if any(codes):
        print(f"nora study: shard processes exited with {codes}; rerun the same command to resume.", file=sys.stderr)
        return 1
    return 0


def cuda_free_bytes() -> int:
    """Free memory on the current CUDA device (``torch.cuda.mem_get_info``), what other processes hold counted."""
    import torch

    return int(torch.cuda.mem_get_info()[0])


def launch(
    cmds: list[list[str]],
    env: dict[str, str],
    *,
    free_bytes: Callable[[], int] | None = None,
    need_bytes: int = 0,
    settle_s: float = SETTLE_S,
    poll_s: float = 2.0,
    popen: Callable[..., Any] = subprocess.Popen,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] | None = None,
) -> list[int]:
    """Start every command, wait for all, return their exit codes.

    Without ``free_bytes`` (CPU) all start at once. With it (a GPU shared by the processes), a command starts only
    when the free memory covers ``need_bytes`` for it and for each of ours started less than ``settle_s`` ago and
    still running (those may not have allocated yet); otherwise it waits for memory to free up. When none of ours
    runs, it starts whatever the memory says: every shard must run, and one that cannot get memory fails by itself."""
    log = log or _stderr
    procs: list[Any] = []
    started: list[float] = []
    for cmd in cmds:
        while free_bytes is not None:
            running = [t for p, t in zip(procs, started) if p.poll() is None]
            fresh = sum(1 for t in running if clock() - t < settle_s)
            free = free_bytes()
            if free >= need_bytes * (1 + fresh):
                break
            if not running:
                log(f"nora study: {free / GIB:.1f} GiB free on the GPU, less than --job-memory {need_bytes / GIB:g}; "
                    "starting the next shard anyway (nothing of this study holds the memory)")  # fmt: skip
                break
            sleep(poll_s)
        procs.append(popen(cmd, env=env))
        started.append(clock())
    return [p.wait() for p in procs]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def finish_study(
    spec: StudySpec, out_dir: str | Path, log: Callable[[str], None] = _stderr, *, partial: bool = False
) -> Path | None:
    """When every cell has a row (or ``partial``): the latency step (kept if stored), then ``report.md``; returns its
    path. While cells of other shards are unfinished (and not ``partial``), says so and returns ``None``."""
    from .latency import latency_step
    from .report import write_report

    done = {r["cell_id"] for r in read_results(out_dir)}
    missing = [c.cell_id for c in expand_cells(spec) if c.cell_id not in done]
    if missing and not partial:
        log(
            f"{len(missing)} cells of other shards are not finished yet (e.g. {missing[0]}); the report is written "
            f"when they are: run `nora study SPEC --out {out_dir} --report-only` after the other shards finish."
        )
        return None
    latency_step(spec, out_dir, log)
    path = write_report(spec, out_dir, log=log)
    log(f"report: {path}")
    return path


def _list_cells(spec: StudySpec, out: Path, shard: tuple[int, int]) -> int:
    """``--list``: the cells of this shard; with an unfinished lr probe, its cells (the final ones depend on it)."""
    final = probe.resolve(spec, out)
    if final is None:
        print(f"# lr probe cells (in {out / probe.PROBE_DIR}); the final cells are listed once the probe is done")
        cells = probe.probe_cells(spec)
    else:
        cells = expand_cells(final)
    for c in shard_cells(cells, shard):
        print(c.cell_id)
    return 0


def load_study(args: argparse.Namespace) -> StudySpec:
    """The spec with ``--set`` overrides and ``--max-steps`` (train.max_steps; the probe's capped by it) applied."""
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={int(args.max_steps)}")
    spec = load_spec(args.spec, overrides)
    if args.max_steps is not None and spec.probe:
        spec.probe["max_steps"] = min(int(spec.probe["max_steps"]), int(args.max_steps))
    return spec


def main(args: argparse.Namespace) -> int:
    import torch

    if args.gguf:  # before anything loads the base; the --jobs processes inherit it
        os.environ[SMOLLM2_GGUF_ENV] = str(Path(args.gguf).expanduser().resolve())
    spec = load_study(args)
    out = Path(args.out or f"runs/study-{spec.name}")
    shard = parse_shard(args.shard)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.list:
        return _list_cells(spec, out, shard)
    start = time.perf_counter()
    if args.report_only:
        final = probe.resolve(spec, out)
        if final is None:
            raise SystemExit(f"nora study: the lr probe in {out / probe.PROBE_DIR} is unfinished; run the study first.")
        print(finish_study(final, out, partial=True))
        return 0
    from .runner import check_out_dir

    check_out_dir(spec, out)  # refuse a dir made with other settings before any work, in one place
    if spec.probe and probe.resolve(spec, out) is None:
        probe.check_resumable(spec, out)
    jobs = args.jobs if args.jobs is not None else (1 if args.shard else default_jobs())
    if jobs > 1 and args.shard:
        raise SystemExit("nora study: use either --jobs or --shard, not both.")
    if jobs > 1:
        final, rc = _run_parallel(args, spec, out, jobs)
        if rc:
            return rc  # a shard failed (also under --probe-only): its log says why; rerun to resume
    else:
        final = _run_serial(args, spec, out, shard)
    if final is None:
        return 0
    if not args.no_report:  # --jobs shards run with --no-report: the parent writes the report when all are done
        finish_study(final, out)
    print(f"nora study {spec.name}: {time.perf_counter() - start:.0f}s wall; output in {out}", file=sys.stderr)
    return 0


def _run_parallel(args: argparse.Namespace, spec: StudySpec, out: Path, jobs: int) -> tuple[StudySpec | None, int]:
    """``--jobs N``: the probe's cells over N shard processes (again when an edge extension adds cells), the choice,
    then the final cells over N processes. ``(final spec, 0)``; ``(None, 0)`` after ``--probe-only``; ``(None, rc)``
    when a shard failed."""
    from ...bases.named import resolve_model
    from .runner import run_study

    resolve_model(spec.model)  # convert the base once here, not in N processes waiting on its lock
    while spec.probe and probe.resolve(spec, out) is None:
        if rc := _run_jobs(args, out, jobs, ("--probe-only",)):
            return None, rc
    spec = probe.run_probe(spec, out) if spec.probe else spec
    if args.probe_only:
        return None, 0
    if rc := _run_jobs(args, out, jobs):
        return None, rc
    run_study(spec, out)  # nothing left to run, unless a shard was skipped: this process does it
    return spec, 0


def _run_serial(args: argparse.Namespace, spec: StudySpec, out: Path, shard: tuple[int, int]) -> StudySpec | None:
    """This process alone (or one ``--shard``): the probe if any, then the cells; ``None`` after ``--probe-only``."""
    from .runner import run_study

    if spec.probe:
        spec = probe.run_probe(spec, out, shard=shard, wait=not args.probe_only)
        if args.probe_only or spec is None:
            return None
    run_study(spec, out, shard=shard)
    return spec

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

from . import probe
from .results import read_results
from .spec import PRESETS, StudySpec, expand_cells, load_spec, parse_shard, shard_cells


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


def default_jobs() -> int:
    """Local shard processes when ``--jobs`` is not given: 1 on a GPU machine, else ``min(4, cores)``.

    The cells of a CPU study are small models, for which torch's intra-op threads scale poorly (and oversubscribe
    badly on a shared machine), so independent cells in parallel processes with 1-2 threads each finish sooner.
    """
    import torch

    if torch.cuda.is_available():
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def _run_jobs(args: argparse.Namespace, out: Path, jobs: int, extra: tuple[str, ...] = ()) -> int:
    """``--jobs N``: N subprocesses, one shard each (``extra`` flags added), then the report in this process."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NORA_STUDY_THREADS": str(threads)}
    procs = []
    for i in range(jobs):
        cmd = [
            sys.executable,
            "-m",
            "nora_peft.cli",
            "study",
            args.spec,
            "--out",
            str(out),
            "--shard",
            f"{i}/{jobs}",
            "--no-report",
            "--threads",
            str(threads),
            *extra,
        ]
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"nora study: shard processes exited with {codes}; rerun the same command to resume.", file=sys.stderr)
        return 1
    return 0


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


def main(args: argparse.Namespace) -> int:
    import torch

    spec = load_spec(args.spec)
    out = Path(args.out or f"runs/study-{spec.name}")
    shard = parse_shard(args.shard)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.list:
        return _list_cells(spec, out, shard)
    from .runner import run_study

    start = time.perf_counter()
    if args.report_only:
        final = probe.resolve(spec, out)
        if final is None:
            raise SystemExit(f"nora study: the lr probe in {out / probe.PROBE_DIR} is unfinished; run the study first.")
        print(finish_study(final, out, partial=True))
        return 0
    jobs = args.jobs if args.jobs is not None else (1 if args.shard else default_jobs())
    if jobs > 1:
        if args.shard:
            raise SystemExit("nora study: use either --jobs or --shard, not both.")
        while spec.probe and probe.resolve(spec, out) is None:  # phase 1: the probe cells, sharded (again when an
            rc = _run_jobs(args, out, jobs, ("--probe-only",))  # edge extension adds cells); then the choice
            if rc:
                return rc
        spec = probe.run_probe(spec, out) if spec.probe else spec
        if args.probe_only:
            return 0
        rc = _run_jobs(args, out, jobs)
        if rc:
            return rc
        run_study(spec, out)
    else:
        if spec.probe:
            spec = probe.run_probe(spec, out, shard=shard, wait=not args.probe_only)
            if args.probe_only or spec is None:
                return 0
        run_study(spec, out, shard=shard)
    if not args.no_report:  # --jobs shards run with --no-report: the parent writes the report when all are done
        finish_study(spec, out)
    print(f"nora study {spec.name}: {time.perf_counter() - start:.0f}s wall; output in {out}", file=sys.stderr)
    return 0

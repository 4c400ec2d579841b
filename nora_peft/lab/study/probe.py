"""The learning-rate probe of a study (``probe:`` in the spec): pick each method's lr cheaply, then run the final cells.

Each method's ``lr`` grid is trained at one rank and one seed for ``max_steps`` steps and scored by validation
perplexity alone (no generation, no test split, no analysis). The best lr per method -- lowest mean log validation
perplexity over the datasets, ties to the smaller lr -- is then the lr of every final cell of that method (all
ranks, seeds and ablation variants), carried from the probe's rank to each rank so that it makes the same step
(:func:`transfer_lr`: unchanged for LoRA and NoRA at ``alpha = 2r``, ``lr * sqrt(r_probe / r)`` for rsLoRA). A run
that diverges (NaN/inf loss) scores as the worst.

A best lr at the edge of its grid means the grid did not bracket the optimum, and that method would be under-tuned:
the grid is then extended one step past that edge (by the ratio of its last two points), up to
``MAX_EXTENSIONS`` times per method, and probed again. Every method is treated the same way.

Files: the probe cells live in ``<out>/probe/`` (their own ``results.jsonl``, resumable like any study); the choice is
written to ``<out>/probe.json``. The final cells' ids carry the chosen lr, so a resumed study reuses them.
"""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ...io import read_json, write_json_atomic
from ...methods import AdapterSpec
from .results import read_results
from .spec import Ablations, Cell, StudySpec, expand_cells, shard_cells

PROBE_DIR = "probe"
PROBE_FILE = "probe.json"
#: the study dir's own record (spec, fingerprint, the probe's choice): ``runner.check_out_dir`` writes it
STUDY_FILE = "study.json"
MAX_EXTENSIONS = 2


def _rows(out_dir: str | Path | None) -> dict[str, dict[str, Any]]:
    return {} if out_dir is None else {r["cell_id"]: r for r in read_results(Path(out_dir) / PROBE_DIR)}


def probe_grid(spec: StudySpec, out_dir: str | Path | None = None) -> dict[str, list[float]]:
    """Each method's probe grid: the spec's, extended past an edge while the finished probe cells put the best lr
    there (deterministic in the results, so every shard computes the same grid)."""
    rows = _rows(out_dir)
    grid = {m: sorted(float(x) for x in spec.lr[m]) for m in spec.methods}
    for method in spec.methods:
        for _ in range(MAX_EXTENSIONS):
            scores = _scores(spec, method, grid[method], rows)
            if scores is None or len(grid[method]) < 2:
                break
            lrs = sorted(grid[method])
            best = _best(scores)
            if best == lrs[-1]:
                grid[method].append(float(f"{lrs[-1] * lrs[-1] / lrs[-2]:.3g}"))
            elif best == lrs[0]:
                grid[method].insert(0, float(f"{lrs[0] * lrs[0] / lrs[1]:.3g}"))
            else:
                break
    return grid


def _scores(spec: StudySpec, method: str, lrs: list[float], rows: dict) -> dict[float, float] | None:
    """Mean log validation PPL per lr of ``method`` over the probe cells, or ``None`` while one is missing."""
    cells = [c for c in expand_cells(probe_spec(spec, {method: lrs})) if c.method == method]
    if any(c.cell_id not in rows for c in cells):
        return None
    per_lr: dict[float, list[float]] = defaultdict(list)
    for c in cells:
        per_lr[c.lr].append(_score(rows[c.cell_id]))
    return {lr: sum(v) / len(v) for lr, v in per_lr.items()}


def _best(scores: dict[float, float]) -> float:
    return min(scores, key=lambda lr: (scores[lr], lr))


def probe_spec(spec: StudySpec, grid: dict[str, list[float]] | None = None) -> StudySpec:
    """The probe cells as a study: every method x lr at the probe's rank and seed, a short budget, val PPL only."""
    p = spec.probe
    steps = int(p["max_steps"])
    grid = grid or {m: list(spec.lr[m]) for m in spec.methods}
    return replace(
        spec,
        methods=[m for m in spec.methods if m in grid],
        lr={m: list(g) for m, g in grid.items()},
        ranks=[int(p["rank"])],
        method_ranks={},
        seeds=[int(p["seed"])],
        ablations=Ablations(),
        train={**spec.train, "max_steps": steps, "save_steps": steps},
        eval={**spec.eval, "generate": False, "analysis": False, "max_examples": p["max_examples"]},
        verdict={"nora_rank": int(p["rank"]), "lora_rank": int(p["rank"])},
        probe={},
    )


def probe_cells(spec: StudySpec, out_dir: str | Path | None = None) -> list[Cell]:
    """The probe cells to run now: the spec's grids, plus the edge extensions the results so far call for."""
    return expand_cells(probe_spec(spec, probe_grid(spec, out_dir)))


def _score(row: dict[str, Any]) -> float:
    ppl = row.get("val_ppl")
    return math.log(ppl) if isinstance(ppl, (int, float)) and math.isfinite(ppl) and ppl > 0 else math.inf


def chosen_lrs(spec: StudySpec, out_dir: str | Path) -> dict[str, float] | None:
    """The best lr per method once every probe cell (extensions included) has a row, else ``None``."""
    rows = _rows(out_dir)
    grid = probe_grid(spec, out_dir)
    chosen = {}
    for method in spec.methods:
        scores = _scores(spec, method, grid[method], rows)
        if scores is None:
            return None
        chosen[method] = _best(scores)
    return chosen


def transfer_lr(spec: StudySpec, method: str, lr: float, r: int) -> float:
    """The lr at rank ``r`` that makes the same step as ``lr`` at the probe's rank: ``lr * s(r_probe) / s(r)``.

    Under Adam a step moves ``W_down``/``W_up`` by about ``lr`` whatever the gradient's scale, so the branch's output
    moves by about ``lr * s``. With ``alpha = 2r`` (the default), LoRA's and NoRA's ``s = alpha/r`` is 2 at every
    rank and the lr is unchanged; rsLoRA's ``s = alpha/sqrt(r) = 2 sqrt(r)`` grows with r, so keeping its probed lr
    would make its r=64 cells take twice the step its r=16 probe chose (and its r=4 cells half)."""
    alpha = spec.adapter.get("alpha")

    def scale(rank: int) -> float:
        return AdapterSpec(method=method, r=rank, alpha=alpha).scale

    return float(f"{lr * scale(int(spec.probe['rank'])) / scale(r):.6g}")  # a short, stable number for cell ids


def with_lrs(spec: StudySpec, lrs: dict[str, float]) -> StudySpec:
    """The final study: each method's grid replaced by its chosen lr, carried to every rank by :func:`transfer_lr`
    (the probe settings stay, for the fingerprint)."""
    ranks = {*spec.ranks, *([int(spec.ablations.rank)] if spec.ablations.variants else [])}
    return replace(spec, lr={m: {r: [transfer_lr(spec, m, float(lrs[m]), r)] for r in sorted(ranks)} for m in lrs})


def recorded_lrs(spec: StudySpec, out_dir: str | Path) -> dict[str, float] | None:
    """The probe's choice as recorded in the study dir's ``study.json`` (key ``probe_lr``, written when the probe
    finished), if it was made for this spec (same fingerprint, every method); else ``None``. It is what lets a study
    dir holding only ``study.json`` and ``results.jsonl`` resume elsewhere without probing again."""
    path = Path(out_dir) / STUDY_FILE
    meta = read_json(path) if path.exists() else {}
    lrs = meta.get("probe_lr") or {}
    if meta.get("fingerprint") != spec.fingerprint() or set(spec.methods) - set(lrs):
        return None
    return {m: float(lrs[m]) for m in spec.methods}


def record_lrs(spec: StudySpec, out_dir: str | Path, lrs: dict[str, float]) -> None:
    """Add the probe's choice to ``study.json`` (made first if missing; refused if made for other settings)."""
    from .runner import check_out_dir

    check_out_dir(spec, Path(out_dir))
    meta = read_json(Path(out_dir) / STUDY_FILE)
    write_json_atomic(Path(out_dir) / STUDY_FILE, {**meta, "probe_lr": dict(lrs)})


def resolve(spec: StudySpec, out_dir: str | Path) -> StudySpec | None:
    """``spec`` itself without a probe; with one, the final study if the probe's choice is known (recorded in
    ``study.json``, or from the finished probe cells), else ``None``."""
    if not spec.probe:
        return spec
    lrs = recorded_lrs(spec, out_dir) or chosen_lrs(spec, out_dir)
    return None if lrs is None else with_lrs(spec, lrs)


def run_probe(
    spec: StudySpec,
    out_dir: str | Path,
    *,
    shard: tuple[int, int] = (0, 1),
    wait: bool = True,
    log: Callable[[str], None] | None = None,
) -> StudySpec | None:
    """Run this shard's probe cells; then (``wait``) wait for the other shards' and return the final study, which is
    also recorded in ``probe.json``. Without ``wait``, returns ``None`` while other shards' probe cells are missing."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    out_dir = Path(out_dir)
    lrs = recorded_lrs(spec, out_dir)
    if lrs is None:
        check_resumable(spec, out_dir)
        lrs = _probe_cells_until_chosen(spec, out_dir, shard, wait, log)
        if lrs is None:
            return None
        rows = sorted(read_results(out_dir / PROBE_DIR), key=lambda r: (r["method"], r["lr"]))
        table = [{k: r.get(k) for k in ("method", "r", "lr", "seed", "val_ppl", "diverged")} for r in rows]
        grid = probe_grid(spec, out_dir)
        write_json_atomic(out_dir / PROBE_FILE, {"settings": spec.probe, "grid": grid, "chosen": lrs, "cells": table})
        record_lrs(spec, out_dir, lrs)
    log("lr probe: chosen " + ", ".join(f"{m} {lr:g}" for m, lr in lrs.items()))
    return with_lrs(spec, lrs)


def check_resumable(spec: StudySpec, out_dir: str | Path) -> None:
    """Refuse final rows without a record of the lr they were trained at (``results.jsonl`` copied without
    ``study.json``): a probe run now might choose another lr and leave every copied row unused."""
    if read_results(out_dir) and not _rows(out_dir) and recorded_lrs(spec, out_dir) is None:
        raise ValueError(
            f"{out_dir} holds results.jsonl but no record of the lr probe's choice: copy the study's {STUDY_FILE} "
            f"along with results.jsonl (it records the chosen learning rates), or its {PROBE_DIR}/ folder."
        )


def _probe_cells_until_chosen(
    spec: StudySpec, out_dir: Path, shard: tuple[int, int], wait: bool, log: Callable[[str], None]
) -> dict[str, float] | None:
    """Run this shard's probe cells (again while an edge extension adds some) and, with ``wait``, wait for the other
    shards'; the chosen lr per method, or ``None`` (without ``wait``) while other shards' cells are missing."""
    from .runner import run_study

    told = False
    while (lrs := chosen_lrs(spec, out_dir)) is None:
        current = probe_spec(spec, probe_grid(spec, out_dir))  # the grid so far (an edge extension adds cells)
        mine = {c.cell_id for c in shard_cells(expand_cells(current), shard)}
        if mine - set(_rows(out_dir)):  # this shard's share of it is not finished
            run_study(current, out_dir / PROBE_DIR, shard=shard, log=log, splits=("validation",), diverged_ok=True)
            continue
        if not wait:
            return None
        if not told:
            log("lr probe: waiting for the other shards' probe cells ...")
            told = True
        time.sleep(15)
    return lrs

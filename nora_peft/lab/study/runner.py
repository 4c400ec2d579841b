"""Run a study's cells: train -> evaluate (validation, test) -> analyze -> one row in ``results.jsonl``.

Resumption: a cell whose id already has a row in ``results.jsonl`` is skipped; a cell whose run dir is finished
(``train_summary.json`` + ``eval_test.json`` [+ ``analysis.json``]) is not retrained, its row is rebuilt from the
files; an unfinished run continues from its last checkpoint (``TrainConfig.resume``). Rows are appended atomically
and deduplicated by cell id on read (``.results``), so a killed study loses or repeats nothing.

Sharding: ``shard=(i, n)`` runs every n-th cell starting at i; any number of processes or machines can share one
output dir. The runner only runs cells: the study CLI (``.cli.finish_study``) measures latency and writes the report
once every cell has a row.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...io import read_json, write_json_atomic
from .results import BASE_REFERENCE, append_result, end_torn_line, read_results
from .spec import Cell, StudySpec, expand_cells, freeze_options, shard_cells


def train_config(spec: StudySpec, cell: Cell, run_dir: Path):
    """The ``TrainConfig`` of one cell: the spec's shared budget + the cell's data, adapter, lr and seed."""
    from ..train import TrainConfig

    known = set(TrainConfig.__dataclass_fields__)
    bad = set(spec.train) - known
    if bad:
        raise ValueError(f"Study spec train: unknown TrainConfig field(s) {sorted(bad)}; valid: {sorted(known)}.")
    return TrainConfig(
        model=spec.model,
        data=cell.data,
        data_options=dict(cell.data_options),
        adapter=cell.adapter_spec,
        output_dir=str(run_dir),
        lr=cell.lr,
        seed=cell.seed,
        resume=True,
        progress=False,
        **spec.train,
    )


def _scalars(d: Any, prefix: str = "") -> dict[str, float]:
    """Numeric scalars of a (nested) result dict, flattened as ``a_b``; lists are skipped."""
    out: dict[str, float] = {}
    if not isinstance(d, dict):
        return out
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[key] = v
        elif isinstance(v, dict):
            out.update(_scalars(v, f"{key}_"))
    return out


def run_cell(
    spec: StudySpec,
    cell: Cell,
    out_dir: Path,
    splits: tuple[str, ...] = ("validation", "test"),
    diverged_ok: bool = False,
) -> dict[str, Any]:
    """Train, evaluate (``splits``) and analyse one cell (skipping whatever its run dir already holds); return its
    row. With ``diverged_ok`` (the lr probe), a NaN/inf loss gives a row marked ``diverged`` instead of an error."""
    from ..eval import evaluate_run

    ev = spec.eval_settings()
    run_dir = out_dir / "cells" / cell.cell_id
    start = time.perf_counter()
    if not (run_dir / "train_summary.json").exists():
        from ..train import NonFiniteLossError, train

        try:
            train(train_config(spec, cell, run_dir))
        except NonFiniteLossError as err:
            if not diverged_ok:
                raise
            return {**cell.describe(), "diverged": True, "error": str(err)[:300], "val_ppl": None}
    if not (run_dir / "eval_validation.json").exists():
        evaluate_run(
            run_dir,
            split="validation",
            generate=False,
            max_examples=ev.get("max_examples"),
            batch_size=ev["batch_size"],
            base_reference=False,  # the study's base row (run_base_reference) is the reference; no per-cell copy
        )
    if "test" in splits and not (run_dir / "eval_test.json").exists():
        evaluate_run(
            run_dir,
            split="test",
            generate=bool(ev["generate"]),
            max_examples=ev.get("max_examples"),
            max_generate=ev.get("max_generate"),
            max_new_tokens=ev["max_new_tokens"],
            batch_size=ev["batch_size"],
            base_reference=False,
        )
    if ev["analysis"] and not (run_dir / "analysis.json").exists():
        from ..analysis import analyze_run

        analyze_run(run_dir, samples=int(ev["analysis_samples"]), figures=False)
    return cell_row(cell, run_dir, wall_s=time.perf_counter() - start)


def cell_row(cell: Cell, run_dir: Path, wall_s: float | None = None) -> dict[str, Any]:
    """The results row of a finished cell, built from its run dir's files."""
    from ..analysis import summary as analysis_summary

    summary = read_json(run_dir / "train_summary.json")
    val = read_json(run_dir / "eval_validation.json")
    test = read_json(run_dir / "eval_test.json") if (run_dir / "eval_test.json").exists() else {}
    row: dict[str, Any] = cell.describe()
    row.update(
        {
            "params": summary.get("trainable_params"),
            "total_params": summary.get("total_params"),
            "steps": summary.get("steps"),
            "tokens_seen": summary.get("tokens_seen"),
            "train_wall_s": summary.get("wall_time_s"),
            "train_tokens_per_s": summary.get("tokens_per_s"),
            "final_loss": summary.get("final_loss"),
            "val": _scalars(val),
            "test": _scalars(test),
            "val_ppl": _scalars(val).get("ppl"),
            "test_ppl": _scalars(test).get("ppl"),
            "test_accuracy": _scalars(test).get("accuracy"),
            "run_dir": str(run_dir),
        }
    )
    if (run_dir / "analysis.json").exists():
        analysis = read_json(run_dir / "analysis.json")
        row.update(analysis_summary(analysis))
        row["curves"] = spectral_curves(analysis)
    if wall_s is not None:
        row["cell_wall_s"] = round(wall_s, 2)
    return row


#: the analysis curves the report's spectral figures draw, per activation kind: kept in the row, so that the figures
#: can be drawn where only results.jsonl was copied (a few KB per row at r=256)
CURVES = {
    "update": ("normalized_singular_values_mean", "cumulative_energy_mean"),
    "output": ("cumulative_energy_mean",),
}


def spectral_curves(analysis: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """``{kind: {curve: values}}`` of :data:`CURVES` from a run's ``analysis.json`` (4 significant digits)."""
    agg = analysis.get("aggregate") or {}
    out: dict[str, dict[str, list[float]]] = {}
    for kind, names in CURVES.items():
        for name in names:
            values = (agg.get(kind) or {}).get(name)
            if isinstance(values, list) and values:
                out.setdefault(kind, {})[name] = [float(f"{v:.4g}") for v in values]
    return out


def run_base_reference(spec: StudySpec, out_dir: Path) -> dict[str, Any]:
    """The reference row: the base model with no adapter, evaluated on each dataset's test split exactly as the
    cells are (same records, prompts, perplexity and generation settings). Written once to ``base_reference.json``."""
    import torch

    from ...bases.named import load_model_and_tokenizer
    from ..eval import evaluate_records
    from ..torch_utils import eval_mode
    from ..train import base_dtype, load_splits, resolve_precision

    path = out_dir / BASE_REFERENCE
    if path.exists():
        return read_json(path)
    ev = spec.eval_settings()
    model = tokenizer = None
    results: dict[str, Any] = {}
    for ds in spec.datasets:
        # a cell only to reuse train_config's data settings; no adapter is built from it
        cell = Cell(
            ds.name, ds.data, freeze_options(ds.options), spec.methods[0], spec.ranks[0], "base", (), 1.0, spec.seeds[0]
        )
        cfg = train_config(spec, cell, out_dir / "base")
        if model is None:
            model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=base_dtype(resolve_precision(cfg.precision)))
            if torch.cuda.is_available():
                model = model.to("cuda")
        records = load_splits(cfg)["test"]
        records = records[: ev["max_examples"]] if ev.get("max_examples") else records
        with eval_mode(model):
            results[ds.name] = evaluate_records(
                model, tokenizer, records, generate_outputs=bool(ev["generate"]), max_length=cfg.max_length,
                batch_size=ev["batch_size"], max_generate=ev.get("max_generate"), max_new_tokens=ev["max_new_tokens"],
                precision=resolve_precision(cfg.precision),  # as evaluate_run does for the cells
            )  # fmt: skip
    reference = {"model": spec.model or "default", "split": "test", "datasets": results}
    write_json_atomic(path, reference)
    return reference


def _num(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "-"


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def check_out_dir(spec: StudySpec, out_dir: Path) -> None:
    """Refuse to resume an output dir made with other training/eval settings (cell ids would lie)."""
    meta = out_dir / "study.json"
    if meta.exists():
        old = read_json(meta).get("fingerprint")
        if old != spec.fingerprint():
            raise ValueError(
                f"{out_dir} holds a study made with other model/data/budget/eval settings (fingerprint {old} vs "
                f"{spec.fingerprint()}), so its cells cannot be reused. Pass another --out, or delete {out_dir}."
            )
    else:
        write_json_atomic(meta, {"name": spec.name, "fingerprint": spec.fingerprint(), "spec": spec.to_dict()})


def run_study(
    spec: StudySpec,
    out_dir: str | Path,
    *,
    shard: tuple[int, int] = (0, 1),
    on_cell_done: Callable[[Cell, dict[str, Any]], None] | None = None,
    log: Callable[[str], None] | None = None,
    splits: tuple[str, ...] = ("validation", "test"),
    diverged_ok: bool = False,
) -> Path:
    """Run this shard's unfinished cells one after another (the report is the CLI's ``finish_study``).

    ``on_cell_done(cell, row)`` is called after each row is appended (tests use it to interrupt a study).
    Returns the output dir.
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_out_dir(spec, out_dir)
    end_torn_line(out_dir)
    cells = expand_cells(spec)
    mine = shard_cells(cells, shard)
    done_ids = {r["cell_id"] for r in read_results(out_dir)}
    todo = [c for c in mine if c.cell_id not in done_ids]
    log(
        f"nora study {spec.name}: {len(cells)} cells, shard {shard[0]}/{shard[1]} has {len(mine)}, "
        f"{len(mine) - len(todo)} already done, {len(todo)} to run -> {out_dir}"
    )
    if todo:  # build/convert the base once up front, so no cell's time (or ETA) includes it
        from ...bases.named import resolve_model

        resolve_model(spec.model)
    if shard[0] == 0 and splits == ("validation", "test") and not (out_dir / BASE_REFERENCE).exists():
        t0 = time.perf_counter()
        reference = run_base_reference(spec, out_dir)["datasets"]
        scores = ", ".join(
            f"{ds}: test ppl {_num(r.get('ppl'))}, acc {_num(r.get('accuracy'))}" for ds, r in reference.items()
        )
        log(f"base model (no adapter), the reference row: {scores} in {_fmt_time(time.perf_counter() - t0)}")
    times: list[float] = []
    study_start = time.perf_counter()
    for k, cell in enumerate(todo):
        t0 = time.perf_counter()
        log(f"[{k + 1}/{len(todo)}] {cell.cell_id} ...")
        row = run_cell(spec, cell, out_dir, splits, diverged_ok)
        append_result(out_dir, row)
        times.append(time.perf_counter() - t0)
        left = len(todo) - k - 1
        eta = sum(times) / len(times) * left
        log(
            f"[{k + 1}/{len(todo)}] {cell.cell_id}: val ppl {_num(row.get('val_ppl'))}, test ppl "
            f"{_num(row.get('test_ppl'))}, test acc {_num(row.get('test_accuracy'))} in {_fmt_time(times[-1])}; "
            f"{left} left, ETA {_fmt_time(eta)}"
        )
        if on_cell_done is not None:
            on_cell_done(cell, row)
    if todo:
        log(f"shard {shard[0]}/{shard[1]} finished {len(todo)} cells in {_fmt_time(time.perf_counter() - study_start)}")
    return out_dir

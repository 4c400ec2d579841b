"""The run dir contract (see DESIGN.md): what a run dir holds, its newest complete checkpoint, and the decision
what to do with an existing one before any work (fresh / resume / done / overwrite, or a clear refusal)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Protocol

from ..io import read_json, read_jsonl


class RunConfig(Protocol):
    """What the run dir contract needs of a run's config (``lab.train.TrainConfig`` is one): whether to resume or
    overwrite, the fields that define the run, and how to rebuild a config from a saved ``config.json``."""

    resume: bool
    overwrite: bool

    def identity(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig: ...


#: files and folders a run dir may hold (the only things ``overwrite`` deletes)
RUN_FILES = ("config.json", "splits.json", "metrics.jsonl", "train_summary.json", "analysis.json")

RUN_DIRS = ("checkpoints", "adapter", "figures")


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest *complete* checkpoint (``trainer_state.json`` is written last), or None."""
    ckpt_root = run_dir / "checkpoints"
    if not ckpt_root.is_dir():
        return None
    done = [p for p in ckpt_root.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if json.dumps(old.get(k)) != json.dumps(new.get(k))]


def check_run_dir(cfg: RunConfig, run_dir: Path) -> str:
    """Decide what to do with ``run_dir`` before any work: ``"fresh"``, ``"resume"``, ``"done"`` (return it as is)
    or ``"overwrite"``; raise ``FileExistsError`` naming the fix when it holds something else.

    ``resume`` may continue an *unfinished* run with changed settings (they are printed); a *finished* run is only
    returned when its config equals the one asked for. The saved config is read back with ``type(cfg).from_dict``,
    so that fields added since it was written compare at their defaults."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "fresh"
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise FileExistsError(
            f"Output dir {run_dir} is not empty and is not a nora run dir (no config.json); choose another "
            "--output-dir (nothing there was touched)."
        )
    if cfg.overwrite:
        return "overwrite"
    old = type(cfg).from_dict(read_json(config_path)).identity()
    changes = _diff(old, cfg.identity())
    finished = (run_dir / "train_summary.json").exists()
    if changes and not cfg.resume:
        raise FileExistsError(
            f"Output dir {run_dir} holds another run (config differs: {'; '.join(changes)}). Choose another "
            "--output-dir, or pass --overwrite to delete it and retrain, or --resume to continue it with the new "
            "settings."
        )
    if finished:
        if cfg.resume and changes:
            raise FileExistsError(
                f"Run {run_dir} already finished with another config ({'; '.join(changes)}); --resume would return "
                "a run that is not the one asked for. Choose another --output-dir, or pass --overwrite to retrain."
            )
        if cfg.resume:
            return "done"
        raise FileExistsError(
            f"Run {run_dir} already finished (train_summary.json exists). Pass --resume to reuse it as is, or "
            "--overwrite to delete it and retrain."
        )
    if last_checkpoint(run_dir) is not None and not cfg.resume:
        raise FileExistsError(
            f"Run {run_dir} has checkpoints of an unfinished run ({last_checkpoint(run_dir).name}). Pass --resume to "
            "continue it from there, or --overwrite to start over."
        )
    if changes:
        print(f"Resuming {run_dir} with changed settings: {'; '.join(changes)}", file=sys.stderr)
    return "resume" if cfg.resume else "fresh"


def clear_run_dir(run_dir: Path) -> None:
    """Delete a previous run's files (only the names a run dir holds; anything else is left alone)."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for path in run_dir.glob("eval_*.json"):
        path.unlink()
    for name in RUN_DIRS:
        if (run_dir / name).exists():
            shutil.rmtree(run_dir / name)


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint we restart from (they will be logged again)."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)

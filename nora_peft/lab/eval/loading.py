"""Models for evaluation: an adapter checked against its base, and a finished run dir (its base, adapter and the
data splits it was trained with)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...io import read_json


class AdapterMismatchError(ValueError):
    """The adapter's layers or shapes do not fit the base model it is loaded onto."""


def load_adapter(base: torch.nn.Module, adapter_dir: str | Path, *, base_name: str | None = None):
    """``PeftModel.from_pretrained`` (NoRA or LoRA), after checking that the adapter fits ``base`` (the core check,
    ``nora_peft.checkpoint.check_fits_model``, names every layer and both shapes)."""
    from peft import PeftModel

    from ...checkpoint import CheckpointError, check_fits_model

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir} is not a peft adapter dir (no adapter_config.json).")
    try:
        check_fits_model(adapter_dir, base, model_label=f"base model {base_name or '(embedded default)'}")
    except CheckpointError as e:
        raise AdapterMismatchError(str(e)) from None
    return PeftModel.from_pretrained(base, str(adapter_dir))


def load_base(name: str | None, precision: str):
    """``(model, tokenizer)`` of a named base / folder / hub id in the dtype ``precision`` loads a base in, on the GPU
    when there is one."""
    from ...bases.named import load_model_and_tokenizer
    from ..train.precision import base_dtype

    model, tokenizer = load_model_and_tokenizer(name, dtype=base_dtype(precision))
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, tokenizer


def load_run(run_dir: str | Path):
    """``(peft_model, tokenizer, TrainConfig, splits)`` of a finished run; ``splits`` are the records per split,
    rebuilt from ``config.json`` and checked against the ids in ``splits.json``."""
    from ..train import TrainConfig, load_splits, resolve_precision

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a run dir (no config.json); train one with `nora train`.")
    if not (run_dir / "adapter").is_dir():
        raise FileNotFoundError(f"{run_dir} has no adapter/ yet: the run has not finished (`nora train --resume`).")
    cfg = TrainConfig.from_dict(read_json(run_dir / "config.json"))
    splits = load_splits(cfg)
    check_split_ids(run_dir, splits)
    base, tokenizer = load_base(cfg.model, resolve_precision(cfg.precision))
    model = load_adapter(base, run_dir / "adapter", base_name=cfg.model)
    model.eval()
    return model, tokenizer, cfg, splits


def check_split_ids(run_dir: Path, splits: dict[str, list[dict[str, Any]]]) -> None:
    """Fail loudly if the data no longer produces the splits the run was trained with."""
    path = run_dir / "splits.json"
    if not path.exists():
        return
    saved = read_json(path)
    ids = saved.get("ids", saved)
    for name, recs in splits.items():
        want = ids.get(name) if isinstance(ids, dict) else None
        if isinstance(want, list) and want != [r["id"] for r in recs]:
            raise ValueError(
                f"The {name!r} split rebuilt from {run_dir}/config.json differs from the one in splits.json (the data "
                "source changed since training). Evaluate on the original data, or retrain."
            )

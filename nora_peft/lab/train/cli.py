"""``nora train``: flags (one per ``TrainConfig`` field), a config file, and the exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ...io import read_json
from ...methods import METHODS
from .config import GLOBAL_DEFAULTS, PRECISIONS, TrainConfig, read_config_file
from .recipe import train
from .trainer import NonFiniteLossError


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "") else int(text)


def parse_mapping(text: str) -> dict[str, Any]:
    """``'{"n": 500}'`` (JSON) or ``n=500,digits=3`` (values parsed as YAML scalars)."""
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    import yaml

    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE pairs or a JSON object, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _scaling(text: str) -> str | float:
    try:
        return float(text)
    except ValueError:
        return text


def _targets(text: str) -> list[str] | str:
    """``q_proj,v_proj`` -> a list; ``all-linear`` or a regex (``.*\\.(q|v)_proj``) stays a string."""
    if text == "all-linear" or any(c in text for c in "*^$|()[]\\"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


#: CLI flag -> (TrainConfig field, argparse kwargs); adapter fields are ``adapter.<name>``
FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--model": ("model", dict(help="base model: smollm2-135m, a local dir or hub id (default: the embedded base)")),
    "--data": (
        "data",
        dict(
            help="data source: reasoning (default), arith, logistic, gsm8k, slimorca, "
            "mathinstruct, a local .jsonl/.json/.csv file or a hub id"
        ),
    ),
    "--data-options": (
        "data_options",
        dict(type=parse_mapping, help="extra load_source options: KEY=VALUE,... or JSON"),
    ),
    "--field-map": (
        "field_map",
        dict(type=parse_mapping, help="record field -> column: prompt=question,response=answer"),
    ),
    "--output-dir": ("output_dir", dict(help="run dir (default: runs/<data>-<label>-s<seed>)")),
    "--method": ("adapter.method", dict(choices=METHODS, help="adapter method")),
    "--r": ("adapter.r", dict(type=int, help="rank")),
    "--alpha": ("adapter.alpha", dict(type=float, help="scaling numerator (default 2*r)")),
    "--dropout": ("adapter.dropout", dict(type=float, help="adapter dropout")),
    "--activation": ("adapter.activation", dict(help="NoRA activation: silu, relu, gelu, tanh, identity")),
    "--granularity": ("adapter.granularity", dict(choices=("weight", "module"), help="NoRA granularity")),
    "--scaling": ("adapter.scaling", dict(type=_scaling, help="NoRA scaling: alpha/r, rslora or a number")),
    "--target-modules": ("adapter.target_modules", dict(type=_targets, help="comma list, regex or all-linear")),
    "--lr": ("lr", dict(type=float, help="peak learning rate")),
    "--epochs": ("epochs", dict(type=float, help="epochs when --max-steps is -1")),
    "--max-steps": ("max_steps", dict(type=int, help="optimizer steps; overrides --epochs (-1: use --epochs)")),
    "--batch-size": ("batch_size", dict(type=int, help="per-device batch size")),
    "--grad-accum": ("grad_accum", dict(type=int, help="gradient accumulation steps")),
    "--max-length": ("max_length", dict(type=int, help="max tokens of prompt + response")),
    "--warmup-ratio": ("warmup_ratio", dict(type=float, help="linear warmup fraction")),
    "--lr-scheduler": ("lr_scheduler", dict(help="transformers scheduler name")),
    "--weight-decay": ("weight_decay", dict(type=float, help="AdamW weight decay")),
    "--max-grad-norm": ("max_grad_norm", dict(type=float, help="gradient clipping (0: off)")),
    "--gradient-checkpointing": ("gradient_checkpointing", dict(action=argparse.BooleanOptionalAction)),
    "--seed": ("seed", dict(type=int, help="adapter init / dropout seed")),
    "--data-seed": ("data_seed", dict(type=int, help="splits and data order seed")),
    "--val-size": ("val_size", dict(type=float, help="validation fraction (or count) when the source has none")),
    "--test-size": ("test_size", dict(type=float, help="test fraction (or count) when the source has none")),
    "--max-train-examples": ("max_train_examples", dict(type=_optional_int, help="cap the train split")),
    "--save-steps": ("save_steps", dict(type=int, help="checkpoint every N steps")),
    "--save-total-limit": ("save_total_limit", dict(type=_optional_int, help="checkpoints kept (none: all)")),
    "--logging-steps": ("logging_steps", dict(type=int, help="log every N steps")),
    "--eval-steps": ("eval_steps", dict(type=_optional_int, help="validation loss every N steps (none: never)")),
    "--resume": ("resume", dict(action=argparse.BooleanOptionalAction, help="continue from the last checkpoint")),
    "--overwrite": ("overwrite", dict(action=argparse.BooleanOptionalAction, help="delete a previous run here")),
    "--precision": (
        "precision",
        dict(choices=PRECISIONS, help="auto (bf16 on a GPU or a CPU with bf16 units, else fp32), fp32, bf16, fp16"),
    ),
    "--group-by-length": (
        "group_by_length",
        dict(action=argparse.BooleanOptionalAction, help="batches of similar length: less padding"),
    ),
    "--progress": ("progress", dict(action=argparse.BooleanOptionalAction, help="progress bar")),
    "--report-to": (
        "report_to",
        dict(help="Trainer integrations to log to, comma-separated: tensorboard, mlflow, wandb, trackio, ... or none"),
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nora train``: ``--config``, ``--threads`` and one per ``TrainConfig`` field (``FLAGS``)."""
    parser.add_argument("--config", help="YAML/JSON file of TrainConfig fields; flags given here override it")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own)",
    )
    defaults = TrainConfig().to_dict()  # the embedded base's: what `nora train` with no flags runs
    for flag, (name, kwargs) in FLAGS.items():
        value = defaults["adapter"][name[8:]] if name.startswith("adapter.") else defaults[name]
        kwargs = dict(kwargs)
        if name in GLOBAL_DEFAULTS:
            kwargs["help"] = f"{kwargs['help']}: the base's recommended one, else {GLOBAL_DEFAULTS[name]}"
        if value not in (None, "", {}):  # the default shown is the dataclass's own, never a second copy of it
            kwargs["help"] = f"{kwargs.get('help', '')} (default: {value})".strip()
        parser.add_argument(flag, default=argparse.SUPPRESS, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config file (if any) with every flag that was given applied on top; what neither gives takes the base's
    recommended default, else the global one (``TrainConfig``)."""
    d = read_config_file(args.config) if getattr(args, "config", None) else {}
    for flag, (name, _) in FLAGS.items():
        dest = flag[2:].replace("-", "_")
        if dest not in vars(args):
            continue
        value = getattr(args, dest)
        if name.startswith("adapter."):
            d.setdefault("adapter", {})[name.split(".", 1)[1]] = value
        else:
            d[name] = value
    return TrainConfig.from_dict(d)


def main(args: argparse.Namespace) -> int:
    """``nora train``: exit 0 (the summary as JSON), 2 (bad input, nothing trained) or 3 (the loss turned NaN/inf)."""
    try:
        cfg = config_from_args(args)
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        run_dir = train(cfg)
    except NonFiniteLossError as e:
        print(f"nora train: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileExistsError, FileNotFoundError, TypeError) as e:
        print(f"nora train: {e}", file=sys.stderr)
        return 2
    summary = run_dir / "train_summary.json"
    if summary.exists() and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"run_dir": str(run_dir), **read_json(summary)}, indent=2))
    return 0

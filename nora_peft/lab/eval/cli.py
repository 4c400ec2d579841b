"""``nora eval``: a run dir (its own data, or other data with ``--data``) or a model (with an optional adapter) ->
the JSON result next to it and a short summary on stdout."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from ...io import read_json, write_json_atomic
from .loading import load_adapter, load_base
from .run import add_base_reference, evaluate_records, evaluate_run
from .summary import format_summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nora eval``."""
    from ..train.cli import parse_mapping

    src = parser.add_mutually_exclusive_group()
    src.add_argument("--run", help="a run dir from `nora train` (its base, adapter and data splits)")
    src.add_argument("--model", help="a base model: a name (smollm2-135m), a dir or a hub id (default: embedded) ...")
    parser.add_argument("--adapter", help="... with this peft adapter dir (NoRA or LoRA); omit for the base alone")
    parser.add_argument("--data", help="data source (default: the run's data, else reasoning)")
    parser.add_argument("--data-options", type=parse_mapping, default=None, help="load_source options: KEY=VALUE,...")
    parser.add_argument("--field-map", type=parse_mapping, default=None, help="record field -> column for local files")
    parser.add_argument("--split", default="test", help="train / validation / test (default test)")
    parser.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument(
        "--max-generate", type=int, default=None, help="generate on the first N only (perplexity on all)"
    )
    parser.add_argument("--no-generate", action="store_true", help="perplexity only (skip generation)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None, help="tokens per example (default: run's or 256)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: longest reference + 16")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                        help="autocast precision (default: the run's; auto for --model)")  # fmt: skip
    parser.add_argument("--data-seed", type=int, default=0, help="split seed for --model (a run uses its own)")
    parser.add_argument("--out", help="where to write the JSON (default: next to the run / adapter, else runs/eval/)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")


def _model_records(args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]]:
    """The data source's name and the requested split's records (``--data``, ``--split``, ``--max-examples``)."""
    from ..data import load_source, make_splits

    data = args.data or "reasoning"
    native = load_source(data, field_map=args.field_map, seed=args.data_seed, **(args.data_options or {}))
    splits = make_splits(native, seed=args.data_seed)
    if args.split not in splits:
        raise ValueError(f"Unknown split {args.split!r}; {data!r} has {sorted(splits)}.")
    return data, splits[args.split][: args.max_examples] if args.max_examples else splits[args.split]


def evaluate_model_args(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """``--model [--adapter]``: load, build the requested split, evaluate (with the base's perplexity beside an
    adapter's); the default JSON path."""
    from ..train.precision import resolve_precision

    data, records = _model_records(args)
    precision = resolve_precision(args.precision or "auto")
    model, tokenizer = load_base(args.model, precision)
    if args.adapter:
        model = load_adapter(model, args.adapter, base_name=args.model)
    kw = dict(max_length=args.max_length or 256, batch_size=args.batch_size, precision=precision, progress=True)
    result = evaluate_records(model, tokenizer, records, generate_outputs=not args.no_generate,
                              max_new_tokens=args.max_new_tokens, max_generate=args.max_generate, **kw)  # fmt: skip
    if args.adapter:
        add_base_reference(result, model, tokenizer, records, base_name=args.model, **kw)
    result.update(model=args.model, adapter=args.adapter, data=data, split=args.split, max_examples=args.max_examples)
    name = f"eval_{slug(data)}_{args.split}.json"
    where = (
        Path(args.adapter) / name if args.adapter else Path("runs") / "eval" / f"{slug(args.model or 'default')}_{name}"
    )
    return result, where


def slug(text: str) -> str:
    """A file-name-safe short form of a model or data name (``/path/to/data.jsonl`` -> ``data``)."""
    stem = Path(text).stem if "/" in text or text.endswith((".jsonl", ".json", ".csv", ".parquet")) else text
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem) or "data"


def evaluate_cli(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Dispatch ``--run`` (its own data, or with ``--data`` ... other data) and ``--model``."""
    if not args.run:
        return evaluate_model_args(args)
    run_dir = Path(args.run)
    if args.data or args.data_options or args.field_map or args.max_length:  # the run's adapter, other data
        from ..train import TrainConfig

        if not (run_dir / "config.json").exists():
            raise FileNotFoundError(f"{run_dir} is not a run dir (no config.json).")
        cfg = TrainConfig.from_dict(read_json(run_dir / "config.json"))
        args.model, args.adapter = cfg.model, str(run_dir / "adapter")
        args.max_length = args.max_length or cfg.max_length
        args.precision = args.precision or cfg.precision
        return evaluate_model_args(args)
    result = evaluate_run(
        run_dir,
        split=args.split,
        generate=not args.no_generate,
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_generate=args.max_generate,
        precision=args.precision,
        progress=True,
    )
    return result, run_dir / f"eval_{args.split}.json"


def set_threads(args: argparse.Namespace) -> None:
    """``--threads``: torch's CPU thread count (else torch's own)."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def main(args: argparse.Namespace) -> int:
    """``nora eval``: evaluate, write the JSON (next to the run / adapter, or ``--out``), print a short summary."""
    set_threads(args)
    try:
        result, where = evaluate_cli(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"nora eval: {e}", file=sys.stderr)
        return 2
    where = Path(args.out) if args.out else where
    write_json_atomic(where, result)
    print(format_summary(result, where))
    return 0

"""Run dir or model -> perplexity, generation accuracy, logistic-map collapse; ``nora eval``.

* ``perplexity``: token-weighted, ``exp(sum NLL / sum tokens)`` over response tokens (or every token with
  ``response_only=False``), exactly the tokens training puts a loss on.
* ``generation_accuracy``: batched greedy generation (left padding), ``extract_answer`` on the output, exact match
  against the record's ``answer``.
* ``logistic_eval``: for the logistic-map task, the absolute error per step index, and *state collapse*: the model
  repeats a value while the true orbit moves on.
* ``evaluate_run(run_dir)``: all of the above on a split of the run's own data, written to ``eval_<split>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .io import read_json, write_json_atomic
from .torch_utils import eval_mode

#: how many {id, prediction, gold} examples a result keeps for eyeballing
N_EXAMPLES = 5


class AdapterMismatchError(ValueError):
    """The adapter's layers or shapes do not fit the base model it is loaded onto."""


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------------------------
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, Any]],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    response_only: bool = True,
) -> dict[str, Any]:
    """Token-weighted perplexity of ``records``: ``exp(sum NLL / sum tokens)``.

    The tokens are those ``data.build_lm_dataset`` labels: response tokens (``response_only=True``) or every token
    after the first. Returns ``{"ppl", "nll" (mean per token), "tokens", "examples", "stats"}``; examples whose
    prompt does not fit ``max_length`` are left out (counted in ``stats["dropped"]``).
    """
    both = perplexities(model, tokenizer, records, max_length=max_length, batch_size=batch_size)
    return both["response" if response_only else "full"]


@torch.no_grad()
def perplexities(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, Any]],
    *,
    max_length: int = 256,
    batch_size: int = 8,
) -> dict[str, dict[str, Any]]:
    """``{"response": ..., "full": ...}``, each as :func:`perplexity` returns it, from one forward pass per batch
    (the two differ only in which tokens are scored: the rows are the same)."""
    from .data import build_lm_dataset
    from .train import collate

    dataset, stats = build_lm_dataset(records, tokenizer, max_length=max_length, response_only=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _device(model)
    total_nll = {"response": torch.zeros((), dtype=torch.float64), "full": torch.zeros((), dtype=torch.float64)}
    total_tokens = {"response": 0, "full": 0}
    with eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            keys = ("input_ids", "attention_mask", "labels")
            batch = collate([dict(zip(keys, values)) for values in zip(*(rows[k] for k in keys))], pad)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # per-token NLL of every next-token prediction, then summed under each label mask
            targets = batch["input_ids"][:, 1:]
            token_nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            ).view_as(targets)
            masks = {"response": batch["labels"][:, 1:] != -100, "full": batch["attention_mask"][:, 1:].bool()}
            for kind, mask in masks.items():
                total_nll[kind] += token_nll[mask].double().sum().cpu()
                total_tokens[kind] += int(mask.sum())
    if total_tokens["response"] == 0:
        raise ValueError(
            f"No tokens to score: {len(records)} records, tokenisation stats {stats}. Check that the records have "
            "responses and that max_length is longer than the prompts."
        )
    out = {}
    for kind in ("response", "full"):
        mean = float(total_nll[kind]) / total_tokens[kind]
        out[kind] = {
            "ppl": math.exp(mean),
            "nll": mean,
            "tokens": total_tokens[kind],
            "examples": len(dataset),
            "stats": stats,
        }
    return out


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------
def prompt_ids(tokenizer, records: list[dict[str, Any]]) -> list[list[int]]:
    """The token ids of each record's formatted prompt, exactly as training sees them (taken from
    ``build_lm_dataset``: the positions whose label is -100), so generation starts from the same context."""
    from .data import build_lm_dataset

    bare = [{**r, "response": ""} for r in records]
    dataset, _ = build_lm_dataset(bare, tokenizer, max_length=1 << 30, response_only=True)
    return [ids[: labels.count(-100)] for ids, labels in zip(dataset["input_ids"], dataset["labels"])]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, Any]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
) -> list[str]:
    """Greedy completions of each record's formatted prompt (batched, left-padded); the new text only."""
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = prompt_ids(tokenizer, records)
    outputs: list[str] = []
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return outputs


def default_max_new_tokens(tokenizer, records: list[dict[str, Any]], cap: int = 512) -> int:
    """Room for the longest reference response plus a margin (a greedy model that never stops costs no more)."""
    longest = max((len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in records), default=16)
    return int(min(cap, longest + 16))


def score_answers(records: list[dict[str, Any]], predictions: list[str]) -> dict[str, Any]:
    """Exact-match accuracy of ``extract_answer(prediction)`` against each record's ``answer`` (records without an
    answer are skipped)."""
    from .data import answers_match, extract_answer

    n = correct = 0
    examples = []
    for rec, text in zip(records, predictions):
        if rec.get("answer") is None:
            continue
        pred = extract_answer(text)
        ok = bool(answers_match(pred, rec["answer"]))
        n += 1
        correct += ok
        if len(examples) < N_EXAMPLES:
            examples.append({"id": rec["id"], "prediction": pred, "gold": rec["answer"], "output": text[:300]})
    return {"accuracy": correct / n if n else None, "n": n, "correct": correct, "examples": examples}


def generation_accuracy(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, Any]],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Greedy-decode every record with an answer and score exact match:
    ``{"accuracy", "n", "correct", "examples": [first few {id, prediction, gold, output}]}``."""
    records = [r for r in records if r.get("answer") is not None]
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(tokenizer, records)
    predictions = generate(model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return score_answers(records, predictions)


# ---------------------------------------------------------------------------------------------------------------
# Logistic map
# ---------------------------------------------------------------------------------------------------------------
def is_logistic(record: dict[str, Any]) -> bool:
    """Records of the synthetic logistic-map task (their ids start with ``logistic``)."""
    return str(record.get("id", "")).startswith("logistic")


def score_logistic(records: list[dict[str, Any]], predictions: list[str], *, tol: float = 1e-9) -> dict[str, Any]:
    """Per-step absolute error and state collapse of predicted logistic-map orbits.

    For step index ``i`` the error is the mean over records of ``|pred_i - true_i|`` (records whose prediction has
    no step ``i`` count in ``missing_per_step`` instead). A record *collapses* when at some step ``i >= 1`` the
    prediction repeats its previous value (``|pred_i - pred_{i-1}| <= tol``) while the true orbit does not; we report
    the fraction of records that collapse, and the mean first step where they do (1-based: step 2 means ``x2``
    repeated ``x1``). ``abs_error_per_step[0]`` is the error of ``x1``.
    """
    from .data import answers_match, extract_answer, parse_logistic_steps

    errors: list[list[float]] = []
    missing: list[int] = []
    collapsed_at: list[int] = []
    correct = n_answer = 0
    for rec, text in zip(records, predictions):
        gold, pred = parse_logistic_steps(rec["response"]), parse_logistic_steps(text)
        while len(errors) < len(gold):
            errors.append([])
            missing.append(0)
        for i, g in enumerate(gold):
            if i < len(pred):
                errors[i].append(abs(pred[i] - g))
            else:
                missing[i] += 1
        for i in range(1, min(len(pred), len(gold))):
            if abs(pred[i] - pred[i - 1]) <= tol and abs(gold[i] - gold[i - 1]) > tol:
                collapsed_at.append(i + 1)
                break
        if rec.get("answer") is not None:
            n_answer += 1
            correct += bool(answers_match(extract_answer(text), rec["answer"]))
    n = len(records)
    per_step = [sum(e) / len(e) if e else None for e in errors]
    scored = [x for e in errors for x in e]
    return {
        "n": n,
        "abs_error_per_step": per_step,
        "missing_per_step": missing,
        "mean_abs_error": sum(scored) / len(scored) if scored else None,
        "collapse_rate": len(collapsed_at) / n if n else None,
        "collapsed": len(collapsed_at),
        "mean_collapse_step": sum(collapsed_at) / len(collapsed_at) if collapsed_at else None,
        "accuracy": correct / n_answer if n_answer else None,
    }


def logistic_eval(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, Any]],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    tol: float = 1e-9,
) -> dict[str, Any]:
    """Greedy-decode logistic-map records and score them with ``score_logistic``."""
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(tokenizer, records)
    predictions = generate(model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return score_logistic(records, predictions, tol=tol)


# ---------------------------------------------------------------------------------------------------------------
# Models, adapters, run dirs
# ---------------------------------------------------------------------------------------------------------------
def load_adapter(base: torch.nn.Module, adapter_dir: str | Path, *, base_name: str | None = None):
    """``PeftModel.from_pretrained`` (NoRA or LoRA), after checking that the adapter fits ``base`` (the core check,
    ``nora_peft.checkpoint.check_fits_model``, names every layer and both shapes)."""
    from peft import PeftModel

    from ..checkpoint import CheckpointError, check_fits_model

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir} is not a peft adapter dir (no adapter_config.json).")
    try:
        check_fits_model(adapter_dir, base, model_label=f"base model {base_name or '(embedded default)'}")
    except CheckpointError as e:
        raise AdapterMismatchError(str(e)) from None
    return PeftModel.from_pretrained(base, str(adapter_dir))


def load_run(run_dir: str | Path):
    """``(peft_model, tokenizer, TrainConfig, splits)`` of a finished run; ``splits`` are the records per split,
    rebuilt from ``config.json`` and checked against the ids in ``splits.json``."""
    from .base import load_model_and_tokenizer
    from .train import TrainConfig, base_dtype, load_splits, resolve_precision

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a run dir (no config.json); train one with `nora train`.")
    if not (run_dir / "adapter").is_dir():
        raise FileNotFoundError(f"{run_dir} has no adapter/ yet: the run has not finished (`nora train --resume`).")
    cfg = TrainConfig.from_dict(read_json(run_dir / "config.json"))
    splits = load_splits(cfg)
    _check_split_ids(run_dir, splits)
    dtype = base_dtype(resolve_precision(cfg.precision))
    base, tokenizer = load_model_and_tokenizer(cfg.model, dtype=dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if torch.cuda.is_available():
        base = base.to("cuda")
    model = load_adapter(base, run_dir / "adapter", base_name=cfg.model)
    model.eval()
    return model, tokenizer, cfg, splits


def _check_split_ids(run_dir: Path, splits: dict[str, list[dict[str, Any]]]) -> None:
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


def evaluate_records(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, Any]],
    *,
    generate_outputs: bool = True,
    max_length: int = 256,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    max_generate: int | None = None,
) -> dict[str, Any]:
    """Perplexity (response-only and full), and with ``generate_outputs`` accuracy and logistic-map metrics.

    Perplexity uses every record (one forward pass each); generation, the expensive part, only the first
    ``max_generate`` records when that is set.

    Top-level scalars for tables: ``ppl`` / ``nll`` / ``tokens`` (response tokens), ``ppl_full`` / ``nll_full``
    (every token), ``accuracy`` (records with an answer); details under ``perplexity``, ``generation``, ``logistic``.
    """
    if not records:
        raise ValueError("No records to evaluate (the split is empty); choose another --split or data source.")
    kw = dict(max_length=max_length, batch_size=batch_size)
    both = perplexities(model, tokenizer, records, **kw)
    response, full = both["response"], both["full"]
    result: dict[str, Any] = {
        "n": len(records),
        "ppl": response["ppl"],
        "nll": response["nll"],
        "tokens": response["tokens"],
        "ppl_full": full["ppl"],
        "nll_full": full["nll"],
        "perplexity": {"response": response, "full": full},
    }
    if generate_outputs:
        gen_records = records[:max_generate] if max_generate else records
        result["n_generated"] = len(gen_records)
        scored = [r for r in gen_records if r.get("answer") is not None or is_logistic(r)]
        if scored:
            mnt = max_new_tokens or default_max_new_tokens(tokenizer, scored)
            predictions = generate(model, tokenizer, scored, max_new_tokens=mnt, batch_size=batch_size)
            result["max_new_tokens"] = mnt
            answered = [(r, p) for r, p in zip(scored, predictions) if r.get("answer") is not None]
            if answered:
                result["generation"] = score_answers([r for r, _ in answered], [p for _, p in answered])
                result["accuracy"] = result["generation"]["accuracy"]
            logistic = [(r, p) for r, p in zip(scored, predictions) if is_logistic(r)]
            if logistic:
                result["logistic"] = score_logistic([r for r, _ in logistic], [p for _, p in logistic])
    return result


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str = "test",
    generate: bool = True,
    max_examples: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    max_generate: int | None = None,
) -> dict[str, Any]:
    """Evaluate a finished run on a split of its own data; writes ``run_dir/eval_<split>.json`` atomically.

    ``max_examples`` caps every metric's records; ``max_generate`` only the generated ones (perplexity stays on all).
    """
    run_dir = Path(run_dir)
    model, tokenizer, cfg, splits = load_run(run_dir)
    if split not in splits:
        raise ValueError(f"Unknown split {split!r}; this run has {sorted(splits)}.")
    records = splits[split][:max_examples] if max_examples else splits[split]
    result = evaluate_records(
        model,
        tokenizer,
        records,
        generate_outputs=generate,
        max_length=cfg.max_length,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_generate=max_generate,
    )
    result.update(
        run_dir=str(run_dir),
        split=split,
        data=cfg.data,
        method=cfg.adapter.method,
        label=cfg.adapter.label(),
        max_examples=max_examples,
    )
    write_json_atomic(run_dir / f"eval_{split}.json", result)
    return result


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import _mapping

    src = parser.add_mutually_exclusive_group()
    src.add_argument("--run", help="a run dir from `nora train` (its base, adapter and data splits)")
    src.add_argument("--model", help="a base model dir / hub id (default: the embedded base) ...")
    parser.add_argument("--adapter", help="... with this peft adapter dir (NoRA or LoRA); omit for the base alone")
    parser.add_argument("--data", help="data source (default: the run's data, else reasoning)")
    parser.add_argument("--data-options", type=_mapping, default=None, help="load_source options: KEY=VALUE,...")
    parser.add_argument("--field-map", type=_mapping, default=None, help="record field -> column for local files")
    parser.add_argument("--split", default="test", help="train / validation / test (default test)")
    parser.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument("--no-generate", action="store_true", help="perplexity only (skip generation)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None, help="tokens per example (default: run's or 256)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: longest reference + 16")
    parser.add_argument("--data-seed", type=int, default=0, help="split seed for --model (a run uses its own)")
    parser.add_argument("--out", help="where to write the JSON (default: next to the run / adapter)")


def _evaluate_model_args(args: argparse.Namespace) -> tuple[dict[str, Any], Path | None]:
    """``--model [--adapter]``: load, build the requested split, evaluate."""
    from .base import load_model_and_tokenizer
    from .data import load_source, make_splits

    data = args.data or "reasoning"
    native = load_source(data, field_map=args.field_map, seed=args.data_seed, **(args.data_options or {}))
    splits = make_splits(native, seed=args.data_seed)
    if args.split not in splits:
        raise ValueError(f"Unknown split {args.split!r}; {data!r} has {sorted(splits)}.")
    records = splits[args.split][: args.max_examples] if args.max_examples else splits[args.split]
    model, tokenizer = load_model_and_tokenizer(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if torch.cuda.is_available():
        model = model.to("cuda")
    if args.adapter:
        model = load_adapter(model, args.adapter, base_name=args.model)
    result = evaluate_records(
        model,
        tokenizer,
        records,
        generate_outputs=not args.no_generate,
        max_length=args.max_length or 256,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    result.update(model=args.model, adapter=args.adapter, data=data, split=args.split, max_examples=args.max_examples)
    where = Path(args.adapter) / f"eval_{_slug(data)}_{args.split}.json" if args.adapter else None
    return result, where


def _slug(text: str) -> str:
    return Path(text).stem if "/" in text or "." in text else text


def main(args: argparse.Namespace) -> int:
    try:
        if args.run:
            run_dir = Path(args.run)
            if args.data or args.data_options or args.field_map or args.max_length:  # the run's adapter, other data
                from .train import TrainConfig

                if not (run_dir / "config.json").exists():
                    raise FileNotFoundError(f"{run_dir} is not a run dir (no config.json).")
                cfg = TrainConfig.from_dict(read_json(run_dir / "config.json"))
                args.model, args.adapter = cfg.model, str(run_dir / "adapter")
                args.max_length = args.max_length or cfg.max_length
                result, where = _evaluate_model_args(args)
            else:
                result = evaluate_run(
                    run_dir,
                    split=args.split,
                    generate=not args.no_generate,
                    max_examples=args.max_examples,
                    batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens,
                )
                where = run_dir / f"eval_{args.split}.json"
        else:
            if args.adapter is None and args.out is None:
                print("nora eval: base model alone; pass --out FILE to save the JSON.", file=sys.stderr)
            result, where = _evaluate_model_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"nora eval: {e}", file=sys.stderr)
        return 2
    if args.out:
        where = Path(args.out)
    if where is not None:
        write_json_atomic(where, result)
    print(json.dumps(result, indent=2, default=str))
    if where is not None:
        print(f"wrote {where}", file=sys.stderr)
    return 0
